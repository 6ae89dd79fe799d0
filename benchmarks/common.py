"""Timing helpers shared by the benchmark scripts.

Why these exist rather than ``timeit``: every number we publish compares variants of one model
measured in the same process, so the helpers (a) synchronise the accelerator around each timed
call, (b) interleave the variants round by round (rotating who goes first) so that drift in
clocks, caches or thermal state hits every variant alike, and (c) report medians, which shrug
off the odd descheduled run on a 2-core CI box.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

__all__ = [
    "Detachable",
    "Variant",
    "default_dtype",
    "environment",
    "log",
    "markdown_table",
    "median",
    "random_flux",
    "run_interleaved",
    "sync",
    "timed",
    "write_json",
]


def log(message: str) -> None:
    """Progress goes to stderr so stdout carries only the result tables."""
    print(message, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    """Wait for queued kernels: without it a CUDA timer measures only the launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """``(seconds, result)`` of one call, synchronised on both sides."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Construct modules directly in ``dtype`` (a 12B model built in fp32 first would not fit)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class Detachable(Protocol):
    def detach(self) -> None: ...


@dataclass
class Variant:
    """One way of running the same forward: ``setup`` installs it (hooks, merged weights) and
    returns something to ``detach`` afterwards (or None for the bare model)."""

    name: str
    setup: Callable[[], Detachable | None]
    group: str = "main"
    samples: list[float] = field(default_factory=list)  # forward seconds
    setup_samples: list[float] = field(default_factory=list)  # setup seconds (the fold, when merged)
    first_output: torch.Tensor | None = None
    peak_bytes: int | None = None


def _install(variant: Variant, device: torch.device) -> tuple[float, Detachable | None]:
    with torch.no_grad():
        return timed(variant.setup, device)


def run_interleaved(
    variants: Sequence[Variant],
    forward: Callable[[], torch.Tensor],
    device: torch.device,
    *,
    rounds: int,
    warmup: int,
    per_round: int = 1,
) -> None:
    """Warm each variant up, then time ``rounds`` rounds that each cycle through all variants.

    Results land on the variants (``samples``, ``setup_samples``, ``first_output``, ``peak_bytes``).
    The starting variant rotates every round, so none always runs right after the same neighbour.
    """
    for v in variants:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _, handle = _install(v, device)
        try:
            for i in range(max(warmup, 1)):
                seconds, out = timed(forward, device)
                if i == 0:
                    v.first_output = out.detach().float().cpu()
                log(f"  warmup {v.name}: {seconds * 1e3:.1f} ms")
        finally:
            if handle is not None:
                handle.detach()
        if device.type == "cuda":
            v.peak_bytes = torch.cuda.max_memory_allocated(device)
    count = len(variants)
    for r in range(rounds):
        order = [variants[(r + i) % count] for i in range(count)]
        line = []
        for v in order:
            setup_s, handle = _install(v, device)
            v.setup_samples.append(setup_s)
            try:
                for _ in range(per_round):
                    seconds, _ = timed(forward, device)
                    v.samples.append(seconds)
            finally:
                if handle is not None:
                    handle.detach()
            line.append(f"{v.name} {v.samples[-1] * 1e3:.0f}")
        log(f"  round {r + 1}/{rounds}: " + ", ".join(line) + " (ms)")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on, recorded next to them."""
    try:
        import diffusers
    except ImportError:  # the ComfyUI benchmark may run where diffusers is absent
        diffusers = None

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__ if diffusers is not None else None,
        "device": str(device),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Write through a ``.tmp`` sibling and rename, so an interrupted run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process (no mmap for large blocks, no trimming).

    Why: by default a forward's large activations (ComfyUI's sub-quadratic attention allocates
    ~60 MiB score matrices at the scaled config) come from fresh mmaps or from whatever free chunk
    the heap happens to hold, so each forward can take 0.2-0.6 M minor page faults (1-2 GB of page
    zeroing) depending on heap layout. Measured: merged ran 10-20 % slower than base only because
    its patched weights took the free heap chunk an attention buffer had used; with this setting
    every variant settles at ~0 faults per forward and the comparison is of compute again.
    Process-wide and not undone; returns False where it does not apply (not Linux glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def random_flux(dims: Any, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """A random Kontext-shaped diffusers Flux transformer built directly on ``device`` in ``dtype``.

    ``dims`` has ``in_channels``, ``num_double``, ``num_single``, ``head_dim``, ``heads``,
    ``text_dim``, ``pooled_dim`` and ``axes_dims_rope`` (the benchmarks' config types all do).
    """
    from diffusers import FluxTransformer2DModel

    if sum(dims.axes_dims_rope) != dims.head_dim:
        raise ValueError(f"axes_dims_rope {dims.axes_dims_rope} must sum to the head dim {dims.head_dim}")
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        return FluxTransformer2DModel(
            patch_size=1,
            in_channels=dims.in_channels,
            num_layers=dims.num_double,
            num_single_layers=dims.num_single,
            attention_head_dim=dims.head_dim,
            num_attention_heads=dims.heads,
            joint_attention_dim=dims.text_dim,
            pooled_projection_dim=dims.pooled_dim,
            guidance_embeds=True,
            axes_dims_rope=dims.axes_dims_rope,
        )
