"""The training benchmark runs end to end, and its three variants train what they claim to.

The timings are not checked (a smoke test on a shared CPU); the equivalences are: at init every
expert's and LoRA's B is 0, so all three variants compute the base model's flow loss; with random
expert B, ``ours`` (the trainer's council path with Gram-form orthogonality) and the ``reference
way`` (every expert materialised, dense council weights, cosines of the materialised outputs) are
the same math, so they give the same loss and the same gradients, while the plain LoRA does not.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import training
from benchmarks.training import SIZES, TrainingBench


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is fastest, and spinning OpenMP threads on a busy CI box are not."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_training_benchmark_tiny(tmp_path):
    out = tmp_path / "training.json"
    args = ["--device", "cpu", "--size", "tiny", "--rounds", "1", "--warmup", "1", "--threads", "1"]
    data = training.main([*args, "--fp8-base", "--out", str(out)])
    assert json.loads(out.read_text())["benchmark"] == "training"
    (size,) = data["sizes"].values()
    assert set(size["variants"]) == {"ours", "plain LoRA", "reference way", "ours, fp8 base"}
    for name, v in size["variants"].items():
        assert len(v["samples_ms"]) == 1 and math.isfinite(v["median_ms"]) and v["median_ms"] > 0, name
        assert all(math.isfinite(x) for x in v["first_step_losses"].values()), name
    first = {name: v["first_step_losses"]["flow"] for name, v in size["variants"].items()}
    assert first["ours"] == pytest.approx(first["plain LoRA"], rel=1e-5)  # B = 0: the base model's loss
    assert first["ours"] == pytest.approx(first["reference way"], rel=1e-5)
    assert {"ours / reference way time", "ours / plain LoRA time"} <= set(size["ratios"])


def test_runs_as_a_module_with_its_options():
    """``python -m benchmarks.training`` (the README's command) reaches the package's command line."""
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "benchmarks.training", "--help"]
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.startswith("usage: python -m benchmarks.training")
    assert "Cost of one InstructMoLE training step" in out
    for option in ("--device", "--size", "--sides", "--rounds", "--warmup", "--fp8-base", "--system-malloc", "--out"):
        assert option in out


@pytest.fixture(scope="module")
def bench():
    return TrainingBench(SIZES["tiny"], torch.device("cpu"))


def _forward_backward(bench: TrainingBench, name: str) -> dict[str, torch.Tensor]:
    variant = bench.variant(name)
    variant.optimizer.zero_grad(set_to_none=True)
    with bench.installed(variant):
        out = bench.forward_losses(variant, bench.inputs(4))
        out["loss"].backward()
    return {k: v.detach() for k, v in out.items()}


def test_variants_agree_at_init_and_ours_equals_the_reference_way(bench):
    ours, ref = bench.variant("ours"), bench.variant("reference way")
    init = {name: _forward_backward(bench, name) for name in ("ours", "plain LoRA", "reference way")}
    base = init["plain LoRA"]["flow"]
    for out in init.values():
        torch.testing.assert_close(out["flow"], base, rtol=1e-6, atol=0)
    torch.testing.assert_close(init["ours"]["loss"], init["reference way"]["loss"], rtol=1e-6, atol=0)

    # Non-trivial experts, the same weights in both MoLE variants (and in both peft LoRAs).
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, layer in ours.mole.named_layers():
            layer.B.copy_(torch.randn(layer.B.shape, generator=g) * 0.05)
        ref.mole.load_state_dict(ours.mole.state_dict())
        params = dict(bench.transformer.named_parameters())
        for name, p in params.items():
            if ".default." in name and "lora_" in name:
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
                params[name.replace(".default.", ".reference.")].copy_(p)

    out = {name: _forward_backward(bench, name) for name in ("ours", "plain LoRA", "reference way")}
    for key in ("loss", "flow", "load_balance", "orthogonality"):
        torch.testing.assert_close(out["ours"][key], out["reference way"][key], rtol=1e-5, atol=1e-7)
    assert out["ours"]["orthogonality"] > 0
    assert not torch.allclose(out["plain LoRA"]["flow"], out["ours"]["flow"], rtol=1e-4)

    theirs = dict(ref.mole.named_parameters())
    checked = 0
    for name, p in ours.mole.named_parameters():  # router, gates, experts' A and B
        assert p.grad is not None and theirs[name].grad is not None, name
        scale = p.grad.abs().max().item()
        torch.testing.assert_close(theirs[name].grad, p.grad, rtol=1e-5, atol=1e-5 * scale, msg=name)
        checked += 1
    assert checked == len(theirs)
    for name, p in bench.transformer.named_parameters():  # the peft LoRA too
        if ".default." in name and "lora_" in name:
            other = params[name.replace(".default.", ".reference.")].grad
            torch.testing.assert_close(other, p.grad, rtol=1e-5, atol=1e-5 * p.grad.abs().max().item(), msg=name)
