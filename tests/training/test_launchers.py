"""The launch commands the README shows: ``accelerate launch --multi_gpu --num_processes 2`` forms a real
two-process group on a machine without CUDA, and ``accelerate launch --cpu --num_processes 2`` (which
starts one process) is refused instead of training alone on the whole batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.training.conftest import ROOT, TINY_CONFIG, run_overrides

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only launch paths")

ACCELERATE = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(key, None)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_accelerate_multi_gpu_on_cpus_forms_two_processes(tiny_kontext, tmp_path):
    script = tmp_path / "group.py"
    script.write_text(
        textwrap.dedent(
            """
        import json, os, sys
        from training.config import load_config
        from training.loop import _accelerator

        accelerator = _accelerator(load_config(sys.argv[2], sys.argv[3:]))
        with open(f"{sys.argv[1]}/rank{accelerator.process_index}.json", "w") as f:
            json.dump({"world": accelerator.num_processes, "type": str(accelerator.distributed_type)}, f)
        """
        )
    )
    overrides = run_overrides(tiny_kontext, tmp_path / "run")
    proc = _run(
        [*ACCELERATE, "--multi_gpu", "--num_processes", "2", str(script), str(tmp_path), str(TINY_CONFIG), *overrides]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks == [{"world": 2, "type": "DistributedType.MULTI_CPU"}] * 2


def test_accelerate_cpu_with_several_processes_is_refused(tiny_kontext, tmp_path):
    overrides = run_overrides(tiny_kontext, tmp_path / "run")
    cmd = [*ACCELERATE, "--cpu", "--num_processes", "2", "-m", "training", "--config", str(TINY_CONFIG), *overrides]
    proc = _run(cmd)
    # Our process exits 2 with one line; accelerate's launcher then adds its own traceback for any non-zero
    # exit of its child (CalledProcessError), which is not ours to remove.
    assert proc.returncode != 0, proc.stderr[-3000:]
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: accelerate launch started one")]
    assert len(ours) == 1 and "--multi_gpu --num_processes N" in ours[0], proc.stderr[-3000:]
    assert "returned non-zero exit status 2" in proc.stderr
    assert not Path(tmp_path / "run").exists()
