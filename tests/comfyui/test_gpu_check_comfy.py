"""The GPU check's ComfyUI stages, dry run on the CPU against the ComfyUI at COMFYUI_PATH.

On a GPU these stages are the only measurement of dynamic VRAM; here they run the same code with a
tiny model: the legacy ModelPatcher, and on a ComfyUI that has it, ``clone(force_deepcopy=True)``,
the branch of ``clone()`` the dynamic-VRAM delegate takes, standing in for that delegate.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .bootstrap import REPO_ROOT


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check")
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(out)]
    proc = subprocess.run(
        [*command, "--stages", "comfy-legacy,comfy-dynamic"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    result = Path(out, "gpu_check-dry.json")
    assert result.is_file(), proc.stderr[-4000:]
    return json.loads(result.read_text())["stages"]


def _assert_effects_kept(stage: dict) -> None:
    failed = [c for c in stage["checks"] if not c["passed"]]
    assert stage["status"] == "ok" and not failed, (stage["reason"], failed)
    names = {c["name"].split(" (")[0] for c in stage["checks"]}
    for exact in (
        "hook LoRA = loader LoRA, alone",
        "adapter + hook LoRA = adapter + loader LoRA",
        "LoRA loaded after the adapter = before it",
        "merged + hook LoRA = merged + loader LoRA",
        "base after all the others, bit for bit",
    ):
        assert exact in names
    for what, kept in stage["data"]["effect_stacked_vs_alone"].items():
        assert 0.8 < kept["ratio"] < 1.25, (what, kept)


def test_legacy_patcher_keeps_every_effect(stages):
    stage = stages["comfy-legacy"]
    _assert_effects_kept(stage)
    assert stage["data"]["patcher"] == "ModelPatcher"


def test_dynamic_vram_delegate_keeps_every_effect(stages, comfy):
    stage = stages["comfy-dynamic"]
    import comfy.model_patcher

    if "force_deepcopy" not in inspect.signature(comfy.model_patcher.ModelPatcher.clone).parameters:
        assert stage["status"] == "skipped" and "force_deepcopy" in stage["reason"]
        return
    _assert_effects_kept(stage)
    assert stage["data"]["delegates_made"] == 3  # the three hooked runs
