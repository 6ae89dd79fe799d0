"""The measurements: interleaved timed rounds per size, and CPU memory measured before any timing.

Why in this order and this way: timings use interleaved rounds (rotating who goes first) and
medians (``benchmarks/common.py``), so drift hits every variant alike; a variant's first step
creates its AdamW state, so it is no memory sample; the CPU memory steps run while glibc returns
freed memory, before the timed ones switch it to keeping it (``main`` orders the phases).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from training.errors import ConfigError

from ..common import log, sync, timed
from .bench import TrainingBench
from .memory import RssPeak
from .options import MemoryOption
from .setting import StepInputs, TrainShape, dtype_name, size_label
from .variants import TrainVariant


@dataclass
class Record:
    """What one variant gave at one size."""

    name: str
    samples: list[float]  # step seconds, one per round
    first: dict[str, float] | None = None  # losses of the first (warm-up) step
    peak: int | None = None  # CUDA: max_memory_allocated (alone); CPU: frozen + state + step peak RSS
    step_peak: int | None = None  # what a step adds on top of the weights and optimizer state (max)
    state: int = 0  # the variant's trainable weights + optimizer state
    frozen: int = 0  # the frozen base on the compute device
    host: int = 0  # frozen weights block swap keeps in CPU memory between uses
    option: dict[str, Any] | None = None  # a memory-options row: MemoryOption.describe
    status: str = "ok"  # "ok", "skipped" (a library is missing) or "failed" (the error is the reason)
    reason: str | None = None
    build_s: float | None = None  # building its transformer, adapter and memory option (memory-options rows)
    paired: bool = False  # timed in the same interleaved rounds as ours (so its per-round ratio means something)


# The 1-minute load average after every timed round of this process (``run.main`` resets it): on a shared
# machine the load during the run, not only at its ends, says how much other processes took.
LOAD_DURING: list[float] = []


def new_records(bench: TrainingBench) -> dict[str, Record]:
    return {v.name: Record(v.name, [], frozen=bench.frozen_bytes(), host=bench.host_bytes()) for v in bench.variants}


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
    interleave([(bench, v) for v in bench.variants], side, records, rounds=rounds, warmup=warmup)


def interleave(
    pairs: Sequence[tuple[TrainingBench, TrainVariant]],
    side: int,
    records: dict[str, Record],
    *,
    rounds: int,
    warmup: int,
    tolerant: bool = False,
) -> None:
    """``measure_time`` over variants of one or several benches (memory options, each on its own transformer).

    ``tolerant``: a variant whose step raises gets its record marked "failed" with the error's first line and
    leaves the rotation; the others go on (else the error propagates)."""
    inputs: dict[int, StepInputs] = {}
    live = list(pairs)

    def step(bench: TrainingBench, v: TrainVariant) -> tuple[float, dict[str, float]] | None:
        x = inputs.setdefault(id(bench), bench.inputs(side))
        try:
            with bench.installed(v):
                return _step(bench, v, x, records[v.name])
        except Exception as err:
            if not tolerant:
                raise
            records[v.name].status, records[v.name].reason = "failed", f"{type(err).__name__}: {_one_line(err)}"
            log(f"  {v.name}: failed: {records[v.name].reason}")
            live.remove((bench, v))
            return None

    for bench, v in list(live):
        for _ in range(max(warmup, 1)):
            done = step(bench, v)
            if done is None:
                break
            log(f"  warmup {v.name}: {done[0] * 1e3:.0f} ms, loss {done[1]['loss']:.5g}")
    together = len(live) > 1 and any(v.name == "ours" for _, v in live)
    for r in range(rounds):
        line = []
        for bench, v in [live[(r + i) % len(live)] for i in range(len(live))]:
            done = step(bench, v)
            if done is not None:
                records[v.name].samples.append(done[0])
                line.append(f"{v.name} {done[0] * 1e3:.0f}")
        LOAD_DURING.append(os.getloadavg()[0])
        log(f"  round {r + 1}/{rounds}: " + ", ".join(line) + f" (ms); load {LOAD_DURING[-1]:.1f}")
    for _bench, v in live:
        rec = records[v.name]
        rec.state = v.state_bytes()
        rec.paired = rec.paired or together
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


def bench_meta(bench: TrainingBench) -> dict[str, Any]:
    """What the report says of the adapter and the dtypes, read from a built bench."""
    return {
        "mole_layers": len(bench.mole_config.layer_names),
        "lora_modules": len(bench.lora_modules),
        "plain_lora_rank_on_mole_layers": bench.shape.top_k * bench.shape.rank,
        "dtype": str(bench.dtype).removeprefix("torch."),
        "autocast": "bf16" if bench.autocast else None,
    }


def option_records(shape: TrainShape, device: torch.device, option: MemoryOption) -> dict[str, Record]:
    """Empty records of one memory option, one per size (keyed by ``size_label``)."""
    dtype = dtype_name(torch.bfloat16 if device.type == "cuda" else torch.float32)
    return {
        size_label(side): Record(option.variant_name, [], option=option.describe(shape, dtype)) for side in shape.sides
    }


def build_option(
    shape: TrainShape,
    device: torch.device,
    option: MemoryOption,
    records: dict[str, Record],
    *,
    seed: int = 0,
    meta: dict[str, Any] | None = None,
) -> TrainingBench | None:
    """The bench of one memory option (``ours`` alone, the trainer's optimizer), or None with every row of
    ``records`` marked: "skipped" (a library the option needs is missing, or broken: the trainer's
    one-line ``ConfigError``) or "failed" (any other error, its first line). ``meta``: filled with
    ``bench_meta`` of the first bench built, if empty."""
    name = option.variant_name
    problem = option.missing()
    error: tuple[str, str] | None = ("skipped", problem) if problem else None
    bench = None
    if error is None:
        try:
            seconds, bench = timed(
                lambda: TrainingBench(
                    shape, device, option=option, seed=seed, variants=("ours",), trainer_optimizer=True
                ),
                device,
            )
        except ConfigError as err:  # the trainer's one sentence: a library missing or broken, a bad setting
            error = ("skipped", _one_line(err))
        except Exception as err:  # an out-of-memory, a kernel the device lacks: this option's row, not the run's end
            error = ("failed", f"{type(err).__name__}: {_one_line(err)}")
    if bench is None:
        _free(device)  # what a half-built bench held (the traceback is gone with the except clause)
        for rec in records.values():
            if rec.status == "ok":
                rec.status, rec.reason = error
        log(f"{name}: {error[0]}: {error[1]}")
        return None
    log(f"{name}: built in {seconds:.1f} s")
    if meta is not None and not meta:
        meta.update(bench_meta(bench))
    for rec in records.values():
        rec.build_s, rec.frozen, rec.host = seconds, bench.frozen_bytes(), bench.host_bytes()
    return bench


def measure_option(
    shape: TrainShape,
    device: torch.device,
    option: MemoryOption,
    records: dict[str, Record],
    *,
    seed: int = 0,
    rss: RssPeak | None = None,
    timing: bool = True,
    rounds: int = 1,
    warmup: int = 1,
    meta: dict[str, Any] | None = None,
) -> dict[str, Record]:
    """``ours`` with one memory option at every size of ``shape``, on a transformer of its own that is
    dropped afterwards; the results land in ``records`` (``option_records``).

    ``rss`` (CPU): first a memory step per size (``measure_cpu_memory``); ``timing``: then ``warmup``
    steps and ``rounds`` timed ones (on CUDA their peaks are the memory). Nothing raises: the option's
    rows say "skipped" or "failed" as ``build_option`` and the steps find, and the run goes on (the sizes
    measured before an error keep their numbers)."""
    name = option.variant_name
    sides = [side for side in shape.sides if records[size_label(side)].status == "ok"]
    if not sides:
        return records  # an earlier pass (memory, then time) already failed: no second try
    bench = build_option(
        shape, device, option, {size_label(s): records[size_label(s)] for s in sides}, seed=seed, meta=meta
    )
    if bench is None:
        return records
    error, done = None, set()
    try:
        for side in sides:
            rec = records[size_label(side)]
            if rss is not None:
                log(f"{size_label(side)}, {name}: memory")
                measure_cpu_memory(bench, side, {name: rec}, rss)
            if timing:
                log(f"{size_label(side)}, {name}: time")
                measure_time(bench, side, {name: rec}, rounds=rounds, warmup=warmup)
            done.add(side)
    except Exception as err:  # an out-of-memory, a kernel the device lacks: this option's row, not the run's end
        error = ("failed", f"{type(err).__name__}: {_one_line(err)}")
    bench = None  # the traceback is gone with the except clause: the transformer can be freed now
    _free(device)
    if error is not None:
        for side in sides:
            if side not in done:
                records[size_label(side)].status, records[size_label(side)].reason = error
        log(f"{name}: {error[0]}: {error[1]}")
    return records


def _free(device: torch.device) -> None:
    """Release dropped benches (their variants and transformer reference each other: a cycle)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:300] if lines else ""


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f}"
