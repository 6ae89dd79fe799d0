"""The trainer end to end on the tiny pipeline: it learns, exports what the nodes load, resumes exactly
after a SIGKILL (also one in the middle of a checkpoint save), and reuses its cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import instructmole as im
from tests.training.conftest import ROOT, TINY_CONFIG, run_overrides
from training.checkpoint import checkpoints, resolve_resume
from training.config import load_config
from training.loop import train


def run(tiny, out: Path, *extra: str, resume: str | None = None, **kw):
    return train(load_config(TINY_CONFIG, run_overrides(tiny, out, *extra, **kw)), resume=resume)


def report(out: Path, step: int) -> dict:
    return json.loads((out / "reports" / f"step-{step:07d}.json").read_text())["metrics"]


def assert_same_adapter(a: Path, b: Path, atol: float = 0.0) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    worst = max(float((ta[k] - tb[k]).abs().max()) for k in ta)
    assert worst <= atol, f"adapters differ by {worst}"


@pytest.fixture(scope="module")
def uninterrupted(tiny_kontext, tmp_path_factory) -> Path:
    """The reference run of the resume tests: 24 steps, checkpoints every 6."""
    out = tmp_path_factory.mktemp("uninterrupted")
    return run(tiny_kontext, out).adapter


def test_end_to_end_learns_and_exports_an_adapter_the_core_loads(tiny_kontext, tmp_path, monkeypatch):
    out = tmp_path / "run"
    result = run(tiny_kontext, out, "train.lr=3e-3", "train.gate_lr=3e-3", steps=60, every=30)
    start, end = report(out, 0), report(out, 60)
    assert start["flow_vs_base"] == 0.0  # B starts at zero: at init the adapter is the base model
    assert end["heldout_flow"] < 0.97 * start["heldout_flow"], (start, end)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(2, 61, 2))
    assert {"flow", "load_balance", "orthogonality", "aux_weight", "lr_adapter", "lr_gates"} <= set(lines[0])
    assert [p.name for _, p in checkpoints(out)] == ["step-0000030", "step-0000060"]
    assert (out / "checkpoints" / "step-0000060" / "report.png").is_file()

    adapter = im.load_adapter(result.adapter)
    assert adapter.config.num_experts == 4 and adapter.config.text_length == 16  # tiny_demo.yaml's
    meta = json.loads(adapter.metadata["training"])
    assert meta["steps"] == 60 and meta["config"]["train"]["max_steps"] == 60 and len(meta["data"]) == 16
    trained = result.model.mole.layer(adapter.config.layer_names[0]).B
    torch.testing.assert_close(adapter.model.layer(adapter.config.layer_names[0]).B, trained.detach())

    from diffusers import FluxTransformer2DModel

    from instructmole.tiny import kontext_inputs

    transformer = FluxTransformer2DModel.from_pretrained(tiny_kontext["model"] / "transformer").eval()
    inputs = kontext_inputs(torch.randn(1, 32, 64), torch.randn(1, 32), size=2)
    with torch.no_grad():
        base = transformer(**inputs)[0]
        with im.attach(transformer, adapter):
            edited = transformer(**inputs)[0]
    assert (edited - base).abs().max() > 1e-4

    # A second run on the same data reuses the cache: no encoder is loaded or called.
    import training.loop as loop

    def refuse(*_a, **_k):
        raise AssertionError("the cache was complete: nothing should be encoded")

    monkeypatch.setattr(loop, "encode_texts", refuse)
    monkeypatch.setattr(loop, "encode_latents", refuse)
    again = run(tiny_kontext, tmp_path / "again", steps=2, every=2)
    assert again.cache_entries_written == 0


def _start(tiny, out: Path, script: str | None = None) -> subprocess.Popen:
    args = ["--config", str(TINY_CONFIG), *run_overrides(tiny, out)]
    cmd = [sys.executable, "-m", "training", *args] if script is None else [sys.executable, "-c", script, *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {path} appeared:\n{proc.stdout.read().decode()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.01)


def test_sigkill_mid_run_then_resume_ends_with_the_same_adapter(tiny_kontext, tmp_path, uninterrupted):
    out = tmp_path / "killed"
    proc = _start(tiny_kontext, out)
    _wait_for(out / "checkpoints" / "step-0000006" / "checkpoint.json", proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (out / "instructmole.safetensors").exists()  # really stopped mid-run
    resumed = run(tiny_kontext, out, resume="latest")
    assert resumed.steps == 24
    assert_same_adapter(resumed.adapter, uninterrupted, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(2, 25, 2))  # the killed run's lines after its checkpoint were replaced


KILL_IN_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    import training.loop as loop
    from training.cli import main

    save = loop.save_checkpoint

    def dying_save(accelerator, output_dir, step, keep, marker, write_extras):
        def extras(folder):
            write_extras(folder)  # state, adapter and report are on disk, the marker and rename are not
            if step == 12:
                os.kill(os.getpid(), signal.SIGKILL)
        return save(accelerator, output_dir, step, keep, marker, extras)

    loop.save_checkpoint = dying_save
    sys.exit(main(sys.argv[1:]))
    """
)


def test_sigkill_during_a_checkpoint_save_leaves_the_previous_one_usable(tiny_kontext, tmp_path, uninterrupted):
    out = tmp_path / "killed_in_save"
    proc = _start(tiny_kontext, out, KILL_IN_SAVE)
    assert proc.wait(timeout=180) == -signal.SIGKILL, proc.stdout.read().decode()[-3000:]
    stale = out / "checkpoints" / ".tmp-step-0000012"
    assert stale.is_dir() and (stale / "model.safetensors").is_file()  # a half-made checkpoint ...
    assert resolve_resume(out, "latest") == out / "checkpoints" / "step-0000006"  # ... that resume never picks
    resumed = run(tiny_kontext, out, resume="latest")
    assert not stale.exists()  # the next save cleared it
    assert_same_adapter(resumed.adapter, uninterrupted, atol=1e-6)


def test_resume_refuses_a_checkpoint_of_another_run(tiny_kontext, tmp_path, uninterrupted):
    from training.errors import CheckpointError

    checkpoint = uninterrupted.parent / "checkpoints" / "step-0000024"
    with pytest.raises(CheckpointError, match=r"was trained with another train\.seed"):
        run(tiny_kontext, tmp_path / "other", "train.seed=5", resume=str(checkpoint))
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        run(tiny_kontext, tmp_path / "other", resume=str(tmp_path / "nowhere"))


def test_memory_savers_and_plain_lora(tiny_kontext, tmp_path):
    """fp8 storage of the frozen base (``model.fp8_base``, the old name of ``model.quantize_base=fp8``: every
    frozen Linear, also those under MoLE or LoRA), checkpointing, a peft LoRA."""
    out = tmp_path / "savers"
    result = run(
        tiny_kontext,
        out,
        "model.fp8_base=true",
        "model.gradient_checkpointing=true",
        "adapter.lora.rank=2",
        "adapter.lora.alpha=4",
        "save.report=false",
        steps=3,
        every=3,
    )
    from training.quantize import QuantizedLinear

    transformer = result.model.transformer
    add_q = transformer.transformer_blocks[0].attn.add_q_proj  # a frozen Linear
    assert isinstance(add_q, QuantizedLinear) and add_q.weight_data.dtype == torch.float8_e4m3fn
    assert isinstance(transformer.transformer_blocks[0].ff.net[2], QuantizedLinear)  # carries experts
    to_q = transformer.transformer_blocks[0].attn.to_q
    assert isinstance(to_q.base_layer, QuantizedLinear) and to_q.lora_A["default"].weight.dtype == torch.float32
    assert to_q.lora_B["default"].weight.abs().sum() > 0  # the LoRA trained
    adapter = im.load_adapter(result.adapter)
    parts = {p.module: p for p in adapter.lora_parts()}
    assert "transformer_blocks.0.attn.to_q" in parts and "x_embedder" in parts
    assert parts["x_embedder"].scale == 2.0  # alpha 4 / rank 2
    assert adapter.lora["transformer.transformer_blocks.0.attn.to_q.alpha"] == 4.0


def test_flow_loss_is_the_mse_on_target_tokens(tiny_kontext):
    from instructmole import InstructMoLE
    from instructmole.tiny import tiny_flux
    from training.modules import TrainingModel, build_mole_config

    cfg = load_config(TINY_CONFIG, run_overrides(tiny_kontext, Path("unused")))
    transformer = tiny_flux(0)
    model = TrainingModel(transformer, InstructMoLE(build_mole_config(cfg, transformer)), [], 1.0).eval()
    g = torch.Generator().manual_seed(0)
    hidden, target = torch.randn(2, 8, 64, generator=g), torch.randn(2, 4, 64, generator=g)
    text, pooled = torch.randn(2, 32, 64, generator=g), torch.randn(2, 32, generator=g)
    ids = torch.zeros(8, 3)
    args = {"img_ids": ids, "txt_ids": torch.zeros(32, 3), "guidance": torch.ones(2), "sigma": torch.tensor([0.3, 0.8])}
    with torch.no_grad():
        got = model(hidden, text, pooled, target=target, seeds=torch.tensor([1, 2]), **args)
        pred = transformer(
            hidden, text, pooled, args["sigma"], ids, args["txt_ids"], args["guidance"], return_dict=False
        )
    want = (pred[0][:, :4] - target).pow(2).mean(dim=(1, 2))
    torch.testing.assert_close(got["flow"], want)


def test_a_nan_loss_stops_with_a_clear_error_and_the_state_before_it_saved(tiny_kontext, tmp_path, monkeypatch):
    from training.errors import TrainingError
    from training.modules import TrainingModel

    forward, calls = TrainingModel.forward, []

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3 and self.training:  # the third training step
            out["flow"] = out["flow"] * float("nan")
        return out

    monkeypatch.setattr(TrainingModel, "forward", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(TrainingError, match=r"the loss became non-finite at step 3 \(flow nan") as err:
        run(tiny_kontext, out, "save.report=false", steps=10, every=10)
    assert "lower train.lr" in str(err.value)
    assert [p.name for _, p in checkpoints(out)] == ["step-0000002"]  # the last good state, resumable
    state = load_file(str(out / "checkpoints" / "step-0000002" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in state.values())


def test_samples_are_rendered_at_checkpoints(tiny_kontext, tmp_path):
    reference = next((tiny_kontext["manifest"].parent / "images").glob("0000.png"))
    items = f'sample.items=[{{instruction: "make it darker", references: ["{reference}"]}}]'
    out = tmp_path / "samples"
    run(tiny_kontext, out, items, "sample.steps=2", "save.report=false", steps=2, every=2)
    from PIL import Image

    sheet = Image.open(out / "samples" / "step-0000002.png")
    assert sheet.width > 2 * 32 and sheet.height > 32  # the reference, then the edit
    assert (out / "checkpoints" / "step-0000002" / "samples.png").is_file()


def test_a_manifest_without_tasks_or_holdout_rows_still_reports(tiny_kontext, tmp_path):
    """Most real data sets carry no task tags: the report then shows the overall expert use."""
    lines = [json.loads(line) for line in tiny_kontext["manifest"].read_text().splitlines()]
    untagged = tmp_path / "untagged.jsonl"
    root = tiny_kontext["manifest"].parent
    rows = [
        {
            "instruction": r["instruction"],
            "target": str(root / r["target"]),
            "references": [str(root / p) for p in r["references"]],
            "split": r["split"],
        }
        for r in lines
    ]
    untagged.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "untagged"
    run(tiny_kontext, out, f"data.manifest={untagged}", steps=2, every=2)
    metrics = report(out, 2)
    assert {"heldout_flow", "base_flow", "balance", "orthogonality"} <= set(metrics) and "distinctness" not in metrics
    assert json.loads((out / "reports" / "step-0000002.json").read_text())["tasks"] == ["all rows"]
    no_holdout = tmp_path / "train_only.jsonl"
    no_holdout.write_text("".join(json.dumps(r) + "\n" for r in rows if r["split"] == "train"))
    out = tmp_path / "train_only"
    run(tiny_kontext, out, f"data.manifest={no_holdout}", steps=2, every=2)
    assert "no held-out rows" in json.loads((out / "reports" / "step-0000002.json").read_text())["note"]


def test_training_leaves_the_process_cudnn_attention_setting_as_it_found_it():
    """The trainer switches cuDNN's SDPA off for its own run only (on CUDA); the caller's setting,
    whatever it was, comes back afterwards, also when the run fails."""
    import torch

    from training.loop import cudnn_attention_restored

    before = torch.backends.cuda.cudnn_sdp_enabled()
    for start in (True, False):
        torch.backends.cuda.enable_cudnn_sdp(start)
        with pytest.raises(RuntimeError), cudnn_attention_restored():
            torch.backends.cuda.enable_cudnn_sdp(not start)  # what a CUDA run does inside
            raise RuntimeError("the run failed")
        assert torch.backends.cuda.cudnn_sdp_enabled() is start
    torch.backends.cuda.enable_cudnn_sdp(before)
