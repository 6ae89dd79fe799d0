"""The measurements: interleaved timed rounds per size, and CPU memory measured before any timing.

Why in this order and this way: timings use interleaved rounds (rotating who goes first) and
medians (``benchmarks/common.py``), so drift hits every variant alike; a variant's first step
creates its AdamW state, so it is no memory sample; the CPU memory steps run while glibc returns
freed memory, before the timed ones switch it to keeping it (``main`` orders the phases).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..common import log, sync, timed
from .bench import TrainingBench
from .memory import RssPeak
from .setting import StepInputs
from .variants import TrainVariant


@dataclass
class Record:
    """What one variant gave at one size."""

    name: str
    samples: list[float]  # step seconds, one per round
    first: dict[str, float] | None = None  # losses of the first (warm-up) step
    peak: int | None = None  # CUDA: max_memory_allocated (alone); CPU: frozen + state + step peak RSS
    step_peak: int | None = None  # what a step adds on top of the weights and optimizer state (max)
    state: int = 0  # the variant's trainable weights + AdamW state
    frozen: int = 0


def new_records(bench: TrainingBench) -> dict[str, Record]:
    return {v.name: Record(v.name, [], frozen=bench.frozen_bytes()) for v in bench.variants}


def _step(bench: TrainingBench, v: TrainVariant, x: StepInputs, rec: Record) -> tuple[float, dict[str, float]]:
    """One timed step; CUDA: also a memory sample unless it is the variant's first (it creates the AdamW state)."""
    device = bench.device
    memory = device.type == "cuda" and bool(v.optimizer.state)
    if memory:
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    seconds, losses = timed(lambda: bench.step(v, x), device)
    if memory:
        peak = torch.cuda.max_memory_allocated(device)
        rec.peak = max(rec.peak or 0, peak)
        rec.step_peak = max(rec.step_peak or 0, peak - before)
    if rec.first is None:
        rec.first = losses
    return seconds, losses


def measure_time(bench: TrainingBench, side: int, records: dict[str, Record], *, rounds: int, warmup: int) -> None:
    """Warm every variant up at this size, then time ``rounds`` interleaved rounds (rotating who goes first)."""
    x = bench.inputs(side)
    for v in bench.variants:
        with bench.installed(v):
            for _ in range(max(warmup, 1)):
                seconds, losses = _step(bench, v, x, records[v.name])
                log(f"  warmup {v.name}: {seconds * 1e3:.0f} ms, loss {losses['loss']:.5g}")
    count = len(bench.variants)
    for r in range(rounds):
        line = []
        for i in range(count):
            v = bench.variants[(r + i) % count]
            with bench.installed(v):
                seconds, _ = _step(bench, v, x, records[v.name])
            records[v.name].samples.append(seconds)
            line.append(f"{v.name} {seconds * 1e3:.0f}")
        log(f"  round {r + 1}/{rounds}: " + ", ".join(line) + " (ms)")
    for v in bench.variants:
        rec = records[v.name]
        rec.state = v.state_bytes()
        if rec.peak is not None:
            log(f"  memory {v.name}: peak {_gib(rec.peak)} GiB, step adds {_gib(rec.step_peak)} GiB")


def measure_cpu_memory(bench: TrainingBench, side: int, records: dict[str, Record], rss: RssPeak) -> None:
    """CPU: one step per variant whose peak RSS growth is recorded (after a first step that creates
    the AdamW state, where there was none). Run it while glibc returns freed memory, before any
    timing in keep-freed mode: after that mode the heap's freed chunks refault and inflate RSS."""
    x = bench.inputs(side)
    for v in bench.variants:
        rec = records[v.name]
        if not v.optimizer.state:
            with bench.installed(v):
                _step(bench, v, x, rec)
        with bench.installed(v):  # installed afresh: nothing of an earlier forward is left allocated
            rss.start()
            _step(bench, v, x, rec)
            rec.step_peak = rss.stop()
        rec.state = v.state_bytes()
        if rec.step_peak is not None:
            rec.peak = rec.frozen + rec.state + rec.step_peak
        log(f"  memory {v.name}: peak {_gib(rec.peak)} GiB, step adds {_gib(rec.step_peak)} GiB")


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f}"
