"""The data set description and the batch order, on tiny real files: manifests, folders, images, buckets."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from training.buckets import KONTEXT_RESOLUTIONS, BucketBatches, buckets_for, load_image, nearest_bucket
from training.data import check_rows, content_hash, image_size, read_rows
from training.errors import DataError

SIDE = 64


def make_image(path: Path, size: tuple[int, int] = (SIDE, SIDE), color=(128, 64, 32), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def write_manifest(folder: Path, lines: list[object]) -> Path:
    path = folder / "manifest.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def good_row(i: int, **extra) -> dict:
    return {"instruction": f"edit {i}", "target": f"out/{i}.png", "references": [f"in/{i}.png"], **extra}


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    for i in range(6):
        make_image(tmp_path / f"out/{i}.png")
        make_image(tmp_path / f"in/{i}.png")
    return tmp_path


def check(rows, on_error="fail", min_side=32, max_references=2):
    return check_rows(rows, min_side=min_side, max_references=max_references, on_error=on_error)


# ------------------------------------------------------------------------------------------ manifest


def test_manifest_parses_paths_comments_blank_lines_and_string_references(dataset: Path):
    manifest = write_manifest(
        dataset,
        [
            "# a comment",
            good_row(0, task="weather"),
            "",
            {"instruction": "  make it snowy ", "target": "out/1.png", "references": "in/1.png", "split": "holdout"},
            {"instruction": "draw a cat", "target": str(dataset / "out/2.png")},
        ],
    )
    rows = read_rows(manifest)
    assert [r.index for r in rows] == [0, 1, 2]
    assert [r.where for r in rows] == ["manifest.jsonl line 2", "manifest.jsonl line 4", "manifest.jsonl line 5"]
    assert rows[0].target == dataset.absolute() / "out/0.png" and rows[0].task == "weather"
    assert rows[0].references == (dataset.absolute() / "in/0.png",) and rows[0].split == "train"
    assert rows[1].instruction == "make it snowy" and rows[1].split == "holdout"
    assert rows[1].references == (dataset.absolute() / "in/1.png",)
    assert rows[2].references == () and rows[2].task is None and rows[2].target == dataset / "out/2.png"
    assert check(rows).rows == rows


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "manifest.jsonl line 2: not valid JSON"),
        (
            {"instuction": "x", "target": "out/1.png"},
            "manifest.jsonl line 2: unknown key 'instuction'; did you mean 'instruction'?",
        ),
        ({"instruction": "x"}, "manifest.jsonl line 2: 'target' needs a non-empty image path"),
        (
            {"instruction": "x", "target": "out/1.png", "split": "holdot"},
            "manifest.jsonl line 2: unknown split \"holdot\"; did you mean 'holdout'?",
        ),
        ("[1, 2]", "manifest.jsonl line 2: expected a JSON object"),
    ],
)
def test_structural_mistakes_fail_while_reading_and_name_the_line(dataset: Path, line, message):
    with pytest.raises(DataError) as err:
        read_rows(write_manifest(dataset, [good_row(0), line]))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_missing_path_and_empty_manifest(tmp_path: Path):
    with pytest.raises(DataError, match=r"nowhere\.jsonl does not exist"):
        read_rows(tmp_path / "nowhere.jsonl")
    with pytest.raises(DataError, match="no edit pairs"):
        read_rows(write_manifest(tmp_path, ["# only a comment"]))


def bad_rows_manifest(dataset: Path) -> Path:
    (dataset / "out/garbage.png").write_bytes(b"this is not a png at all")
    make_image(dataset / "out/small.png", (SIDE, 16))
    for i in range(3):
        make_image(dataset / f"in/extra{i}.png")
    return write_manifest(
        dataset,
        [
            good_row(0),
            {"instruction": "x", "target": "out/missing.png", "references": ["in/1.png"]},  # line 2
            {"instruction": "x", "target": "out/garbage.png"},  # line 3
            {"instruction": "   ", "target": "out/2.png"},  # line 4
            {"instruction": "x", "target": "out/small.png"},  # line 5
            {"instruction": "x", "target": "out/3.png", "references": [f"in/extra{i}.png" for i in range(3)]},  # 6
            {"instruction": "x", "target": "out/4.png", "references": ["in/nope.png"]},  # line 7
            good_row(5),
        ],
    )


EXPECTED_PROBLEMS = [
    "manifest.jsonl line 2: target 'out/missing.png' is missing (looked at ",
    "manifest.jsonl line 3: target 'out/garbage.png' is not a readable image",
    "manifest.jsonl line 4: the instruction is empty",
    "manifest.jsonl line 5: target 'out/small.png' is 64x16, its shorter side is under data.min_side=32",
    "manifest.jsonl line 6: 3 references, more than data.max_references=2",
    "manifest.jsonl line 7: reference 'in/nope.png' is missing (looked at ",
]


@pytest.mark.parametrize("line", range(2, 8))
def test_every_bad_row_fails_with_its_line_and_the_way_out(dataset: Path, line: int):
    rows = read_rows(bad_rows_manifest(dataset))
    only = [rows[0], rows[line - 1], rows[-1]]
    with pytest.raises(DataError) as err:
        check(only)
    text = str(err.value)
    assert text.startswith(EXPECTED_PROBLEMS[line - 2]) and text.endswith("or set data.on_error=skip")
    assert "\n" not in text


def test_skip_drops_exactly_the_bad_rows_with_one_problem_each(dataset: Path):
    rows = read_rows(bad_rows_manifest(dataset))
    checked = check(rows, on_error="skip")
    assert [r.where for r in checked.rows] == ["manifest.jsonl line 1", "manifest.jsonl line 8"]
    assert checked.skipped == 6 and len(checked.problems) == 6
    for problem, expected in zip(checked.problems, EXPECTED_PROBLEMS, strict=True):
        assert problem.startswith(expected)
    missing = str((dataset / "out/missing.png").absolute())
    assert missing in checked.problems[0]


def test_skip_with_nothing_left_fails(dataset: Path):
    rows = read_rows(write_manifest(dataset, [{"instruction": "x", "target": "out/none.png"}]))
    with pytest.raises(DataError, match="every one of the 1 rows has a problem"):
        check(rows, on_error="skip")


def test_image_size_applies_exif_rotation_and_content_hash_follows_bytes(tmp_path: Path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: a 40x20 file is shown 20x40
    Image.new("RGB", (40, 20)).save(path, exif=exif)
    assert image_size(path) == (20, 40)
    assert load_image(path, (16, 32)).shape == (3, 32, 16)
    with pytest.raises(DataError, match="is missing"):
        image_size(tmp_path / "nope.png")
    a, b = make_image(tmp_path / "a.png"), make_image(tmp_path / "b.png")
    assert content_hash(a) == content_hash(b) != content_hash(make_image(tmp_path / "c.png", color=(0, 0, 0)))
    assert len(content_hash(a)) == 64


# ---------------------------------------------------------------------------------------- folder


def test_folder_layout(tmp_path: Path):
    for stem in ("0001", "0002", "0003"):
        make_image(tmp_path / f"target/{stem}.png")
        make_image(tmp_path / f"control/{stem}.jpg")
        (tmp_path / f"target/{stem}.txt").write_text(f"instruction {stem}\n")
    make_image(tmp_path / "control_1/0002.png")
    make_image(tmp_path / "control_2/0002.png")
    (tmp_path / "control/0003.jpg").unlink()  # the first reference is required: reported, not ignored
    (tmp_path / "target/0001.txt").unlink()
    rows = read_rows(tmp_path)
    assert [r.where for r in rows] == ["target/0001.png", "target/0002.png", "target/0003.png"]
    assert rows[0].instruction == "" and rows[1].instruction == "instruction 0002"
    assert [len(r.references) for r in rows] == [1, 3, 1]
    assert rows[1].references[1] == tmp_path.absolute() / "control_1/0002.png"
    assert {r.split for r in rows} == {"train"} and {r.task for r in rows} == {None}
    checked = check(rows, on_error="skip", max_references=3)
    assert [r.where for r in checked.rows] == ["target/0002.png"]
    assert checked.problems[0] == "target/0001.png: the instruction is empty"
    assert checked.problems[1].startswith("target/0003.png: reference 'control/0003.png' is missing")


def test_folder_without_target_names_the_layout(tmp_path: Path):
    with pytest.raises(DataError, match="has no target/ subfolder"):
        read_rows(tmp_path)


# --------------------------------------------------------------------------------------- buckets


def test_buckets_for_one_megapixel_is_kontexts_list():
    assert buckets_for(1024 * 1024) == KONTEXT_RESOLUTIONS
    assert len(KONTEXT_RESOLUTIONS) == 17


@pytest.mark.parametrize("pixels", [512 * 512, 768 * 768, 256 * 256])
def test_smaller_budgets_keep_multiples_of_16_and_the_area(pixels: int):
    buckets = buckets_for(pixels)
    assert len(set(buckets)) == len(buckets)
    for w, h in buckets:
        assert w % 16 == 0 and h % 16 == 0
        assert abs(w * h / pixels - 1) < 0.1
    assert (math.isqrt(pixels) // 16 * 16,) * 2 in buckets


def test_nearest_bucket_matches_aspect_ratio():
    assert nearest_bucket(1000, 1000, KONTEXT_RESOLUTIONS) == (1024, 1024)
    assert nearest_bucket(1920, 1080, KONTEXT_RESOLUTIONS) == (1392, 752)
    assert nearest_bucket(1080, 1920, KONTEXT_RESOLUTIONS) == (752, 1392)
    assert nearest_bucket(5000, 100, KONTEXT_RESOLUTIONS) == (1568, 672)
    assert nearest_bucket(3, 2, KONTEXT_RESOLUTIONS) == (1248, 832)


def test_load_image_range_and_center_crop(tmp_path: Path):
    im = Image.new("RGB", (300, 100), (255, 0, 0))
    im.paste((0, 0, 255), (100, 0, 200, 100))  # red | blue | red: a square crop keeps only the blue middle
    im.save(tmp_path / "wide.png")
    x = load_image(tmp_path / "wide.png", (64, 64))
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert torch.allclose(x[:, 8:56, 8:56].mean(dim=(1, 2)), torch.tensor([-1.0, -1.0, 1.0]), atol=0.02)


def test_load_image_puts_alpha_over_white(tmp_path: Path):
    make_image(tmp_path / "clear.png", (32, 32), (0, 0, 0, 0), mode="RGBA")
    assert torch.allclose(load_image(tmp_path / "clear.png", (16, 16)), torch.ones(3, 16, 16))


# ----------------------------------------------------------------------------------- batch order


KEYS = ["a"] * 10 + ["b"] * 7 + ["c"] * 3 + ["a"] * 2


def test_batches_are_deterministic_single_key_and_cover_every_row():
    order = BucketBatches(KEYS, batch_size=4, seed=1)
    assert len(order) == 3 + 2 + 1  # a: 12 rows -> 3, b: 7 -> 1 full + 1 partial, c: 3 -> 1 partial
    e0 = order.epoch(0)
    assert e0 == BucketBatches(KEYS, batch_size=4, seed=1).epoch(0)
    assert e0 != order.epoch(1) and e0 != BucketBatches(KEYS, batch_size=4, seed=2).epoch(0)
    for e in range(3):
        batches = order.epoch(e)
        assert len(batches) == len(order)
        assert sorted(len(b) for b in batches) == [3, 3, 4, 4, 4, 4]
        assert all(len({KEYS[i] for i in b}) == 1 for b in batches)
        assert sorted(i for b in batches for i in b) == list(range(len(KEYS)))  # each row once


def test_partial_batches_are_topped_up_to_equal_shares_from_their_own_group():
    order = BucketBatches(KEYS, batch_size=4, seed=0, multiple=2)  # e.g. 2 micro-batches or 2 processes
    for e in range(3):
        batches = order.epoch(e)
        assert all(len(b) % 2 == 0 for b in batches) and all(len({KEYS[i] for i in b}) == 1 for b in batches)
        counts = Counter(i for b in batches for i in b)
        assert set(counts) == set(range(len(KEYS)))  # every row at least once
        assert sum(counts.values()) == len(KEYS) + 2  # b's and c's tails (3 rows) each got one repeat
    lines = order.summary()
    assert lines[0] == "22 training rows in 3 bucket(s), batches of 4 rows:"
    assert "  a: 12 rows -> 3 full batches" in lines
    assert "  b: 7 rows -> 1 full batch + 1 partial batch of 3 rows, topped up with 1 repeated row" in lines
    assert "  c: 3 rows -> 1 partial batch of 3 rows, topped up with 1 repeated row" in lines
    assert lines[-1] == "6 batches per epoch; every training row is in one of them every epoch"


def test_the_issue_experiment_every_row_trains_every_epoch():
    """144 rows in one bucket plus 3 wide rows and 3 rows with two references, batch 8: the six odd rows
    were once in no batch of any epoch (drop_last); now each row is in a batch in each of 50 epochs."""
    keys = [("512x512", 1)] * 144 + [("768x336", 1)] * 3 + [("512x512", 2)] * 3
    order = BucketBatches(keys, batch_size=8, seed=3407)
    assert len(order) == 18 + 1 + 1
    for e in range(50):
        seen = Counter(i for b in order.epoch(e) for i in b)
        assert set(seen) == set(range(150)) and max(seen.values()) == 1, e


def test_position_matches_epochs():
    order = BucketBatches(KEYS, batch_size=4, seed=0)
    flat = [b for e in range(3) for b in order.epoch(e)]
    for step, batch in enumerate(flat):
        e, i = order.position(step)
        assert order.epoch(e)[i] == batch


def test_batch_size_must_split_into_micro_batches_and_processes():
    with pytest.raises(DataError, match=r"train.batch_size=4 does not split into 3 equal parts"):
        BucketBatches(KEYS, batch_size=4, seed=0, multiple=3)


def test_no_training_rows():
    with pytest.raises(DataError, match=r"no training rows"):
        BucketBatches([], batch_size=16, seed=0)
