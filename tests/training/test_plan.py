"""The memory planner (training/plan.py): its fake-tensor estimate against real CPU steps, the options
it adds from the shapes against the trainer's own code, and its advice."""

from __future__ import annotations

import math

import pytest
import torch

from training import plan
from training.config import load_config

from .conftest import TINY_CONFIG, run_overrides


def tiny_config(tiny, tmp_path, *extra: str):
    """The tiny model at 128² (64 target + 64 reference tokens): activations worth measuring."""
    overrides = run_overrides(tiny, tmp_path / "run", "data.resolution=128", "train.batch_size=2", *extra, steps=2)
    return load_config(TINY_CONFIG, overrides)


@pytest.mark.parametrize(
    "extra",
    [
        (),
        ("model.dtype=bf16", "model.gradient_checkpointing=true", "train.mixed_precision=bf16", "adapter.lora.rank=8"),
    ],
    ids=["fp32", "bf16-checkpointing-lora"],
)
def test_the_estimate_is_within_15_percent_of_a_real_step(tiny_kontext, tmp_path, extra):
    """The estimate (fake tensors: no storage, no arithmetic) against the peak of live tensor bytes of
    the same setup and step run for real on the CPU (the quantity ``torch.cuda.max_memory_allocated``
    reports on a GPU)."""
    config = tiny_config(tiny_kontext, tmp_path, *extra)
    guess = plan.Planner(config).estimate()
    measured = plan.Planner(config, fake=False).estimate()
    assert measured.total > 1 << 20 and measured.step > 0  # a real step with real activations
    assert abs(guess.total - measured.total) <= 0.15 * measured.total, (guess, measured)
    assert guess.base == measured.base and guess.trainable == measured.trainable


def test_checkpointing_and_batch_size_move_the_estimate_the_right_way(tiny_kontext, tmp_path):
    planner = plan.Planner(tiny_config(tiny_kontext, tmp_path))
    plain = planner.estimate()
    checkpointed = planner.estimate(plan.Options(gradient_checkpointing=True))
    bigger = plan.Planner(tiny_config(tiny_kontext, tmp_path, "train.batch_size=8")).estimate()
    assert checkpointed.step < plain.step
    assert bigger.step > 2 * plain.step and bigger.base == plain.base


def test_the_options_added_from_shapes_match_the_trainers_own(tiny_kontext, tmp_path):
    """EMA, the optimizers' state and the quantized base, as the trainer's own code allocates them."""
    from instructmole.model import InstructMoLE
    from training.checkpoint import EMA
    from training.loop import _load
    from training.modules import DTYPES, TrainingModel, build_mole_config, setup_transformer
    from training.optim import build_optimizer, missing
    from training.quantize import quantize_base, quantized_bytes

    config = tiny_config(tiny_kontext, tmp_path, "train.ema=0.99")
    planner = plan.Planner(config)  # one trace: the options below are added to it from the shapes
    guess = planner.estimate()
    transformer = _load(config, ("transformer",), DTYPES[config.model.dtype]).transformer
    mole_config = build_mole_config(config, transformer)
    setup_transformer(transformer, config, mole_config)
    model = TrainingModel(transformer, InstructMoLE(mole_config), [], 1.0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    assert guess.trainable == nbytes(trainable)
    assert guess.ema == nbytes(EMA(model.trainable_state(), 0.99).shadow.values())

    shapes = tuple(tuple(p.shape) for p in trainable)
    for kind in ("adamw", "adafactor", "prodigy", "adamw8bit"):
        if missing("train.optimizer", kind):
            continue
        optimizer = build_optimizer(kind, model.parameter_groups(1e-4, 1e-4, 0.0), (0.9, 0.999), 0.0)
        for p in trainable:
            p.grad = torch.ones_like(p)
        optimizer.step()
        state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.numel() > 1]
        assert math.isclose(plan._optimizer_bytes(kind, shapes), nbytes(state), rel_tol=0.05), kind

    frozen_linears = nbytes(m.weight for m in transformer.modules() if type(m) is torch.nn.Linear)
    for kind in ("fp8", "int8", "nf4"):
        if kind == "nf4" and missing("model.quantize_base", kind):
            continue
        quantized = planner.estimate(plan.Options(gradient_checkpointing=False, quantize_base=kind))
        copy = _load(config, ("transformer",), DTYPES[config.model.dtype]).transformer.requires_grad_(False)
        quantize_base(copy, kind)
        assert math.isclose(guess.base - quantized.base, frozen_linears - quantized_bytes(copy), rel_tol=0.02), kind


def test_advice_fits_the_card_or_says_nothing_does(tiny_kontext, tmp_path):
    planner = plan.Planner(tiny_config(tiny_kontext, tmp_path))
    mine, better = planner.advise(1 << 40)
    assert better is None  # a terabyte: it fits as it is
    budget = mine.card_bytes() - (mine.base + mine.optimizer) // 2
    mine, better = planner.advise(budget)
    assert better is not None and better.card_bytes() <= budget < mine.card_bytes()
    assert better.options != mine.options
    report = planner.report(budget / plan.GIB)
    assert "does not fit" in report and better.options.describe() in report
    assert "fits a 1024 GiB card as it is" in planner.report(1024)
    assert "with any memory option" in planner.report(1 / 1024)


def test_plan_on_the_command_line(tiny_kontext, tmp_path, capsys):
    """``python -m training --plan CONFIG --gpu-memory GiB``: the estimate and the advice, no model loaded;
    mistakes are one line and exit code 2."""
    from training.cli import main

    overrides = run_overrides(tiny_kontext, tmp_path / "run", "data.resolution=128", "train.batch_size=2", steps=2)
    assert main(["--plan", str(TINY_CONFIG), "--gpu-memory", "1024", *overrides]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Memory plan: 128² target + 1 reference(s), micro-batch 2 per process, fp32 base")
    assert "peak allocated" in out and "fits a 1024 GiB card as it is." in out
    assert not (tmp_path / "run").exists()  # a plan writes nothing
    for argv, said in (
        (["--plan", "--gpu-memory", "24"], "--plan needs a config"),
        (["--plan", str(TINY_CONFIG), "--gpu-memory", "0", *overrides], "--gpu-memory 0 must be"),
        (["--plan", str(tmp_path / "missing.yaml")], "does not exist"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1, err


def test_a_config_without_model_or_data_plans_on_the_shipped_kontext_shapes(tmp_path):
    written = tmp_path / "bare.yaml"
    written.write_text("adapter:\n  rank: 16\n")
    config = plan.load_for_plan(str(written), ["data.resolution=256"])
    assert plan.transformer_config(config)["num_single_layers"] == 38 and plan.references_of(config) == 1


def test_a_plan_that_cannot_be_made_never_stops_the_run(tiny_kontext, tmp_path, monkeypatch):
    """At a run's start the plan is advice: a failure in it is one line, and the run goes on."""
    config = tiny_config(tiny_kontext, tmp_path)

    def broken(*args, **kwargs):
        raise RuntimeError("no fake kernel for aten.some_op\nsecond line")

    monkeypatch.setattr(plan, "_trace", broken)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"total_memory": 24 << 30}))
    said = plan.plan_for_device(config, torch.device("cpu"))
    assert said == "memory plan unavailable (RuntimeError: no fake kernel for aten.some_op)"
