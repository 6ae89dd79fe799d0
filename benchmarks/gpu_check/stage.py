"""What one stage of the GPU check works with: its context, its result, and how it reports.

Why a result object that writes itself after every step: the orchestrator kills a stage that runs
past its limit, and what the stage measured until then must still reach the report.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Skip", "StageContext", "StageResult", "require"]

T0_ENV = "GPU_CHECK_T0"  # the orchestrator's start (time.time()), so every line shows the check's elapsed time


class Skip(Exception):
    """Raised by a stage that cannot run here; the message is the reason shown in the report."""


def require(module: str, why: str) -> None:
    """Skip the stage, naming what is missing and what it was needed for, if ``module`` is not importable."""
    if importlib.util.find_spec(module) is None:
        raise Skip(f"{module} is not installed ({why}); carry its wheel, see README 'GPU check'")


@dataclass
class StageContext:
    """Where and how a stage runs."""

    name: str
    dry_run: bool
    device: str  # "cuda" or "cpu"
    limit_s: float  # the stage's own time limit, as the orchestrator enforces it
    work_dir: Path  # a scratch folder for files the stage writes (removed after the check)
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        """Seconds until the orchestrator would kill this stage."""
        return self.limit_s - self.elapsed()

    def log(self, message: str) -> None:
        """One progress line on stderr: the whole check's elapsed time, then the stage's."""
        t0 = os.environ.get(T0_ENV)
        total = f"{time.time() - float(t0):6.1f} s | " if t0 else ""
        print(f"[{total}{self.name} +{self.elapsed():.1f} s] {message}", file=sys.stderr, flush=True)


@dataclass
class StageResult:
    """What a stage found. ``checks`` are correctness bounds (a miss fails the stage); ``targets``
    are the design's speed targets (reported as met or missed, never failing the stage)."""

    path: Path | None = None
    status: str = "ok"
    reason: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)
    targets: list[dict[str, Any]] = field(default_factory=list)

    def check(self, name: str, value: float, limit: float, op: str = "<=") -> bool:
        """Record ``value op limit`` (op ``<=``, ``>=`` or ``==``); NaN never passes."""
        passed = _holds(value, limit, op)
        self.checks.append({"name": name, "value": value, "limit": limit, "op": op, "passed": passed})
        self.flush()
        return passed

    def target(self, name: str, value: float, limit: float, unit: str, applies: bool) -> None:
        """A design target; ``applies`` is False where the shapes are not the target's (dry run)."""
        met = _holds(value, limit, "<=") if applies else None
        self.targets.append({"name": name, "value": value, "limit": limit, "unit": unit, "met": met})
        self.flush()

    def put(self, **values: Any) -> None:
        """Add measured values and write the result at once (kept even if the stage is killed later)."""
        self.data.update(values)
        self.flush()

    def finish(self) -> None:
        """A stage that ran to the end fails if any of its checks missed."""
        missed = [c["name"] for c in self.checks if not c["passed"]]
        if self.status == "ok" and missed:
            self.status = "failed"
            self.reason = f"{len(missed)} check(s) out of bounds: {', '.join(missed)}"
        self.flush()

    def flush(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        payload = {k: v for k, v in asdict(self).items() if k != "path"}
        tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)


def _holds(value: float, limit: float, op: str) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if op == "<=":
        return value <= limit
    if op == ">=":
        return value >= limit
    if op == "==":
        return value == limit
    raise ValueError(f"unknown comparison {op!r}")
