"""The command line: parse the options, build the benches, run the phases, write the JSON and the report.

Why the phases differ by device: on CUDA one transformer at a time is on the device, so every peak
is its own; on the CPU every bench is built first and all memory steps run before any timing,
because RSS measured after glibc is set to keep freed memory is inflated by refaulting freed heap
chunks (see ``memory.py`` and ``common.keep_freed_memory``).
"""

from __future__ import annotations

import argparse
import gc
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

import torch

from ..common import environment, keep_freed_memory, log, timed, write_json
from .bench import TrainingBench
from .measure import Record, measure_cpu_memory, measure_time, new_records
from .memory import RssPeak, return_freed_memory
from .report import ANCHORS, TARGETS, report, summarise
from .setting import SIZES, VARIANTS, size_label


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The options; ``--help`` opens with the first paragraph of the package's docstring."""
    summary = (sys.modules[__package__].__doc__ or "").split("\n\n")[0]
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.training",  # not "__main__.py", the name argparse would take
        description=summary,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", choices=sorted(SIZES), help="default: full on CUDA, scaled on CPU")
    p.add_argument("--sides", type=int, nargs="+", help="packed latent tokens per target side (default: the size's)")
    p.add_argument("--rounds", type=int, help="interleaved timed rounds (default: 8 CUDA, 3 CPU)")
    p.add_argument("--warmup", type=int, help="untimed steps per variant and size first (default: 2 CUDA, 1 CPU)")
    p.add_argument("--fp8-base", action="store_true", help="also measure ours with model.fp8_base (own transformer)")
    p.add_argument("--lora-rank", type=int, help="plain-LoRA rank (default: 256 full, scaled with the hidden size)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (CPU runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--system-malloc",
        action="store_true",
        help="CPU: time with glibc's default allocator (default: keep freed memory, see common.keep_freed_memory)",
    )
    p.add_argument("--out", help="JSON path (default: benchmarks/results/training-<device>[-<size>].json)")
    return p.parse_args(argv)


def _meta(bench: TrainingBench) -> dict[str, Any]:
    return {
        "mole_layers": len(bench.mole_config.layer_names),
        "lora_modules": len(bench.lora_modules),
        "plain_lora_rank_on_mole_layers": bench.shape.top_k * bench.shape.rank,
        "dtype": str(bench.dtype).removeprefix("torch."),
        "autocast": "bf16" if bench.autocast else None,
    }


def _free() -> None:
    """Release a dropped bench (its variants and the transformer reference each other: a cycle)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print a markdown table to stdout, write JSON, return the results."""
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    if cuda:
        torch.backends.cuda.enable_cudnn_sdp(False)  # its SDPA backward failed on our H100s (as the trainer)
    else:
        torch.set_num_threads(args.threads)
    default_size = "full" if cuda else "scaled"
    size = args.size or default_size
    shape = SIZES[size]
    if args.lora_rank:
        shape = replace(shape, lora_rank=args.lora_rank)
    if args.sides:
        shape = replace(shape, sides=tuple(args.sides))
    rounds = args.rounds if args.rounds is not None else (8 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (2 if cuda else 1)
    rss = RssPeak() if not cuda else None
    rss = rss if rss is not None and rss.ok else None
    tiny = size == "tiny"  # the smoke test: leave the test process's allocator alone
    malloc = "system" if (cuda or tiny or args.system_malloc) else "keep-freed"
    suffix = "" if size == default_size else f"-{size}"
    out_path = args.out or f"benchmarks/results/training-{device.type}{suffix}.json"
    command = "PYTHONPATH=. python -m benchmarks.training " + shlex.join(sys.argv[1:] if argv is None else argv)

    log(
        f"size {size}: {shape.num_double}+{shape.num_single} blocks, hidden {shape.hidden}, "
        f"{shape.text_tokens} text tokens, sides {shape.sides}, on {device}; MoLE N={shape.num_experts} "
        f"k={shape.top_k} r={shape.rank}, LoRA r={shape.lora_rank}; {warmup} warmup, {rounds} rounds"
    )
    load_before = os.getloadavg()
    if rss is not None and not tiny:
        return_freed_memory()  # from the start: RSS then tracks live memory (measure_cpu_memory)
    labels = [size_label(side) for side in shape.sides]
    results: dict[str, dict[str, Record]] = {label: {} for label in labels}

    def build(fp8: bool) -> TrainingBench:
        variants = ("ours",) if fp8 else VARIANTS
        seconds, bench = timed(
            lambda: TrainingBench(shape, device, fp8_base=fp8, seed=args.seed, variants=variants), device
        )
        log(f"built{' (fp8 base)' if fp8 else ''} in {seconds:.1f} s")
        return bench

    phases = [False, True] if args.fp8_base else [False]
    meta: dict[str, Any] = {}
    if cuda:  # one transformer at a time on the device: each peak is its own
        for fp8 in phases:
            bench = build(fp8)
            meta = meta or _meta(bench)
            for side, label in zip(shape.sides, labels, strict=True):
                log(f"{label}{', fp8 base' if fp8 else ''}")
                records = new_records(bench)
                measure_time(bench, side, records, rounds=rounds, warmup=warmup)
                results[label].update(records)
            bench = None
            _free()
    else:  # memory first (allocator returning freed memory), then timing (keeping it)
        benches = [build(fp8) for fp8 in phases]
        meta = _meta(benches[0])
        per = [{label: new_records(b) for label in labels} for b in benches]
        if rss is not None:
            for bench, records in zip(benches, per, strict=True):
                for side, label in zip(shape.sides, labels, strict=True):
                    log(f"{label}{', fp8 base' if bench is not benches[0] else ''}: memory")
                    measure_cpu_memory(bench, side, records[label], rss)
        if malloc == "keep-freed":
            keep_freed_memory()
        for bench, records in zip(benches, per, strict=True):
            for side, label in zip(shape.sides, labels, strict=True):
                log(f"{label}{', fp8 base' if bench is not benches[0] else ''}: time")
                measure_time(bench, side, records[label], rounds=rounds, warmup=warmup)
                results[label].update(records[label])
        benches = per = None
        _free()
    load_after = os.getloadavg()

    data: dict[str, Any] = {
        "benchmark": "training",
        "command": command,
        "config": {
            **asdict(shape),
            "hidden": shape.hidden,
            "mlp": 4 * shape.hidden,
            "batch": 1,
            **meta,
            "gradient_checkpointing": True,
            "rounds": rounds,
            "warmup": warmup,
            "malloc": {
                "keep-freed": "timed steps: glibc keeps freed memory (common.keep_freed_memory)",
                "system": "glibc defaults",
            }[malloc],
            "memory": (
                "torch.cuda.max_memory_allocated per step, other variants' state parked on the CPU"
                if cuda
                else "one untimed step per variant and size, before any timing, glibc returning freed memory (mmap "
                "for >= 128 KiB, trimmed heap): its peak RSS (VmHWM, reset via /proc/self/clear_refs) minus the RSS "
                "before it, plus the frozen base and the variant's weights + AdamW state counted from the tensors"
            ),
        },
        "environment": {**environment(device), "load_average_before": load_before, "load_average_after": load_after},
        "targets": TARGETS,
        "anchors": ANCHORS,
        "sizes": {label: summarise(recs) for label, recs in results.items()},
    }
    write_json(out_path, data)
    print(report(data))
    log(f"wrote {out_path}")
    return data
