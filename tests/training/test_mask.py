"""Masked loss: a row's optional mask (white = the edited region) weights its flow loss per target token,
1 inside and ``train.mask_outside_weight`` outside, normalised so that an all-white mask is exactly the
unweighted loss; a bad mask is one ``error:`` line (exit 2) that ``--check`` reports too."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from instructmole.kontext import pack
from tests.training.conftest import TINY_CONFIG, run_overrides
from training.buckets import load_mask
from training.cli import main
from training.config import load_config
from training.data import check_rows, read_rows
from training.errors import DataError
from training.loop import train
from training.recipe import mask_weight, weighted_flow


def save_mask(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(path)
    return path


def masked_manifest(tiny: dict[str, Path], folder: Path, make_mask) -> Path:
    """The tiny data set with ``make_mask(i)`` (a 32x32 uint8 array, or None) as the mask of row ``i``."""
    folder.mkdir(parents=True, exist_ok=True)
    source = tiny["manifest"]
    lines = []
    for i, line in enumerate(source.read_text().splitlines()):
        row = json.loads(line)
        row["target"] = str(source.parent / row["target"])
        row["references"] = [str(source.parent / p) for p in row["references"]]
        pixels = make_mask(i)
        if pixels is not None:
            row["mask"] = str(save_mask(folder / f"mask-{i:04d}.png", pixels))
        lines.append(json.dumps(row))
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def run(tiny, manifest: Path, out: Path, *extra: str, resume: str | None = None, steps: int = 3):
    overrides = run_overrides(tiny, out, f"data.manifest={manifest}", "save.report=false", *extra, steps=steps, every=1)
    return train(load_config(TINY_CONFIG, overrides), resume=resume)


def adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same(a: Path, b: Path) -> None:
    ta, tb = adapter(a), adapter(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


# ---- the loss ----------------------------------------------------------------------------------------


def test_weighted_flow_is_the_hand_computed_weighted_mean_of_token_errors():
    pred = torch.tensor([[[1.0, 3.0], [0.0, 0.0], [2.0, 2.0], [9.0, 9.0]]])  # 3 target tokens + 1 reference
    target = torch.tensor([[[0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]])
    # token errors (mean over channels): (1 + 4) / 2 = 2.5, (1 + 1) / 2 = 1, (4 + 4) / 2 = 4
    coverage = torch.tensor([[1.0, 0.0, 0.5]])
    weight = mask_weight(coverage, 0.1)  # 1, 0.1, 0.55
    torch.testing.assert_close(weight, torch.tensor([[1.0, 0.1, 0.55]]))
    want = (1.0 * 2.5 + 0.1 * 1.0 + 0.55 * 4.0) / (1.0 + 0.1 + 0.55)
    torch.testing.assert_close(weighted_flow(pred, target, weight), torch.tensor([want]))
    # outside weight 0: only the masked tokens count
    torch.testing.assert_close(weighted_flow(pred, target, mask_weight(coverage, 0.0)), torch.tensor([(2.5 + 2) / 1.5]))


def test_an_all_white_mask_is_bit_for_bit_the_unweighted_loss_and_gradients():
    g = torch.Generator().manual_seed(0)
    pred0, target = torch.randn(3, 12, 64, generator=g), torch.randn(3, 8, 64, generator=g)
    weight = mask_weight(torch.ones(3, 8), 0.1)
    assert torch.equal(weight, torch.ones(3, 8))
    a, b = pred0.clone().requires_grad_(), pred0.clone().requires_grad_()
    plain = (a[:, :8].float() - target.float()).pow(2).mean(dim=(1, 2))  # TrainingModel's flow loss
    masked = weighted_flow(b, target, weight)
    assert torch.equal(plain, masked)
    plain.mean().backward()
    masked.mean().backward()
    assert torch.equal(a.grad, b.grad)


def test_a_mask_becomes_the_white_share_of_each_token_in_pack_order(tmp_path):
    pixels = np.zeros((32, 64), np.uint8)  # h=32, w=64: a 2x4 token grid of 16x16 pixel patches
    pixels[:16, :16] = 255  # token (0, 0) white
    pixels[16:, 48:56] = 255  # token (1, 3) half white
    grid = load_mask(save_mask(tmp_path / "m.png", pixels), (64, 32))
    assert grid.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5]
    # the same order as the target's packed latents: a latent marked where the mask is white packs alike
    latent = torch.zeros(1, 1, 4, 8)
    latent[0, 0, :2, :2] = 1.0
    assert pack(latent)[0, :, 0].tolist() == [1.0, 0, 0, 0, 0, 0, 0, 0]
    assert torch.equal(load_mask(save_mask(tmp_path / "w.png", np.full((32, 64), 255)), (64, 32)), torch.ones(8))


# ---- training ---------------------------------------------------------------------------------------


def left_half(i: int) -> np.ndarray:
    pixels = np.zeros((32, 32), np.uint8)
    pixels[:, : 16 if i % 2 else 24] = 255
    return pixels


@pytest.fixture(scope="module")
def masked_run(tiny_kontext, tmp_path_factory) -> tuple[Path, Path]:
    """(manifest, final adapter) of an uninterrupted 3-step run on rows with masks (and some without)."""
    folder = tmp_path_factory.mktemp("masked")
    manifest = masked_manifest(tiny_kontext, folder / "data", lambda i: left_half(i) if i % 3 else None)
    return manifest, run(tiny_kontext, manifest, folder / "run").adapter


def test_all_white_masks_train_exactly_as_no_masks(tiny_kontext, tmp_path):
    white = masked_manifest(tiny_kontext, tmp_path / "white", lambda i: np.full((32, 32), 255))
    plain = masked_manifest(tiny_kontext, tmp_path / "plain", lambda i: None)
    assert_same(run(tiny_kontext, white, tmp_path / "a").adapter, run(tiny_kontext, plain, tmp_path / "b").adapter)


def test_masked_rows_train_differently_and_resume_exactly(tiny_kontext, masked_run, tmp_path):
    manifest, uninterrupted = masked_run
    plain = masked_manifest(tiny_kontext, tmp_path / "plain", lambda i: None)
    unmasked = adapter(run(tiny_kontext, plain, tmp_path / "plain-run").adapter)
    assert any(not torch.equal(unmasked[k], v) for k, v in adapter(uninterrupted).items())  # the mask counts
    # an interrupted run (its last checkpoint lost) resumed from step 2 ends with the same weights
    out = tmp_path / "interrupted"
    run(tiny_kontext, manifest, out)
    shutil.rmtree(out / "checkpoints" / "step-0000003")
    (out / "instructmole.safetensors").unlink(missing_ok=True)
    resumed = run(tiny_kontext, manifest, out, resume="latest")
    assert resumed.steps == 3
    assert_same(resumed.adapter, uninterrupted)


def test_mask_outside_weight_is_checked(tiny_kontext, tmp_path):
    overrides = run_overrides(tiny_kontext, tmp_path)
    with pytest.raises(Exception, match="mask_outside_weight"):
        load_config(TINY_CONFIG, [*overrides, "train.mask_outside_weight=1.5"])
    assert load_config(TINY_CONFIG, overrides).train.mask_outside_weight == 0.1


# ---- bad masks ------------------------------------------------------------------------------------


def one_row(tiny, folder: Path, mask: str) -> Path:
    row = json.loads(tiny["manifest"].read_text().splitlines()[0])
    row["target"] = str(tiny["manifest"].parent / row["target"])
    row["references"] = [str(tiny["manifest"].parent / p) for p in row["references"]]
    row["mask"] = mask
    manifest = folder / "bad.jsonl"
    manifest.write_text(json.dumps(row) + "\n")
    return manifest


def bad_masks(folder: Path) -> dict[str, tuple[str, str]]:
    """name -> (the mask's path, the phrase its error names)."""
    save_mask(folder / "small.png", np.full((16, 16), 255))
    save_mask(folder / "black.png", np.zeros((32, 32)))
    (folder / "junk.png").write_bytes(b"not a png")
    return {
        "missing": (str(folder / "nowhere.png"), "is missing"),
        "size": (str(folder / "small.png"), "is 16x16 but its target is 32x32"),
        "black": (str(folder / "black.png"), "is all black"),
        "junk": (str(folder / "junk.png"), "is not a readable image"),
    }


@pytest.mark.parametrize("case", ["missing", "size", "black", "junk"])
def test_a_bad_mask_is_one_line_with_exit_2_and_check_catches_it(tiny_kontext, tmp_path, capsys, case):
    mask, phrase = bad_masks(tmp_path)[case]
    manifest = one_row(tiny_kontext, tmp_path, mask)
    overrides = run_overrides(tiny_kontext, tmp_path / "out", f"data.manifest={manifest}", steps=1, every=1)
    for extra in ([], ["--check"]):
        code = main(["--config", str(TINY_CONFIG), *overrides, *extra])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
        for want in ("bad.jsonl line 1", "mask '", phrase, "data.on_error=skip"):
            assert want in lines[0], (want, lines[0])
    assert not (tmp_path / "out").exists()


def test_a_mask_must_be_a_path(tmp_path, tiny_kontext):
    manifest = one_row(tiny_kontext, tmp_path, "")
    with pytest.raises(DataError, match="line 1: 'mask' needs a non-empty image path"):
        read_rows(manifest)


def test_folder_layout_masks_and_skip(tmp_path):
    for sub in ("target", "control", "mask"):
        (tmp_path / sub).mkdir()
    for stem in ("a", "b"):
        Image.new("RGB", (32, 32)).save(tmp_path / "target" / f"{stem}.png")
        (tmp_path / "target" / f"{stem}.txt").write_text("edit")
        Image.new("RGB", (32, 32)).save(tmp_path / "control" / f"{stem}.png")
    save_mask(tmp_path / "mask" / "a.png", np.zeros((32, 32)))  # all black: a bad row
    rows = read_rows(tmp_path)
    assert rows[0].mask == tmp_path / "mask" / "a.png" and rows[1].mask is None
    checked = check_rows(rows, min_side=32, max_references=4, on_error="skip")
    assert [r.where for r in checked.rows] == ["target/b.png"] and "all black" in checked.problems[0]
