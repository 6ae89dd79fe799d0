"""``train.optimizer``: AdamW (torch), AdamW 8-bit (bitsandbytes), Adafactor (transformers), Prodigy
(prodigyopt). Each trains the tiny model, saves its state through accelerate's ``save_state`` and resumes
bit for bit; a missing library is one sentence naming the option and the pip command."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import instructmole as im
from tests.training.conftest import TINY_CONFIG, run_overrides
from training.config import load_config
from training.errors import ConfigError
from training.loop import train
from training.optim import OPTIMIZERS, build_optimizer

# The learning rates each optimizer trains the tiny model with in 3 steps (Prodigy's is its multiplier).
LR = {"adamw8bit": "3e-3", "adafactor": "3e-3", "prodigy": "1"}


def config(tiny, *extra: str):
    return load_config(TINY_CONFIG, run_overrides(tiny, Path("unused"), *extra))


def groups(*sizes: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=g)) for n in sizes]
    return [
        {"params": params[:-1], "lr": 1e-3, "weight_decay": 1e-4, "name": "adapter"},
        {"params": params[-1:], "lr": 5e-4, "weight_decay": 1e-4, "name": "gates"},
    ]


def step(optimizer: torch.optim.Optimizer, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.randn(p.shape, generator=g)
    optimizer.step()


def test_each_optimizer_is_what_its_name_says_with_the_groups_learning_rates():
    made = {name: build_optimizer(name, groups(8192, 64, 16), (0.9, 0.999), 1e-4) for name in OPTIMIZERS}
    assert type(made["adamw"]).__name__ == "AdamW" and made["adamw"].defaults["fused"]
    assert type(made["adamw8bit"]).__module__.startswith("bitsandbytes")
    assert type(made["adafactor"]).__name__ == "Adafactor" and type(made["prodigy"]).__name__ == "Prodigy"
    for name, optimizer in made.items():
        # Prodigy: one step size for all weights (it refuses different multipliers): the gates take train.lr
        assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-3 if name == "prodigy" else 5e-4]
        step(optimizer)
    big = made["adamw8bit"].param_groups[0]["params"][0]
    assert made["adamw8bit"].state[big]["state1"].dtype == torch.uint8  # 8-bit moments (4096 elements and up)
    matrix = torch.nn.Parameter(torch.randn(64, 32))
    adafactor = build_optimizer("adafactor", [{"params": [matrix], "lr": 1e-3, "weight_decay": 0.0}], (0.9, 0.999), 0)
    step(adafactor)
    state = adafactor.state[matrix]
    assert "exp_avg" not in state and state["exp_avg_sq_row"].shape == (64,)  # factored, no first moment


@pytest.mark.parametrize(
    ("optimizer", "module", "requirement"),
    [
        ("adamw8bit", "bitsandbytes", "bitsandbytes>=0.50"),
        ("prodigy", "prodigyopt", "prodigyopt>=1.1"),
        ("adafactor", "transformers", "transformers>=4.44"),
    ],
)
def test_a_missing_library_is_one_sentence_with_the_pip_command(
    tiny_kontext, monkeypatch, optimizer, module, requirement
):
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
    with pytest.raises(ConfigError) as err:
        config(tiny_kontext, f"train.optimizer={optimizer}", "train.lr=1")
    assert str(err.value) == (
        f"train.optimizer={optimizer} needs {module}, which cannot be imported: pip install '{requirement}'"
    )
    if optimizer != "adafactor":  # building it says the same (transformers' Adafactor is imported from its module)
        with pytest.raises(ConfigError, match=rf"train\.optimizer={optimizer} needs {module}"):
            build_optimizer(optimizer, groups(8, 8), (0.9, 0.999), 0.0)


def test_the_optimizer_key_and_prodigys_learning_rate_are_checked(tiny_kontext):
    assert config(tiny_kontext).train.optimizer == "adamw"
    choices = "adamw, adamw8bit, adafactor, prodigy"
    with pytest.raises(ConfigError, match=rf"train\.optimizer='lion' must be one of: {choices}"):
        config(tiny_kontext, "train.optimizer=lion")
    with pytest.raises(ConfigError, match=r"train\.optimizer=prodigy finds the step size itself .* set train\.lr=1"):
        config(tiny_kontext, "train.optimizer=prodigy")  # the default lr, 1e-4 (tiny_demo's 1e-3), would not train
    assert config(tiny_kontext, "train.optimizer=prodigy", "train.lr=1").train.lr == 1.0


def run(tiny, out: Path, optimizer: str, resume: str | None = None):
    overrides = run_overrides(
        tiny,
        out,
        "save.report=false",
        f"train.optimizer={optimizer}",
        f"train.lr={LR[optimizer]}",
        f"train.gate_lr={LR[optimizer]}",
        "log.every=1",
        steps=3,
        every=1,
    )
    return train(load_config(TINY_CONFIG, overrides), resume=resume)


@pytest.mark.parametrize("optimizer", ["adamw8bit", "adafactor", "prodigy"])
def test_each_optimizer_trains_saves_its_state_and_resumes_exactly(optimizer, tiny_kontext, tmp_path):
    out = tmp_path / optimizer
    first = run(tiny_kontext, out, optimizer)
    trained = load_file(str(first.adapter))
    experts_b = [k for k in trained if k.endswith(".B")]
    assert experts_b and any(trained[k].abs().sum() > 0 for k in experts_b)  # it trained (B starts at zero)
    assert im.load_adapter(first.adapter).model is not None
    saved = torch.load(out / "checkpoints" / "step-0000003" / "optimizer.bin", weights_only=False)
    assert len(saved["state"]) == len(first.model.trainable_state())  # every trainable tensor's state
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(line["flow"])) for line in lines)
    if optimizer == "prodigy":  # its estimated step size is logged beside the multipliers
        assert lines[-1]["d_adapter"] > 0 and lines[-1]["lr_adapter"] == lines[-1]["lr_gates"] == 1.0
    # an interrupted run (its last checkpoint lost) resumed from step 2 ends with the same weights
    shutil.rmtree(out / "checkpoints" / "step-0000003")
    first.adapter.unlink()
    resumed = run(tiny_kontext, out, optimizer, resume="latest")
    assert resumed.steps == 3
    again = load_file(str(resumed.adapter))
    assert again.keys() == trained.keys()
    assert all(torch.equal(again[k], trained[k]) for k in trained)
