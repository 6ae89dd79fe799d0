"""The prepared GPU check (benchmarks/gpu_check.sh): its CPU dry run, and how it keeps to its budget.

The dry run takes the code paths the GPU run takes, with tiny shapes, so a lent GPU's few minutes
are never spent finding a typo. Without COMFYUI_PATH its ComfyUI stages skip, saying why;
tests/comfyui/test_gpu_check_comfy.py runs them against a real ComfyUI.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks.gpu_check import run as gpu_check
from benchmarks.gpu_check import train_step
from benchmarks.gpu_check.comfy import _AvStub
from benchmarks.gpu_check.stage import StageContext, StageResult
from benchmarks.training import bench as training_bench
from benchmarks.training.options import GPU_CHECK_OPTIONS

REPO = Path(__file__).resolve().parents[1]
needs_diffusers = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="diffusers is not installed")


def _clean_env() -> dict[str, str]:
    """This interpreter, no ComfyUI and no device-tool output folder: the dry run as CI runs it."""
    env = {k: v for k, v in os.environ.items() if k not in ("COMFYUI_PATH", "OUT")}
    env["PYTHON"] = sys.executable
    return env


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict[str, Any], Path]:
    """One dry run of the whole check through the shell script, shared by the tests below."""
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
        cwd=REPO,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert (out / "gpu_check-dry.json").is_file(), proc.stderr[-4000:]
    return proc, json.loads((out / "gpu_check-dry.json").read_text()), out


@needs_diffusers
def test_dry_run_runs_every_stage_and_writes_both_files(dry_run):
    proc, data, out = dry_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert data["dry_run"] is True
    assert list(data["stages"]) == [s.name for s in gpu_check.STAGES]
    for name in ("environment", "load", "core", "training"):
        assert data["stages"][name]["status"] == "ok", data["stages"][name]
    for name in ("comfy-legacy", "comfy-dynamic"):
        stage = data["stages"][name]
        assert stage["status"] == "skipped" and "COMFYUI_PATH" in stage["reason"]
    markdown = (out / "gpu_check-dry.md").read_text()
    assert "| stage | status | s | limit s | model | reason |" in markdown
    assert "| core | ok |" in markdown and "| comfy-legacy | skipped |" in markdown
    assert "| training | ok |" in markdown and "| option | status | ms/step | peak GiB |" in markdown
    assert markdown.strip() in proc.stdout  # the same table is printed at the end


def _has_library(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


@needs_diffusers
def test_training_stage_steps_once_under_every_memory_option(dry_run):
    stage = dry_run[1]["stages"]["training"]
    data = stage["data"]
    assert data["blocks"] == "2+2" and data["dtype"] == "float32"
    rows = data["options"]
    assert list(rows) == [o.spec for o in GPU_CHECK_OPTIONS]
    assert {"base", "fp8", "int8", "nf4", "nf4+adamw8bit", "swap-all"} == set(rows)
    for spec, row in rows.items():
        needs_bnb = "nf4" in spec or "adamw8bit" in spec
        if needs_bnb and not _has_library("bitsandbytes"):  # a CI box without the train-memory extra
            assert row["status"] == "skipped" and "needs bitsandbytes" in row["reason"], row
            continue
        assert row["status"] == "ok" and row["reason"] is None, row
        assert row["ms_per_step"] > 0 and row["peak_gib"] > 0 and row["state_gib"] > 0, row
        assert all(v == v for v in row["losses"].values()), row  # finite, not NaN
    assert rows["swap-all"]["host_gib"] > 0 and rows["swap-all"]["option"]["model.block_swap"] == 4
    assert rows["fp8"]["frozen_gib"] < rows["base"]["frozen_gib"]
    (check,) = stage["checks"]
    assert check["name"].startswith("training losses finite") and check["passed"]
    assert stage["targets"] and all(t["met"] is None for t in stage["targets"])  # not the target's shapes
    markdown = (dry_run[2] / "gpu_check-dry.md").read_text()
    assert "| ours, block swap all | ok |" in markdown


class _Clock(StageContext):
    """A stage context whose time left is scripted, one value per question."""

    answers: list[float]

    def left(self) -> float:
        return self.answers.pop(0) if self.answers else 0.0


@needs_diffusers
def test_training_stage_rows_for_an_error_and_for_no_time_left(tmp_path, monkeypatch):
    """An option that fails is its one-line error; one the clock has no room for is 'not run: out of time';
    the stage goes on either way and writes every row."""

    def broken(*_args, **_kwargs):
        raise RuntimeError("cudnn SDPA backward failed\nwith a long trace")

    monkeypatch.setattr(training_bench, "BlockSwap", broken)
    torch.set_num_threads(1)
    ctx = _Clock("training", True, "cpu", 60.0, tmp_path)
    specs = [o.spec for o in GPU_CHECK_OPTIONS]
    ctx.answers = [600.0 if spec in ("base", "swap-all") else 0.0 for spec in specs]
    res = StageResult(path=tmp_path / "r.json")
    train_step.training_stage(ctx, res)
    res.finish()
    saved = json.loads((tmp_path / "r.json").read_text())
    rows = saved["data"]["options"]
    assert rows["base"]["status"] == "ok" and rows["base"]["ms_per_step"] > 0
    assert rows["swap-all"]["status"] == "failed"
    assert rows["swap-all"]["reason"] == "RuntimeError: cudnn SDPA backward failed"
    for spec in specs:
        if spec not in ("base", "swap-all"):
            assert rows[spec]["status"] == "not run" and rows[spec]["reason"].startswith("out of time"), rows[spec]
    assert saved["status"] == "ok"  # a failed option is a row, not the stage's failure
    text = gpu_check.report({"dry_run": True, "budget_s": 450, "total_s": 3, "stages": {"training": saved}})
    assert "| ours, block swap all | failed: RuntimeError: cudnn SDPA backward failed |" in text
    assert "| ours, fp8 base | not run: out of time" in text


def test_stage_limits_fit_the_script_budget():
    """The stages' limits add up to 450 s, inside the 470 s after which gpu_check.sh kills the run."""
    assert sum(s.limit_s for s in gpu_check.STAGES) == 450
    script = (REPO / "benchmarks" / "gpu_check.sh").read_text()
    assert "GPU_CHECK_TIMEOUT:-470}" in script
    assert [s.name for s in gpu_check.STAGES].index("training") < [s.name for s in gpu_check.STAGES].index(
        "comfy-legacy"
    )


@needs_diffusers
def test_core_stage_compares_every_mode_with_the_plain_formula(dry_run):
    core = dry_run[1]["stages"]["core"]
    checks = {c["name"].split(" (")[0]: c for c in core["checks"]}
    for mode in ("dynamic", "fixed", "merged"):
        check = checks[f"{mode} vs dense experts"]
        assert check["passed"] and 0 <= check["value"] < 1e-3, check
    assert checks["adapter changes the output"]["value"] > 1e-4
    speed = core["data"]["speed"]
    assert set(speed) == {"base", "dynamic", "fixed", "merged", "dense experts"}
    assert speed["base"]["ratio"] == 1.0 and all(v["median_ms"] > 0 for v in speed.values())
    assert core["data"]["fold_council_ms"] and core["data"]["attach_merged_ms"]
    # The design's targets are for the full shapes on a GPU: reported, never judged on a dry run.
    assert core["targets"] and all(t["met"] is None for t in core["targets"])


@needs_diffusers
def test_load_stage_times_loading_an_adapter_file(dry_run):
    load = dry_run[1]["stages"]["load"]["data"]
    assert load["file_mib"] > 0 and load["layers"] == 2 and min(load["load_cpu_ms"]) > 0


@needs_diffusers
def test_progress_lines_carry_elapsed_times(dry_run):
    stderr = dry_run[0].stderr
    assert re.search(r"\[\s*\d+\.\d s\] stage core: ok in \d+\.\d s", stderr), stderr[-2000:]
    assert re.search(r"\[\s*\d+\.\d s \| core \+\d+\.\d s\] transformer 1\+1 blocks", stderr), stderr[-2000:]


def test_a_stage_past_its_limit_is_killed_and_reported(tmp_path):
    """A fifth of a second is not enough to even import torch: the stage is killed and reported as such."""
    env = {**_clean_env(), "PYTHONPATH": str(REPO)}
    stage = gpu_check.Stage("environment", 0.2, 0.2, "test")
    entry = gpu_check._spawn(stage, 0.2, True, tmp_path, env)
    assert entry["status"] == "failed" and entry["reason"].startswith("timed out after"), entry
    assert entry["seconds"] < 15


def test_an_exhausted_budget_skips_the_stages_without_running_them(tmp_path, monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path), "--budget", "5"]) == 0
    data = json.loads((tmp_path / "gpu_check-dry.json").read_text())
    assert {e["status"] for e in data["stages"].values()} == {"skipped"}
    assert all("no time left" in e["reason"] for e in data["stages"].values())


def test_unknown_stage_is_a_usage_error():
    with pytest.raises(SystemExit) as exc:
        gpu_check.parse_args(["--stages", "core,nope"])
    assert exc.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_the_gpu_run_refuses_and_names_the_dry_run(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "--dry-run" in capsys.readouterr().err
    assert not (tmp_path / "gpu_check.json").exists()


def test_a_missed_check_fails_the_stage_and_nan_never_passes(tmp_path):
    res = StageResult(path=tmp_path / "r.json")
    assert res.check("close", 1e-6, 1e-3)
    assert not res.check("far", 0.6, 1e-3)
    assert not res.check("nan", float("nan"), 1.0)
    res.finish()
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["status"] == "failed" and saved["reason"] == "2 check(s) out of bounds: far, nan"


def test_report_marks_failed_checks_and_missed_targets():
    stage = {
        "status": "failed",
        "reason": "1 check(s) out of bounds: x",
        "seconds": 1.0,
        "limit_s": 10,
        "data": {},
        "checks": [{"name": "x", "value": 0.5, "limit": 0.1, "op": "<=", "passed": False}],
        "targets": [{"name": "t", "value": 1.2, "limit": 1.03, "unit": "×", "met": False}],
    }
    text = gpu_check.report({"dry_run": False, "budget_s": 450, "total_s": 3, "stages": {"core": stage}})
    assert "**FAILED**" in text and "**missed**" in text and "≤ 1.03 ×" in text


def test_av_stub_serves_the_imports_comfy_api_makes():
    """PyAV is not carried to the GPU (35 MB): the stub must satisfy ``from av.video.reformatter
    import ColorTrc`` and enum lookups at import time, and nothing beyond ``av``."""
    finder = _AvStub()
    assert finder.find_spec("avocado") is None
    spec = finder.find_spec("av.video.reformatter")
    module = importlib.util.module_from_spec(spec)
    color = module.ColorTrc
    assert isinstance(color.ARIB_STD_B67, type) and color.ARIB_STD_B67.__module__ == "av.video.reformatter"
    with pytest.raises(AttributeError):
        module.__wrapped__  # noqa: B018 - dunder lookups must fail, as on a real module
