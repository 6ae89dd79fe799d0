"""The GPU check's orchestrator: each stage in its own process, inside its own time limit.

Why processes: a stage that hangs or runs out of memory must not take the others with it; ComfyUI
decides its device and its patcher class once per process (legacy and dynamic VRAM cannot share
one); and a process that ends gives all its GPU memory back. The limits of the stages add up to
the budget, so the whole check cannot outlast it, and results are written after every stage.

    bash benchmarks/gpu_check.sh             # on a CUDA machine (see README, 'GPU check')
    bash benchmarks/gpu_check.sh --dry-run   # tiny shapes on the CPU, the same code paths
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .stage import T0_ENV, Skip, StageContext, StageResult

__all__ = ["STAGES", "Stage", "main", "report"]

REPO_ROOT = Path(__file__).resolve().parents[2]
MIN_STAGE_S = 10.0  # a stage given less than this is skipped: it could not even import torch and ComfyUI
NO_COMFY = "COMFYUI_PATH is not set: no ComfyUI to import (on the GPU, carry gpu_carry/comfyui)"


@dataclass(frozen=True)
class Stage:
    """One stage: its limits (GPU run, dry run) and what it measures, for the report."""

    name: str
    limit_s: float
    dry_limit_s: float
    what: str


# Limits on an H100: they add up to 450 s, so with the wheels' install the check stays under 8 minutes.
# (Before the training stage: environment 30, load 45, core 180, comfy-legacy 90, comfy-dynamic 105; none has
# run on a GPU yet. The core stage fits its rounds to the time it has; environment and load take seconds.)
# The dry run's limits only guard against a hang: on a loaded 2-core CI machine a ComfyUI stage that
# takes 20 s idle was seen past 60 s.
STAGES: tuple[Stage, ...] = (
    Stage("environment", 20, 60, "torch, CUDA, GPU, optional packages"),
    Stage("load", 30, 60, "load_adapter of a full-size adapter"),
    Stage("core", 120, 150, "dynamic / fixed / merged vs the plain formula; speed; fold; peak memory"),
    Stage("training", 130, 150, "one training step per memory option (bf16, fp8, int8, nf4, 8-bit AdamW, block swap)"),
    Stage("comfy-legacy", 70, 150, "ComfyUI, legacy ModelPatcher: effects alone = stacked (LoRA, hook LoRA)"),
    Stage("comfy-dynamic", 80, 150, "ComfyUI, dynamic VRAM (+ non-dynamic delegate for hooked conds): same"),
)


def _stage_function(name: str) -> Callable[[StageContext, StageResult], None]:
    """The function that runs a stage, imported only in that stage's process."""
    if name.startswith("comfy-"):
        from .comfy import comfy_stage

        return lambda ctx, res: comfy_stage(ctx, res, dynamic=name == "comfy-dynamic")
    if name == "training":
        from .train_step import training_stage

        return training_stage
    from . import core

    return {"environment": core.environment_stage, "load": core.load_stage, "core": core.core_stage}[name]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: the same code paths in seconds")
    p.add_argument("--out", type=Path, help="output folder (default: $OUT if set, else benchmarks/results)")
    p.add_argument("--stages", help=f"comma-separated subset of: {', '.join(s.name for s in STAGES)}")
    p.add_argument("--budget", type=float, help="seconds for all stages (default: the sum of their limits)")
    p.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage in this process
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--limit", type=float, help=argparse.SUPPRESS)
    p.add_argument("--work-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stages:
        known = {s.name for s in STAGES}
        unknown = [s for s in args.stages.split(",") if s not in known]
        if unknown:
            p.error(f"unknown stage {unknown[0]!r}; choose from {', '.join(sorted(known))}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stage:
        return _run_stage(args)
    return _orchestrate(args)


# ---- one stage, in its own process ----------------------------------------------------------------


def _run_stage(args: argparse.Namespace) -> int:
    """Run one stage and leave its result in ``args.result``; the exit status is always 0 unless the
    process is killed (the result file says how the stage went)."""
    device = "cpu" if args.dry_run else "cuda"
    ctx = StageContext(args.stage, args.dry_run, device, args.limit or 60.0, args.work_dir)
    res = StageResult(path=args.result)
    res.flush()
    if device == "cpu":
        # Tiny shapes on one thread: on a busy machine, threads that spin against other processes made
        # millisecond forwards take a second (as tests/comfyui/conftest.py found for KSampler).
        import torch

        torch.set_num_threads(1)
    try:
        _stage_function(args.stage)(ctx, res)
        res.finish()
    except Skip as skip:
        res.status, res.reason = "skipped", str(skip)
        res.flush()
    except Exception as err:  # any error is this stage's result, reported, never the whole check's end
        traceback.print_exc()
        res.status, res.reason = "failed", f"error: {type(err).__name__}: {_first_line(err)}"
        res.flush()
    ctx.log(f"{res.status}{f' ({res.reason})' if res.reason else ''}")
    return 0


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else ""


# ---- the orchestrator -----------------------------------------------------------------------------


def _out_dir(args: argparse.Namespace) -> Path:
    if args.out:
        return args.out
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    return REPO_ROOT / "benchmarks" / "results"


def _cuda_problem() -> str | None:
    """Why this machine cannot run the GPU check, or None. Asked in a child process, so the
    orchestrator itself never creates a CUDA context."""
    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)"
    code = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True).returncode
    if code == 0:
        return None
    if code == 3:
        return "torch sees no CUDA device"
    return f"{sys.executable} cannot import torch"


def _log(start: float, message: str) -> None:
    print(f"[{time.time() - start:6.1f} s] {message}", file=sys.stderr, flush=True)


def _stop(signum: int, _frame: Any) -> None:
    """SIGTERM (the shell script's hard limit) ends the check like Ctrl-C: the running stage is
    killed, not left running in its own session."""
    raise KeyboardInterrupt(f"signal {signum}")


def _orchestrate(args: argparse.Namespace) -> int:
    start = time.time()
    signal.signal(signal.SIGTERM, _stop)
    out_dir = _out_dir(args)
    stem = "gpu_check-dry" if args.dry_run else "gpu_check"
    problem = None if args.dry_run else _cuda_problem()
    if problem:
        print(f"gpu_check: {problem}; use --dry-run for the CPU check", file=sys.stderr)
        return 2
    chosen = [s for s in STAGES if not args.stages or s.name in args.stages.split(",")]
    limits = {s.name: s.dry_limit_s if args.dry_run else s.limit_s for s in chosen}
    budget = args.budget if args.budget is not None else sum(limits.values())
    results: dict[str, Any] = {
        "check": "gpu_check",
        "dry_run": args.dry_run,
        "budget_s": budget,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "comfyui_path": os.environ.get("COMFYUI_PATH"),
        "stages": {},
    }
    _log(
        start,
        f"GPU check{' (dry run, CPU)' if args.dry_run else ''}: {len(chosen)} stages, "
        f"budget {budget:.0f} s, out {out_dir}",
    )
    env = {**os.environ, T0_ENV: str(start), "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    stopped = False
    with tempfile.TemporaryDirectory(prefix="instructmole-gpu-check-") as tmp:
        for stage in chosen:
            left = budget - (time.time() - start)
            limit = min(limits[stage.name], left)
            if limit < MIN_STAGE_S:
                entry = {"status": "skipped", "reason": f"no time left in the budget ({left:.0f} s)", "seconds": 0.0}
            elif stage.name.startswith("comfy-") and not os.environ.get("COMFYUI_PATH"):
                entry = {"status": "skipped", "reason": NO_COMFY, "seconds": 0.0}
            else:
                _log(start, f"stage {stage.name}: start (limit {limit:.0f} s): {stage.what}")
                began = time.time()
                try:
                    entry = _spawn(stage, limit, args.dry_run, Path(tmp), env)
                except KeyboardInterrupt:  # its process is killed; say so in the files, then stop
                    entry = {"status": "failed", "reason": "the check was stopped", "seconds": time.time() - began}
                    stopped = True
            entry["limit_s"] = limit
            results["stages"][stage.name] = entry
            results["total_s"] = time.time() - start
            _write(out_dir, stem, results)
            note = f" ({entry['reason']})" if entry.get("reason") else ""
            _log(start, f"stage {stage.name}: {entry['status']} in {entry['seconds']:.1f} s{note}")
            if stopped:
                break
    print(report(results))
    _log(start, f"wrote {out_dir / (stem + '.json')} and {stem}.md")
    if stopped:
        return 130
    return 1 if any(e["status"] == "failed" for e in results["stages"].values()) else 0


def _spawn(stage: Stage, limit: float, dry_run: bool, tmp: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run one stage in a child process (its own session, so a timeout kills all it started)."""
    work = tmp / stage.name
    work.mkdir()
    result = work / "result.json"
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--stage", stage.name, "--result", str(result)]
    command += ["--limit", str(limit), "--work-dir", str(work)] + (["--dry-run"] if dry_run else [])
    began = time.time()
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, start_new_session=True)
    try:
        code = proc.wait(timeout=limit)
        ended = None
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        code, ended = None, f"timed out after {limit:.0f} s (results up to then are kept)"
    except BaseException:  # the check itself is stopped (SIGTERM from the hard limit, Ctrl-C): so is the stage
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    entry: dict[str, Any] = {"status": "failed", "reason": "it left no result"}
    if result.is_file():
        try:
            entry = json.loads(result.read_text())
        except json.JSONDecodeError:
            entry["reason"] = "its result file was half written when it stopped"
    if ended is not None:
        entry["status"], entry["reason"] = "failed", ended
    elif code != 0:
        entry["status"] = "failed"
        entry["reason"] = f"the process ended with status {code}" + (
            " (killed: out of memory?)" if code and code < 0 else ""
        )
    entry["seconds"] = time.time() - began
    return entry


def _write(out_dir: Path, stem: str, results: dict[str, Any]) -> None:
    """Both files, through ``.tmp`` siblings, so a killed check never leaves half a file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (
        (stem + ".json", json.dumps(results, indent=1, default=str) + "\n"),
        (stem + ".md", report(results) + "\n"),
    ):
        tmp = out_dir / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out_dir / name)


# ---- the markdown report --------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _num(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.3g}" if value == 0 or 1e-3 <= abs(value) < 1e5 else f"{value:.2e}"
    return str(value)


def _min(values: Any) -> Any:
    return min(values) if isinstance(values, list) and values else values


def report(results: dict[str, Any]) -> str:
    """The markdown table(s): stages, checks, speed, one-time costs, ComfyUI effects."""
    stages = results["stages"]
    env = stages.get("environment", {}).get("data", {})
    where = env.get("gpu") or env.get("cpu") or "?"
    kind = "dry run (tiny shapes, CPU, fp32): code paths only, no figures to quote" if results["dry_run"] else "bf16"
    took = f"{results.get('total_s', 0):.0f} s of a {results['budget_s']:.0f} s budget"
    lines = [f"GPU check on {where}, torch {env.get('torch', '?')}, {kind}; {took}", ""]
    rows = []
    for name, e in stages.items():
        d = e.get("data", {})
        model = ""
        if "blocks" in d:
            model = f"{d['blocks']} blocks, hidden {d.get('hidden')}, {d.get('dtype', '')}"
        elif "layers" in d:
            model = f"{d['layers']} layers, {_num(d.get('expert_parameters', 0) / 1e6)} M expert parameters"
        reason = (e.get("reason") or "").replace("|", "/")
        rows.append((name, e["status"], f"{e.get('seconds', 0):.1f}", f"{e.get('limit_s', 0):.0f}", model, reason))
    lines += _table(("stage", "status", "s", "limit s", "model", "reason"), rows)

    checks = [(name, c) for name, e in stages.items() for c in e.get("checks", [])]
    if checks:
        rows = [
            (n, c["name"], _num(c["value"]), f"{c['op']} {_num(c['limit'])}", "ok" if c["passed"] else "**FAILED**")
            for n, c in checks
        ]
        lines += ["", *_table(("stage", "check", "value", "bound", "result"), rows)]

    core = stages.get("core", {}).get("data", {})
    if core.get("speed"):
        lines += [
            "",
            f"Core forward ({core.get('blocks')} blocks, hidden {core.get('hidden')}, {core.get('tokens')} tokens, "
            f"{core.get('dtype')}, {core.get('mole')}), medians of {core.get('rounds')} interleaved rounds:",
            "",
        ]
        rows = [
            (n, f"{v['median_ms']:.1f}", f"{v['ratio']:.3f}", f"{v['paired_ratio']:.3f}", _num(v["peak_gib"]))
            for n, v in core["speed"].items()
        ]
        lines += _table(("variant", "median ms", "× base", "× base, paired per round", "peak GiB"), rows)

    training = stages.get("training", {}).get("data", {})
    if training.get("options"):
        t = training
        lines += [
            "",
            f"Training step ({t.get('blocks')} blocks, hidden {t.get('hidden')}, {t.get('dtype')}, {t.get('tokens')} "
            f"tokens; {t.get('recipe')}), one timed step after one warm-up step, each option on its own transformer; "
            f"memory: {t.get('memory')}:",
            "",
        ]
        rows = []
        for spec, r in training["options"].items():
            ok = r["status"] == "ok"
            rows.append(
                (
                    r.get("name", spec),
                    r["status"] if ok else f"{r['status']}: {(r.get('reason') or '').replace('|', '/')}",
                    _num(r.get("ms_per_step")) if ok else "",
                    _num(r.get("peak_gib")) if ok else "",
                    _num(r.get("state_gib")) if ok else "",
                    _num(r.get("frozen_gib")) if ok else "",
                    _num(r.get("host_gib")) if ok else "",
                    _num(r.get("build_s")) if ok else "",
                )
            )
        header = ("option", "status", "ms/step", "peak GiB", "trainable + optimizer GiB", "frozen base GiB")
        lines += _table((*header, "swapped to CPU GiB", "build s"), rows)

    targets = [(name, t) for name, e in stages.items() for t in e.get("targets", [])]
    if targets:
        rows = [
            (
                t["name"],
                f"{_num(t['value'])} {t['unit']}",
                f"≤ {t['limit']:g} {t['unit']}",
                {True: "met", False: "**missed**", None: "n/a (not the target's shapes)"}[t["met"]],
            )
            for _, t in targets
        ]
        lines += ["", *_table(("target", "value", "target", "result"), rows)]

    once = []
    load = stages.get("load", {}).get("data", {})
    if "load_cpu_ms" in load:
        once.append((f"load_adapter to cpu ({load.get('file_mib', 0):.0f} MiB bf16)", _num(_min(load["load_cpu_ms"]))))
        if load.get("load_device_ms"):
            once.append(("load_adapter to the GPU", _num(_min(load["load_device_ms"]))))
    if "fold_council_ms" in core:
        once.append((f"fold_council, {core.get('layers')} layers", _num(_min(core["fold_council_ms"]))))
        once.append(("attach merged (fold + write the weights)", _num(_min(core.get("attach_merged_ms")))))
    if once:
        lines += ["", *_table(("one-time cost", "best ms"), once)]

    memory = [
        (n, _num(e.get("data", {}).get("peak_gib")))
        for n, e in stages.items()
        if e.get("data", {}).get("peak_gib") is not None
    ]
    if memory:
        lines += ["", *_table(("stage", "peak GPU memory GiB"), memory)]

    effects = []
    for name in ("comfy-legacy", "comfy-dynamic"):
        d = stages.get(name, {}).get("data", {})
        for what, v in d.get("effect_stacked_vs_alone", {}).items():
            effects.append((name, d.get("patcher", "?"), what, f"{v['ratio']:.4f}", f"{v['error']:.3g}"))
    if effects:
        lines += [
            "",
            "ComfyUI: each effect next to the other, against the same effect alone (a lost one: ratio ~0, error ~1):",
            "",
        ]
        lines += _table(
            ("stage", "patcher", "effect", "‖Δ_stacked‖ / ‖Δ_alone‖", "‖Δ_stacked − Δ_alone‖ / ‖Δ_alone‖"), effects
        )
    return "\n".join(lines)
