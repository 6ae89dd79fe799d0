"""Two processes (torchrun, gloo) train what one process with the same global batch trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.training.conftest import ROOT, TINY_CONFIG, run_overrides

RANK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    from safetensors.torch import save_file
    from training.config import load_config
    from training.loop import train

    out = sys.argv[1]
    result = train(load_config(sys.argv[2], sys.argv[3:]))
    rank = int(os.environ.get("RANK", "0"))
    weights = {k: v.detach().cpu().contiguous() for k, v in result.model.trainable_state().items()}
    save_file(weights, f"{out}/rank{rank}.safetensors")
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"cache_written": result.cache_entries_written}, f)
    """
)


def _run(cmd: list[str], cwd: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_torchrun_two_processes_equal_one_process(tiny_kontext, tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    results = {}
    for procs in (1, 2):
        out = tmp_path / f"procs{procs}"
        out.mkdir()
        cache = f"data.cache_dir={tmp_path / f'cache{procs}'}"
        overrides = run_overrides(tiny_kontext, out / "run", cache, "save.report=false", steps=6, every=6)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
        _run([*launcher, str(script), str(out), str(TINY_CONFIG), *overrides], ROOT)
        results[procs] = out
    one = load_file(str(results[1] / "rank0.safetensors"))
    rank0, rank1 = (load_file(str(results[2] / f"rank{r}.safetensors")) for r in (0, 1))
    assert one.keys() == rank0.keys() == rank1.keys()
    for key in one:
        assert torch.equal(rank0[key], rank1[key]), f"ranks disagree on {key}"
        torch.testing.assert_close(rank0[key], one[key], atol=1e-5, rtol=0, msg=key)
    assert any(not torch.equal(one[k], torch.zeros_like(one[k])) for k in one if ".B" in k)  # it trained
    # The cache was built once: the two processes split the entries, and together wrote what one process wrote.
    written = [json.loads((results[2] / f"rank{r}.json").read_text())["cache_written"] for r in (0, 1)]
    alone = json.loads((results[1] / "rank0.json").read_text())["cache_written"]
    assert min(written) > 0 and sum(written) == alone
