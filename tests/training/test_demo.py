"""The embedded demo's own parts: its stage lines, its settings, its build folder and its edits picture.

The whole demo (minutes of CPU) is run by ``bash scripts/demo.sh``; here each part is checked on
inputs whose answer is known.
"""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from training import demo


def _edit(task: str, routed_as: tuple[str, ...], colour: float) -> demo.Edit:
    source = torch.full((3, 32, 32), 0.5)
    target = torch.full((3, 32, 32), colour)
    return demo.Edit(task, f"{task} please", source, source.clone(), target.clone(), target, routed_as)


def test_edit_errors_are_against_the_target():
    e = _edit("darken", ("darken",), 0.2)
    assert e.base_error == pytest.approx(0.3) and e.adapter_error == 0.0


def test_edits_picture_has_a_labelled_row_per_task_and_a_column_per_image():
    edits = [_edit("darken", ("darken",), 0.2), _edit("brighten", ("darken",), 0.9)]
    tile = 64
    picture = demo.edits_picture(edits, tile=tile)
    assert picture.mode == "RGB"
    assert picture.height >= len(edits) * tile + 28  # a header line, then the rows
    assert picture.width >= len(demo.EDIT_COLUMNS) * tile + 100  # the label column before the images
    pixels = Counter(picture.getdata())
    grey, dark, bright = (128, 128, 128), (51, 51, 51), (230, 230, 230)
    assert pixels[grey] >= 2 * 2 * tile * tile  # input and base model in each row
    assert pixels[dark] >= 2 * tile * tile and pixels[bright] >= 2 * tile * tile  # adapter and target
    assert pixels[(240, 150, 90)] > 0  # the misrouted phrasing is marked


def test_routed_as_is_the_task_whose_council_weights_are_nearest():
    """Weights decide, not member sets: a near-zero second member does not make a task."""
    weights = torch.tensor([[[0.95, 0.05, 0.0, 0.0], [0.0, 0.0, 0.9, 0.1]]])  # [1 instance, 2 layers, 4 experts]
    council = SimpleNamespace(weights=weights)
    mean = {
        "warm": [[0.97, 0.0, 0.0, 0.03], [0.0, 0.0, 0.96, 0.0]],  # other second members, same decisive ones
        "cool": [[0.0, 0.95, 0.05, 0.0], [0.0, 0.0, 0.9, 0.1]],  # same second member in one layer, not decisive
    }
    assert demo._routed_as(council, mean) == ("warm",)
    assert demo._routed_as(council, {"b": mean["warm"], "a": mean["warm"]}) == ("a", "b")  # a tie: both


def test_routing_note_tells_a_wrong_task_from_shared_councils():
    assert demo._routing_note("cool", ("cool",)) == "routed as its task"
    assert demo._routing_note("cool", ("brighten",)) == "routed as brighten"
    assert demo._routing_note("cool", ("brighten", "cool")) == "councils shared with brighten"


def test_edit_rows_give_each_task_its_own_image_and_one_held_out_sentence(tmp_path):
    rows = [
        {"instruction": f"{task} {p}", "target": f"{i}-{task}.png", "references": [f"{i}.png"], "task": task,
         "split": "holdout"}
        for i in range(3) for task in ("a", "b", "c") for p in ("one", "two")
    ]  # fmt: skip
    rows.insert(0, {**rows[0], "split": "train"})
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    picked = demo._edit_rows(manifest)  # the second held-out phrasing of every task: one sentence for all
    assert [(r["task"], r["references"][0], r["instruction"]) for r in picked] == [
        ("a", "0.png", "a two"),
        ("b", "1.png", "b two"),
        ("c", "2.png", "c two"),
    ]
    assert [r["instruction"] for r in demo._edit_rows(manifest, phrasing=0)] == ["a one", "b one", "c one"]


def test_reproducible_sets_threads_and_determinism_and_restores_them():
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    with demo.reproducible(1):
        assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == deterministic


def test_clock_prints_a_start_and_an_end_line_per_stage(capsys):
    clock = demo.Clock()
    with clock.stage("things"):
        pass
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].endswith("things ...") and "things: done in" in lines[1]
    assert "CPU" in lines[1]


def test_an_interrupted_build_is_started_afresh_not_reused(tmp_path, monkeypatch):
    """The pipeline folder appears only when whole: a build killed while teaching the transformer
    leaves no ``tiny-kontext`` to be reused half-taught."""
    import instructmole.tiny

    calls = []

    def save(folder, **_):
        folder.mkdir(parents=True)
        (folder / "model_index.json").write_text(json.dumps({"random": True}))
        (folder / "vae").mkdir()

    def fail(folder):
        raise KeyboardInterrupt

    monkeypatch.setattr(instructmole.tiny, "save_tiny_kontext", save)
    monkeypatch.setattr(demo, "fit_vae", lambda folder: calls.append("vae") or 0.0)
    monkeypatch.setattr(demo, "damp_t5_mixing", lambda folder: calls.append("t5"))
    monkeypatch.setattr(demo, "teach_copy", fail)
    monkeypatch.setattr("training.synthetic.write_dataset", lambda folder: calls.append("data"))
    with pytest.raises(KeyboardInterrupt):
        demo.build(tmp_path, demo.Clock())
    assert not (tmp_path / "tiny-kontext").exists()
    monkeypatch.setattr(demo, "teach_copy", lambda folder: calls.append("copy") or 0.0)
    model, _ = demo.build(tmp_path, demo.Clock())
    assert calls == ["t5", "vae", "t5", "vae", "copy", "data"]
    assert (model / "model_index.json").is_file() and not (tmp_path / "tiny-kontext.partial").exists()
    demo.build(tmp_path, demo.Clock())  # complete now: reused, nothing rebuilt
    assert calls == ["t5", "vae", "t5", "vae", "copy", "data", "data"]  # (the stub wrote no manifest)


def test_damped_t5_keeps_a_word_in_a_new_sentence(tmp_path):
    """After ``damp_t5_mixing`` a key word's feature barely moves when the sentence around it is new,
    while two key words stay apart: what lets the router route held-out phrasings."""
    from instructmole.tiny import tiny_text_encoders
    from training.synthetic import all_phrasings

    text = tiny_text_encoders(text_length=16, seed=0, corpus=all_phrasings())
    text.t5.save_pretrained(tmp_path / "t5")

    def word_features(model) -> dict[str, torch.Tensor]:
        out = {}
        for sentence, word in (("brighten the image", "brighten"), ("brighten the picture", "brighten"),
                               ("darken the image", "darken")):  # fmt: skip
            ids = text.t5_tokenizer(sentence, return_tensors="pt").input_ids
            position = next(i for i, t in enumerate(text.t5_tokenizer.convert_ids_to_tokens(ids[0])) if word in t)
            with torch.no_grad():
                out[sentence] = model(ids).last_hidden_state[0, position]
        return out

    def cosines(model) -> tuple[float, float]:
        f = word_features(model)
        cos = torch.nn.functional.cosine_similarity
        return float(cos(f["brighten the image"], f["brighten the picture"], 0)), float(
            cos(f["brighten the image"], f["darken the image"], 0)
        )

    from transformers import T5EncoderModel

    same_before, _other_before = cosines(T5EncoderModel.from_pretrained(tmp_path / "t5").eval())
    demo.damp_t5_mixing(tmp_path / "t5")
    same_after, other_after = cosines(T5EncoderModel.from_pretrained(tmp_path / "t5").eval())
    assert same_before < 0.95 < same_after  # the same word in a new sentence: nearly the same feature
    assert other_after < 0.5  # another key word is still another feature


def test_threads_sets_the_count_for_the_block_only():
    was = torch.get_num_threads()
    with demo.threads(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == was


def test_recent_is_the_mean_of_the_last_values():
    recent = demo.Recent(window=3)
    assert recent.value == 0.0
    for v in (10.0, 1.0, 2.0, 3.0):
        recent.add(v)
    assert recent.value == pytest.approx(2.0)
