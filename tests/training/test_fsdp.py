"""``train.fsdp``: the FSDP2 plugin, its refusals, and real two-process runs.

accelerate selects FSDP only on accelerators (a CPU-only multi-process run is MULTI_CPU), but torch 2.13's
``fully_shard`` runs on a gloo CPU group; ``training/fsdp.py``'s test switch (``FORCE_CPU_ENV``) sets
accelerate's state to FSDP there, so the trainer's whole FSDP path (sharding, routing outside the forward,
checkpoints of the trainable weights, resume, export) runs here with two CPU processes. The CUDA test at the
end runs the same path on two GPUs, without the switch, and skips elsewhere.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from instructmole import load_adapter
from tests.training.conftest import ROOT, TINY_CONFIG, run_overrides
from training.config import load_config
from training.errors import ConfigError, TrainingError
from training.fsdp import BLOCK_CLASSES, FORCE_CPU_ENV, OPTIMIZER_FILE, plugin
from training.loop import train

RANK_SCRIPT = textwrap.dedent(
    """
    import sys
    from training.config import load_config
    from training.loop import train

    train(load_config(sys.argv[2], sys.argv[3:]), resume=None if sys.argv[1] == "-" else sys.argv[1])
    """
)


def _launch(script: Path, resume: str, overrides: list[str], *, force_cpu: bool, procs: int = 2) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop(FORCE_CPU_ENV, None)
    if force_cpu:
        env[FORCE_CPU_ENV] = "1"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={procs}",
        str(script),
        resume,
        str(TINY_CONFIG),
        *overrides,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _overrides(tiny, out: Path, cache: Path, *extra: str, steps: int) -> list[str]:
    return run_overrides(
        tiny,
        out,
        f"data.cache_dir={cache}",
        "save.report=false",
        "adapter.lora.rank=2",
        "train.lr=3e-3",
        "train.aux_decay_steps=4",  # its default is max_steps: a 2-step run would otherwise be another run
        *extra,
        steps=steps,
        every=2,
    )


# ---- config, plugin, refusals (one process) --------------------------------------------------------------


@pytest.mark.parametrize("other", ["model.block_swap=1", "train.ema=0.9", "save.report=true", "sample.items=[...]"])
def test_fsdp_refuses_what_needs_whole_weights_in_one_sentence(tiny_kontext, tmp_path, other):
    base = run_overrides(tiny_kontext, tmp_path / "run", "save.report=false")
    if other.startswith("sample.items"):
        image = next(Path(tiny_kontext["manifest"]).parent.rglob("*.png"))
        other = f"sample.items=[{{instruction: x, references: [{image}]}}]"
    with pytest.raises(ConfigError, match=r"train\.fsdp=true cannot be combined with " + other.split("=")[0]) as err:
        load_config(TINY_CONFIG, [*base, "train.fsdp=true", other])
    assert "\n" not in str(err.value)
    assert load_config(TINY_CONFIG, base).train.fsdp is False  # off by default


def test_the_plugin_is_fsdp2_per_block_and_casts_nothing():
    p = plugin()
    assert p.fsdp_version == 2 and p.reshard_after_forward is True
    assert p.transformer_cls_names_to_wrap == list(BLOCK_CLASSES)
    policy = p.mixed_precision_policy
    assert policy.param_dtype is None and policy.reduce_dtype is None  # fp32 masters stay fp32, base stays bf16
    assert p.activation_checkpointing is False and p.cpu_ram_efficient_loading is False


def test_fsdp_in_one_process_is_refused_in_one_sentence(tiny_kontext, tmp_path):
    overrides = run_overrides(tiny_kontext, tmp_path / "run", "save.report=false", "train.fsdp=true")
    config = load_config(TINY_CONFIG, overrides)
    with pytest.raises(TrainingError, match="FSDP needs 2 or more CUDA processes") as err:
        train(config)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


# ---- two processes -------------------------------------------------------------------------------------


def _fsdp_runs(tiny, tmp_path: Path, force_cpu: bool) -> None:
    """4 steps straight; 2 steps then resumed to 4; and DDP's 4 steps: the resumed run equals the straight one
    bit for bit, DDP within float rounding, and the adapter loads."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    cache = tmp_path / "cache"
    straight, split, ddp = tmp_path / "straight", tmp_path / "split", tmp_path / "ddp"
    _launch(script, "-", _overrides(tiny, straight, cache, "train.fsdp=true", steps=4), force_cpu=force_cpu)
    _launch(script, "-", _overrides(tiny, split, cache, "train.fsdp=true", steps=2), force_cpu=force_cpu)
    _launch(script, "latest", _overrides(tiny, split, cache, "train.fsdp=true", steps=4), force_cpu=force_cpu)
    _launch(script, "-", _overrides(tiny, ddp, cache, steps=4), force_cpu=False)

    a = load_file(str(straight / "instructmole.safetensors"))
    b = load_file(str(split / "instructmole.safetensors"))
    d = load_file(str(ddp / "instructmole.safetensors"))
    assert a.keys() == b.keys() == d.keys()
    assert any(k.startswith("transformer.") for k in a)  # the plain LoRA is exported too
    for key in a:
        assert torch.equal(a[key], b[key]), f"resumed run differs at {key}"
        torch.testing.assert_close(a[key], d[key], atol=1e-5, rtol=0, msg=key)  # sharded sums: other rounding
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in a.items() if ".B" in k)  # it trained
    # The checkpoint holds only the trainable weights (same keys as the DDP run's), never the base.
    step = straight / "checkpoints" / "step-0000004"
    saved = load_file(str(step / "model.safetensors"))
    assert saved.keys() == load_file(str(ddp / "checkpoints" / "step-0000004" / "model.safetensors")).keys()
    assert (step / OPTIMIZER_FILE).is_file() and not (step / "optimizer.bin").exists()
    assert not list(step.glob("pytorch_model_fsdp*")) and not (step / "model_fsdp").exists()
    adapter = load_adapter(straight / "instructmole.safetensors")
    assert adapter.config.num_experts == 4 and adapter.lora


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path; the CUDA test covers GPUs")
def test_two_cpu_processes_fsdp_resumes_bit_for_bit_and_matches_ddp(tiny_kontext, tmp_path):
    _fsdp_runs(tiny_kontext, tmp_path, force_cpu=True)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus_fsdp_resumes_bit_for_bit_and_matches_ddp(tiny_kontext, tmp_path):
    _fsdp_runs(tiny_kontext, tmp_path, force_cpu=False)
