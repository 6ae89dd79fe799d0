"""EMA of the trainable weights (``train.ema``): updated after each optimizer step, saved with the
checkpoints (a resumed run continues the same average) and exported beside the adapter as its own
file, which the core loads like any adapter."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from instructmole import load_adapter
from tests.training.conftest import TINY_CONFIG, run_overrides
from training.checkpoint import EMA
from training.config import load_config
from training.loop import train


def run(tiny, out: Path, *extra: str, resume: str | None = None):
    overrides = run_overrides(tiny, out, "save.report=false", "train.ema=0.5", *extra, steps=3, every=1)
    return train(load_config(TINY_CONFIG, overrides), resume=resume)


def test_ema_update_is_the_moving_average():
    ema = EMA({"w": torch.tensor([0.0, 4.0])}, 0.75)
    ema.update({"w": torch.tensor([4.0, 0.0])})
    assert ema.shadow["w"].tolist() == [1.0, 3.0]
    ema.update({"w": torch.tensor([1.0, 3.0])})
    assert ema.shadow["w"].tolist() == [1.0, 3.0]


def test_ema_adapter_is_exported_loads_and_resumes_exactly(tiny_kontext, tmp_path):
    first = run(tiny_kontext, tmp_path / "a")
    ema_file = first.output_dir / "instructmole-ema.safetensors"
    assert ema_file.is_file() and (first.output_dir / "checkpoints" / "step-0000003").is_dir()
    loaded = load_adapter(ema_file)
    assert loaded.model is not None and loaded.metadata.get("ema") == "0.5"
    plain, averaged = load_file(str(first.adapter)), load_file(str(ema_file))
    assert plain.keys() == averaged.keys()
    assert any(not torch.equal(plain[k], averaged[k]) for k in plain)
    out = tmp_path / "b"
    run(tiny_kontext, out)
    shutil.rmtree(out / "checkpoints" / "step-0000003")
    for name in ("instructmole.safetensors", "instructmole-ema.safetensors"):
        (out / name).unlink()
    resumed = run(tiny_kontext, out, resume="latest")
    assert resumed.steps == 3
    again = load_file(str(out / "instructmole-ema.safetensors"))
    assert all(torch.equal(again[k], averaged[k]) for k in averaged)
    assert all(torch.equal(v, plain[k]) for k, v in load_file(str(resumed.adapter)).items())
