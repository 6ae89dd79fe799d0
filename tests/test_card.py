"""Adapter cards (``instructmole/card.py``): written by the trainer, read back, printed by ``info``.

* a real tiny training run (2 steps, samples on, EMA on) exports adapters whose card names the base
  model, the manifest's tasks with example instructions, the settings and the step; the tensor hash
  in the card, the ``.sha256`` file and the preview beside it are checked against the files;
* a card survives its metadata round trip; a damaged one reads with a note, never an exception;
* files without a card (made before cards, ICEdit files) still load and read as "no card";
* ``python -m instructmole info`` prints the card, verifies hashes, and fails in one line.
"""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import instructmole as im
from instructmole import card as cards
from instructmole.cli import main
from instructmole.tiny import save_tiny_kontext
from tests.training.conftest import TINY_CONFIG, run_overrides
from training.config import load_config
from training.loop import train
from training.synthetic import all_phrasings, write_dataset

ROOT = Path(__file__).resolve().parent.parent


def body_sha256(path: Path) -> str:
    """The spec's reference hash, written out independently: sha256 of everything after the header."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return "0x" + hashlib.sha256(raw[8 + n :]).hexdigest()


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """The CLI in-process: (status, stdout, stderr); a failure is exactly one 'error:' line."""
    status = main(argv)
    out, err = capsys.readouterr()
    if status == 2:
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return status, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 2-step tiny run with a sample sheet and an EMA: the adapters a user gets, and the manifest."""
    root = tmp_path_factory.mktemp("card_run")
    model = save_tiny_kontext(root / "model", seed=0, text_length=32, corpus=all_phrasings())
    manifest = write_dataset(root / "data", images=4, holdout_images=1)
    tiny = {"model": model, "manifest": manifest}
    reference = root / "data" / "images" / "0000.png"
    items = f'sample.items=[{{instruction: "make it darker", references: ["{reference}"]}}]'
    out = root / "run"
    extra = (items, "sample.steps=2", "save.report=false", "train.ema=0.5")
    overrides = run_overrides(tiny, out, *extra, steps=2, every=1)
    result = train(load_config(TINY_CONFIG, overrides))
    return {"out": out, "adapter": result.adapter, "manifest": manifest, "model": model}


# ---- the trainer writes a card ------------------------------------------------------------------


def test_trained_adapter_carries_its_card(trained):
    path = trained["adapter"]
    card = cards.read_card(path)
    assert card is not None and card.version == cards.CARD_VERSION
    assert card.title == "instructmole step 2" and card.step == 2
    assert card.base_model["family"] == "flux.1-kontext-dev"
    assert card.base_model["source"] == trained["model"].name  # a name, never the maker's folders
    assert len(card.base_model["fingerprint"]) == 16
    assert card.architecture == "flux-1-kontext-dev/instructmole"
    assert card.resolution == "32x32" and card.date.endswith("Z")
    rows = [json.loads(line) for line in trained["manifest"].read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert Counter({t.name: t.rows for t in card.tasks}) == Counter(r["task"] for r in train_rows)
    for task in card.tasks:
        said = {r["instruction"] for r in train_rows if r["task"] == task.name}
        assert task.examples and set(task.examples) <= said
    assert card.data["rows"] == len(train_rows) and card.data["holdout"] == len(rows) - len(train_rows)
    assert card.settings["train"]["lr"] == 1e-3 and card.settings["adapter"]["num_experts"] == 4
    assert card.settings["train"]["ema"] == 0.5 and "output_dir" not in card.settings["train"]
    meta = cards.read_card_metadata(path)[0]
    card_keys = {k: v for k, v in meta.items() if k.startswith(("modelspec.", "instructmole."))}
    assert not any(str(trained["out"]) in v or str(trained["model"]) in v for v in card_keys.values())
    assert meta["modelspec.sai_model_spec"] == "1.0.0" and meta["modelspec.implementation"] == "instructmole"
    assert meta["modelspec.tags"].split(", ") == [t.name for t in card.tasks]
    assert "make it" in meta["modelspec.usage_hint"] or "'" in meta["modelspec.usage_hint"]
    assert not card.problems
    # the adapter still loads, with the same tensors as the checkpoint's copy
    loaded = im.load_adapter(path)
    step_file = trained["out"] / "checkpoints" / "step-0000002" / "instructmole-step0000002.safetensors"
    assert all(torch.equal(v, load_file(str(step_file))[k]) for k, v in load_file(str(path)).items())
    assert loaded.metadata["modelspec.title"] == card.title


def test_hashes_and_preview_beside_the_adapter(trained):
    path = trained["adapter"]
    card = cards.read_card(path)
    assert card.hash_sha256 == body_sha256(path)  # the card's hash: the tensor bytes, spec's reference
    line = (path.parent / "instructmole.sha256").read_text()
    assert line == f"{hashlib.sha256(path.read_bytes()).hexdigest()}  instructmole.safetensors\n"
    done = subprocess.run(["sha256sum", "-c", "instructmole.sha256"], cwd=path.parent, capture_output=True, text=True)
    assert done.returncode == 0 and "instructmole.safetensors: OK" in done.stdout
    preview = path.parent / "instructmole.preview.png"
    sheet = trained["out"] / "checkpoints" / "step-0000002" / "samples.png"
    assert preview.read_bytes() == sheet.read_bytes() and preview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every checkpoint's adapter is sealed the same way, under its own name
    for step in (1, 2):
        folder = trained["out"] / "checkpoints" / f"step-{step:07d}"
        if not folder.is_dir():
            continue  # pruned (save.keep)
        own = folder / f"instructmole-step{step:07d}.safetensors"
        assert cards.read_card(own).step == step
        assert cards.recorded_sha256(own) == hashlib.sha256(own.read_bytes()).hexdigest()
        assert cards.preview_path(own).is_file()
    assert all(ok for _, ok, _ in cards.verify(path, card))


def test_ema_adapter_has_its_own_card_and_no_preview(trained):
    ema = trained["out"] / "instructmole-ema.safetensors"
    card = cards.read_card(ema)
    assert card.title == "instructmole step 2 (EMA 0.5)" and card.step == 2
    assert card.hash_sha256 == body_sha256(ema)
    assert cards.recorded_sha256(ema) == hashlib.sha256(ema.read_bytes()).hexdigest()
    assert not cards.preview_path(ema).exists()  # the samples show the live weights, not the average
    assert im.load_adapter(ema).metadata["ema"] == "0.5"


def test_info_prints_the_card_of_a_trained_adapter(trained, capsys):
    path = trained["adapter"]
    status, out, _ = cli(["info", str(path)], capsys)
    assert status == 0
    assert "title        instructmole step 2" in out and "base model   flux.1-kontext-dev" in out
    assert "kind         InstructMoLE adapter: N=4 k=2 rank=4" in out
    card = cards.read_card(path)
    first = card.tasks[0]
    assert f"{first.name} ({first.rows} rows): '{first.examples[0]}'" in out
    assert "train.lr=0.001" in out and f"tensor hash  {card.hash_sha256}" in out
    assert "preview      instructmole.preview.png" in out
    assert f"sha256       {hashlib.sha256(path.read_bytes()).hexdigest()}" in out
    status, out, _ = cli(["info", str(path), "--verify"], capsys)
    assert status == 0 and out.count(": matches") == 2
    status, out, _ = cli(["info", str(path), "--json"], capsys)
    data = json.loads(out)
    assert status == 0 and data["card"]["step"] == 2 and data["card"]["tasks"][0]["task"] == first.name
    assert data["preview"].endswith("instructmole.preview.png") and data["sha256"] == cards.recorded_sha256(path)
    status, out, _ = cli(["inspect", str(path)], capsys)
    assert status == 0 and "card         instructmole step 2; see info" in out


def test_info_verify_finds_a_changed_file(trained, tmp_path, capsys):
    copy = tmp_path / "copy.safetensors"
    cards.copy_sealed(trained["adapter"], copy)
    assert cards.hash_path(copy).read_text().endswith("  copy.safetensors\n")  # names the copy
    assert cards.preview_path(copy).is_file()
    raw = bytearray(copy.read_bytes())
    raw[-1] ^= 0x01  # one bit of the last tensor
    copy.write_bytes(bytes(raw))
    status, out, _ = cli(["info", str(copy), "--verify"], capsys)
    assert status == 1 and out.count("DOES NOT MATCH") == 2


# ---- the card itself ----------------------------------------------------------------------------


def sample_card(**kw) -> cards.Card:
    said = [("warm", "make it warmer"), ("warm", "warm it up"), ("warm", "make it warmer"), ("cool", "cool it")]
    tasks = cards.summarize_tasks([*said, (None, "x")])
    args = dict(
        title="demo step 5",
        family="flux.1-kontext-dev",
        step=5,
        tasks=tasks,
        source="/home/someone/models/tiny-kontext",
        fingerprint="0123456789abcdef",
        settings={"adapter": {"num_experts": 4, "top_k": 2, "rank": 4}, "train": {"lr": 1e-3}},
        rows=5,
        holdout=2,
        data_fingerprint="ff00",
        resolution=512,
    )
    args.update(kw)
    return cards.build_card(**args)


def test_card_round_trip_through_metadata():
    card = sample_card()
    assert [(t.name, t.rows, t.examples) for t in card.tasks] == [
        ("warm", 3, ("make it warmer", "warm it up")),
        ("cool", 1, ("cool it",)),
        ("", 1, ("x",)),
    ]
    assert card.base_model["source"] == "tiny-kontext"
    meta = card.to_metadata()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert cards.Card.from_metadata(meta) == card
    assert "4 LoRA experts of rank 4, 2 chosen per layer" in card.description
    text = cards.render_card(card)
    assert "tasks        warm (3 rows): 'make it warmer'; 'warm it up'" in text
    assert "             (no task) (1 row): 'x'" in text


def test_card_limits_and_damaged_cards():
    many = [(f"task{i}", f"instruction {j} of {i} " + "word " * 80) for i in range(100) for j in range(5)]
    card = sample_card(tasks=cards.summarize_tasks(many))
    assert len(card.tasks) == cards.MAX_TASKS and card.task_count == 100
    assert all(len(t.examples) == cards.MAX_EXAMPLES for t in card.tasks)
    assert all(len(e) <= cards.MAX_TEXT for t in card.tasks for e in t.examples)
    assert "... and 36 more tasks" in cards.render_card(card)
    meta = card.to_metadata()
    meta["instructmole.tasks"] = "{not json"
    meta["instructmole.step"] = "two"
    meta["instructmole.settings"] = "[1, 2]"
    damaged = cards.Card.from_metadata(meta)
    assert damaged.tasks == () and damaged.step == 0 and damaged.settings == {}
    assert len(damaged.problems) == 3 and "note" in cards.render_card(damaged)
    assert cards.Card.from_metadata({"modelspec.title": "a kohya LoRA"}) is None  # not our card


def test_files_without_a_card_load_and_read_as_no_card(tmp_path, adapter, capsys):
    path = adapter.save(tmp_path / "old.safetensors")
    assert cards.read_card(path) is None
    assert im.load_adapter(path).adapter_id == adapter.adapter_id
    status, out, _ = cli(["info", str(path)], capsys)
    assert status == 0 and "card         none" in out and "sha256       none" in out
    assert "preview      none" in out
    status, out, _ = cli(["info", str(path), "--verify"], capsys)
    assert status == 0 and "tensor hash: not recorded" in out
    before = path.read_bytes()
    digest = cards.seal(path)  # no card: the file is left as it is, the hash file still written
    assert path.read_bytes() == before and digest == hashlib.sha256(before).hexdigest()
    assert cards.recorded_sha256(path) == digest


def test_icedit_file_reads_as_an_adapter_without_card(tmp_path, transformer, capsys):
    from tests.test_icedit import icedit_state_dict

    path = tmp_path / "icedit.safetensors"
    save_file(icedit_state_dict(transformer), str(path), metadata={"format": "pt"})
    status, out, _ = cli(["info", str(path)], capsys)
    assert status == 0 and "ICEdit MoE-LoRA" in out and "card         none" in out


def test_seal_stamps_keeps_tensors_and_replaces_a_stale_preview(tmp_path, adapter):
    adapter.metadata.update(sample_card().to_metadata())
    path = adapter.save(tmp_path / "a.safetensors")
    stale = cards.preview_path(path)
    stale.write_bytes(b"an earlier run's picture")
    cards.seal(path)
    assert not stale.exists()  # no preview given: an old one must not describe these weights
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["modelspec.hash_sha256"] == body_sha256(path)
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert n % 8 == 0
    back = im.load_adapter(path)
    assert all(torch.equal(v, adapter.tensors()[k]) for k, v in back.tensors().items())
    picture = tmp_path / "sheet.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\nfake")
    cards.seal(path, preview=picture)  # sealing again: same tensor hash, new file hash, preview placed
    assert cards.read_card(path).hash_sha256 == body_sha256(path)
    assert stale.read_bytes() == picture.read_bytes()
    assert cards.recorded_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


# ---- info's errors --------------------------------------------------------------------------------


def test_info_errors_are_one_line(tmp_path, capsys):
    status, _, err = cli(["info", str(tmp_path / "missing.safetensors")], capsys)
    assert status == 2 and "does not exist" in err
    status, _, err = cli(["info", str(tmp_path)], capsys)
    assert status == 2 and "is a folder" in err
    (tmp_path / "text.safetensors").write_text("hello")
    status, _, err = cli(["info", str(tmp_path / "text.safetensors")], capsys)
    assert status == 2 and "not a readable .safetensors file" in err
    lora = tmp_path / "plain_lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4)}, str(lora), metadata={"ss_network_dim": "2"})
    status, _, err = cli(["info", str(lora)], capsys)
    assert status == 2 and "not an InstructMoLE adapter" in err and "'info' prints the card" in err
    status, _, err = cli(["info"], capsys)
    assert status == 2 and "the following arguments are required: file" in err


def test_info_as_a_subprocess_has_no_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "instructmole", "info", str(tmp_path / "nope.safetensors")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
