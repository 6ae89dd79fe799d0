"""The training benchmark runs end to end, and its three variants train what they claim to.

The timings are not checked (a smoke test on a shared CPU); the equivalences are: at init every
expert's and LoRA's B is 0, so all three variants compute the base model's flow loss; with random
expert B, ``ours`` (the trainer's council path with Gram-form orthogonality) and the ``reference
way`` (every expert materialised, dense council weights, cosines of the materialised outputs) are
the same math, so they give the same loss and the same gradients, while the plain LoRA does not.

The memory options (``--quantize-base``, ``--block-swap``, ``--optimizer``, ``--memory-options``): each
row has numbers, block swap leaves the loss as it was, a missing library is a "skipped" row and an
error a "failed" one, and the run goes on.
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
from benchmarks.training import bench as bench_module
from benchmarks.training.options import ALL_BLOCKS, DEFAULT_OPTIONS, MemoryOption, parse_option, parse_options
from benchmarks.training.run import parse_args
from benchmarks.training.setting import FP8_NAME

TINY = ["--device", "cpu", "--size", "tiny", "--rounds", "1", "--warmup", "1", "--threads", "1"]


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
    for option in ("--quantize-base", "--block-swap", "--optimizer", "--memory-options"):
        assert option in out


def test_memory_options_give_one_row_each_with_numbers(tmp_path, capsys):
    out = tmp_path / "memory.json"
    data = training.main([*TINY, "--memory-options", "--out", str(out)])
    assert json.loads(out.read_text())["mode"] == "memory options"
    (size,) = data["sizes"].values()
    names = [o.variant_name for o in DEFAULT_OPTIONS]
    assert list(size["variants"]) == names
    assert names[:2] == ["ours", FP8_NAME]
    rows = size["variants"]
    for name, v in rows.items():
        assert v["status"] == "ok" and v["reason"] is None, (name, v)
        assert len(v["samples_ms"]) == 1 and v["median_ms"] > 0, name
        assert v["peak_gib"] > 0 and v["state_gib"] > 0, name  # CPU: frozen + state + the step's RSS
        assert all(math.isfinite(x) for x in v["first_step_losses"].values()), name
    assert [v["option"]["spec"] for v in rows.values()] == [o.spec for o in DEFAULT_OPTIONS]
    # Small enough to hold all at once: timed in interleaved rounds, so every row has a paired ratio.
    assert data["config"]["timing"].startswith("interleaved rounds over every option")
    assert all("vs_ours_paired" in v for v in rows.values()) and rows["ours"]["vs_ours_paired"] == 1.0
    base, nf4 = rows["ours"], rows["ours, nf4 base"]
    for name in ("ours, fp8 base", "ours, int8 base", "ours, nf4 base"):
        assert rows[name]["frozen_gib"] < base["frozen_gib"], name
    # Block swap moves bytes, not maths: the same loss; the swapped weights are counted apart.
    for swapped, unswapped in (("ours, block swap all", base), ("ours, nf4 base + block swap all", nf4)):
        v = rows[swapped]
        assert v["first_step_losses"] == pytest.approx(unswapped["first_step_losses"], rel=1e-6), swapped
        assert v["option"]["model.block_swap"] == 4 and v["host_gib"] > 0
        assert v["frozen_gib"] < unswapped["frozen_gib"]
    assert rows["ours, nf4 base"]["first_step_losses"] != base["first_step_losses"]  # quantized: another base
    report = capsys.readouterr().out
    assert "| size | variant | median ms |" in report and "swapped to CPU GiB" in report
    assert "each option on its own transformer" in report


def test_a_missing_library_or_an_error_is_a_row_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now fails, as where it is absent

    def broken(*_args, **_kwargs):
        raise RuntimeError("no room for the blocks\nsecond line")

    monkeypatch.setattr(bench_module, "BlockSwap", broken)
    specs = "base,nf4,adamw8bit,swap-all,int8"
    data = training.main([*TINY, "--memory-options", specs, "--out", str(tmp_path / "m.json")])
    rows = next(iter(data["sizes"].values()))["variants"]
    assert list(rows) == ["ours", "ours, nf4 base", "ours, AdamW 8-bit", "ours, block swap all", "ours, int8 base"]
    for name in ("ours", "ours, int8 base"):
        assert rows[name]["status"] == "ok" and rows[name]["median_ms"] > 0
    for name, key in (
        ("ours, nf4 base", "model.quantize_base=nf4"),
        ("ours, AdamW 8-bit", "train.optimizer=adamw8bit"),
    ):
        assert rows[name]["status"] == "skipped" and rows[name]["samples_ms"] == [], name
        assert rows[name]["reason"].startswith(f"{key} needs bitsandbytes"), rows[name]["reason"]
    failed = rows["ours, block swap all"]
    assert failed["status"] == "failed" and failed["reason"] == "RuntimeError: no room for the blocks"
    report = capsys.readouterr().out
    assert "| ours, nf4 base | skipped: model.quantize_base=nf4 needs bitsandbytes" in report
    assert "| ours, block swap all | failed: RuntimeError: no room for the blocks |" in report


def test_one_memory_option_beside_the_comparison(tmp_path):
    args = ["--quantize-base", "int8", "--block-swap", "all", "--optimizer", "adafactor"]
    data = training.main([*TINY, *args, "--out", str(tmp_path / "t.json")])
    assert data["mode"] == "comparison" and data["config"]["memory_options"] == ["int8+adafactor+swap-all"]
    (size,) = data["sizes"].values()
    name = "ours, int8 base + Adafactor + block swap all"
    assert list(size["variants"]) == ["ours", "plain LoRA", "reference way", name]
    extra = size["variants"][name]
    assert extra["median_ms"] > 0 and "vs_ours" in extra and "vs_ours_paired" not in extra
    assert {"ours / reference way time", "ours / plain LoRA time"} <= set(size["ratios"])


def test_memory_flags_and_specs():
    assert parse_args(["--fp8-base"]).extra == MemoryOption("fp8") == parse_args(["--quantize-base", "fp8"]).extra
    assert MemoryOption("fp8").variant_name == FP8_NAME
    assert parse_args([]).extra.is_baseline and parse_args([]).memory_options is None
    args = parse_args(["--block-swap", "all", "--optimizer", "adamw8bit"])
    assert args.extra == MemoryOption("none", ALL_BLOCKS, "adamw8bit")
    assert parse_args(["--memory-options"]).options == DEFAULT_OPTIONS
    assert parse_args(["--memory-options", "base, nf4+swap3"]).options == (MemoryOption(), MemoryOption("nf4", 3))
    for bad in (
        ["--fp8-base", "--quantize-base", "int8"],
        ["--memory-options", "--optimizer", "prodigy"],
        ["--memory-options", "fp8+int8"],
        ["--block-swap", "some"],
    ):
        with pytest.raises(SystemExit) as exc:
            parse_args(bad)
        assert exc.value.code == 2, bad
    with pytest.raises(SystemExit, match="size tiny has 4"):
        training.main([*TINY, "--block-swap", "5"])
    for option in DEFAULT_OPTIONS:  # a spec reads back as its option
        assert parse_option(option.spec) == option
    assert parse_options("nf4,base,nf4") == (MemoryOption("nf4"), MemoryOption())
    assert MemoryOption("nf4", ALL_BLOCKS, "prodigy").overrides(SIZES["tiny"]) == [
        "model.quantize_base=nf4",
        "model.block_swap=4",
        "train.optimizer=prodigy",
        "train.lr=1",
    ]


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


def test_interleaved_timing_drops_a_variant_that_fails_and_goes_on(bench):
    """``interleave(tolerant=True)``: the failing variant's record says why; the others keep their rounds."""
    from benchmarks.training.measure import Record, interleave

    class Broken:
        name = "broken"

        def install(self) -> None:
            raise RuntimeError("kernel missing\nmore")

        def uninstall(self) -> None:
            pass

    ours = bench.variant("ours")
    records = {"ours": Record("ours", []), "broken": Record("broken", [])}
    interleave([(bench, ours), (bench, Broken())], 4, records, rounds=2, warmup=1, tolerant=True)
    assert records["broken"].status == "failed" and records["broken"].reason == "RuntimeError: kernel missing"
    assert len(records["ours"].samples) == 2 and records["ours"].status == "ok"
    with pytest.raises(RuntimeError, match="kernel missing"):
        interleave([(bench, Broken())], 4, {"broken": Record("broken", [])}, rounds=1, warmup=1)
