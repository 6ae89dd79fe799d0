"""``model.block_swap`` in a real training run: the trainer wires training/offload.py's BlockSwap in, and
a run with blocks swapped trains the same weights as one without, resumes with another count, and
refuses a count larger than the model's blocks in one sentence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.training.conftest import TINY_CONFIG, run_overrides
from training.config import load_config
from training.errors import ConfigError
from training.loop import train


def run(tiny, out: Path, *extra: str, resume: str | None = None, steps: int = 3):
    overrides = run_overrides(
        tiny, out, "save.report=false", "adapter.lora.rank=2", "train.lr=3e-3", *extra, steps=steps, every=1
    )
    return train(load_config(TINY_CONFIG, overrides), resume=resume)


def test_a_run_with_blocks_swapped_trains_the_same_weights_and_resumes_with_another_count(tiny_kontext, tmp_path):
    plain = load_file(str(run(tiny_kontext, tmp_path / "plain").adapter))
    swapped_run = run(tiny_kontext, tmp_path / "swap", "model.block_swap=2", "model.gradient_checkpointing=true")
    swapped = load_file(str(swapped_run.adapter))
    assert swapped.keys() == plain.keys()
    assert all(torch.equal(swapped[k], plain[k]) for k in plain)  # checkpointing and swap: the same arithmetic
    resumed = run(tiny_kontext, tmp_path / "swap", "model.block_swap=1", resume="latest", steps=4)
    assert resumed.steps == 4  # a resumed run may keep more or fewer blocks on the CPU


def test_a_block_swap_count_beyond_the_models_blocks_is_one_sentence(tiny_kontext, tmp_path):
    with pytest.raises(ConfigError, match=r"model\.block_swap") as err:
        run(tiny_kontext, tmp_path / "too_many", "model.block_swap=99")
    assert "\n" not in str(err.value)
