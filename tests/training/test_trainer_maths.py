"""The trainer's maths through ``train()``: per-token routing trains, load balancing over the whole
optimizer step, warm-up under every schedule, partial batches, the report's guidance."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.training.conftest import TINY_CONFIG, run_overrides
from training.config import load_config
from training.loop import train

TOKEN_LAYER = "single_transformer_blocks.0.proj_out"


def run(tiny, out: Path, *extra: str, **kw):
    return train(load_config(TINY_CONFIG, run_overrides(tiny, out, "save.report=false", *extra, **kw)))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_token_routed_layer_trains_three_steps(tiny_kontext, tmp_path):
    """Row seeds span 63 bits; the token-noise seed derived from them once overflowed at step 1."""
    out = tmp_path / "token"
    result = run(tiny_kontext, out, f"adapter.token_routed=[{TOKEN_LAYER}]", "log.every=1", steps=3, every=3)
    assert result.steps == 3
    lines = metrics(out)
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert all(line["load_balance_token"] > 0 for line in lines)
    layer = result.model.mole.layer(TOKEN_LAYER)
    assert layer.B.detach().abs().sum() > 0  # its experts trained
    assert layer.gate.weight.shape[1] == layer.A.shape[1]  # the gate reads the layer input (token routing)
    saved = load_file(str(result.adapter))
    assert any(TOKEN_LAYER in key for key in saved)
    assert all(torch.isfinite(v).all() for v in saved.values())


def test_gradient_accumulation_trains_what_one_batch_trains(tiny_kontext, tmp_path):
    """Batch 8 × accumulation 1 and 8 micro-batches of 1: the same rows and draws per step, the same
    load-balancing loss (its statistics cover the whole optimizer step) and the same flow loss.
    Orthogonality is left out: its Gram matrix is per micro-batch (units: tokens), documented."""
    results = {}
    for ga in (1, 8):
        out = tmp_path / f"ga{ga}"
        result = run(
            tiny_kontext,
            out,
            f"train.gradient_accumulation={ga}",
            "train.orthogonality=0",
            "log.every=1",
            steps=2,
            every=2,
        )
        results[ga] = (metrics(out), load_file(str(result.adapter)))
    (lines1, adapter1), (lines8, adapter8) = results[1], results[8]
    for a, b in zip(lines1, lines8, strict=True):
        assert b["load_balance"] == pytest.approx(a["load_balance"], rel=1e-5)
        assert b["flow"] == pytest.approx(a["flow"], rel=1e-5)
    assert lines1[0]["load_balance"] > 0
    worst = max(float((adapter1[k].float() - adapter8[k].float()).abs().max()) for k in adapter1)
    assert worst < 1e-5, worst


def test_no_training_row_is_left_out_and_the_buckets_are_printed(tiny_kontext, tmp_path, capsys, monkeypatch):
    """The issue's experiment on the tiny data: 3 wide rows and 3 rows with two references added to the
    manifest (groups smaller than the batch of 8). ``--check`` and the run's start print every bucket;
    one epoch of steps trains every training row."""
    from PIL import Image

    from training.preflight import run_checks
    from training.recipe import MicroBatches

    root = tiny_kontext["manifest"].parent
    rows = [json.loads(line) for line in tiny_kontext["manifest"].read_text().splitlines()]
    for r in rows:
        r["target"], r["references"] = str(root / r["target"]), [str(root / p) for p in r["references"]]
    for i in range(3):
        wide = tmp_path / f"wide{i}.png"
        Image.new("RGB", (64, 32), (40 * i, 90, 200 - 40 * i)).save(wide)
        wide_row = {"instruction": "invert the colors", "target": str(wide), "references": [str(wide)]}
        rows.append({**wide_row, "split": "train"})
        two = rows[i]["references"] + rows[i + 6]["references"]
        rows.append({**rows[i], "references": two, "split": "train"})
    manifest = tmp_path / "odd.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [f"data.manifest={manifest}", f"data.cache_dir={tmp_path / 'cache'}"]

    config = load_config(TINY_CONFIG, run_overrides(tiny_kontext, tmp_path / "check", *overrides))
    lines = run_checks(config)
    train_rows = sum(r["split"] == "train" for r in rows)
    assert f"{train_rows} training rows in 3 bucket(s), batches of 8 rows:" in lines
    assert any(line.endswith(": 3 rows -> 1 partial batch of 3 rows") and "2 references" in line for line in lines)
    assert sum(line.endswith(": 3 rows -> 1 partial batch of 3 rows") for line in lines) == 2
    epoch = next(int(line.split()[0]) for line in lines if "batches per epoch" in line)

    seen: list[int] = []
    getitem = MicroBatches.__getitem__

    def record(self, micro):
        mb = getitem(self, micro)
        seen.extend(mb.rows)
        return mb

    monkeypatch.setattr(MicroBatches, "__getitem__", record)
    capsys.readouterr()
    run(tiny_kontext, tmp_path / "run", *overrides, steps=epoch, every=epoch)
    printed = capsys.readouterr().err
    assert f"{train_rows} training rows in 3 bucket(s)" in printed and "2 references: 3 rows" in printed
    assert sorted(seen) == [i for i, r in enumerate(rows) if r["split"] == "train"]  # each row once in the epoch


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_warmup_works_with_every_schedule(schedule):
    from training.recipe import lr_scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    scheduler = lr_scheduler(optimizer, schedule, warmup_steps=4, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:5] == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3])  # linear warm-up from 0
    if schedule == "constant":
        assert lrs[4:] == pytest.approx([1e-3] * 16)
    else:
        assert all(a > b for a, b in itertools.pairwise(lrs[4:]))  # then it decays
    no_warmup = lr_scheduler(torch.optim.AdamW([param], lr=1e-3), schedule, warmup_steps=0, total_steps=20)
    assert no_warmup.get_last_lr()[0] == pytest.approx(1e-3)


def test_the_report_measures_flow_losses_at_the_trained_guidance(tiny_kontext, tmp_path, monkeypatch):
    from training.modules import TrainingModel

    forward, seen = TrainingModel.forward, {"train": set(), "eval": set()}

    def spy(self, *args, guidance=None, **kwargs):
        seen["train" if self.training else "eval"].update(guidance.tolist())
        return forward(self, *args, guidance=guidance, **kwargs)

    monkeypatch.setattr(TrainingModel, "forward", spy)
    out = tmp_path / "guidance"
    train(load_config(TINY_CONFIG, run_overrides(tiny_kontext, out, "train.guidance=3.5", steps=1, every=1)))
    assert seen == {"train": {3.5}, "eval": {3.5}}
    assert (out / "reports" / "step-0000001.json").is_file()
