"""The trainer's maths through ``train()``: per-token routing trains, load balancing over the whole
optimizer step, warm-up under every schedule, partial batches, the report's guidance."""

from __future__ import annotations

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
            tiny_kontext, out, f"train.gradient_accumulation={ga}", "train.orthogonality=0", "log.every=1",
            steps=2, every=2,
        )
        results[ga] = (metrics(out), load_file(str(result.adapter)))
    (lines1, adapter1), (lines8, adapter8) = results[1], results[8]
    for a, b in zip(lines1, lines8, strict=True):
        assert b["load_balance"] == pytest.approx(a["load_balance"], rel=1e-5)
        assert b["flow"] == pytest.approx(a["flow"], rel=1e-5)
    assert lines1[0]["load_balance"] > 0
    worst = max(float((adapter1[k].float() - adapter8[k].float()).abs().max()) for k in adapter1)
    assert worst < 1e-5, worst
