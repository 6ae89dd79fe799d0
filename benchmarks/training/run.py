"""The command line: parse the options, build the benches, run the phases, write the JSON and the report.

Why the phases differ by device: on CUDA one transformer at a time is on the device, so every peak
is its own; on the CPU every bench is built first and all memory steps run before any timing,
because RSS measured after glibc is set to keep freed memory is inflated by refaulting freed heap
chunks (see ``memory.py`` and ``common.keep_freed_memory``).

Two modes. The comparison (default): ours, plain LoRA and the reference way, interleaved, and with
``--quantize-base`` / ``--fp8-base``, ``--block-swap`` or ``--optimizer`` one more measurement of ours
with that memory option on its own transformer. ``--memory-options [LIST]``: ours alone, once per memory
option (``options.py``), each on its own transformer built, measured and dropped in turn (on the CPU
twice: a pass of memory steps over all options, then a timed pass), so no more than one is in memory;
an option whose library is missing is a row "skipped: <why>", one that fails a row "failed: <error>".
"""

from __future__ import annotations

import argparse
import gc
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from training.optim import OPTIMIZERS
from training.quantize import QUANTIZE_FORMATS

from ..common import environment, keep_freed_memory, log, timed, write_json
from .bench import TrainingBench
from .measure import (
    LOAD_DURING,
    Record,
    bench_meta,
    build_option,
    interleave,
    measure_cpu_memory,
    measure_option,
    measure_time,
    new_records,
    option_records,
)
from .memory import RssPeak, return_freed_memory
from .options import ALL_BLOCKS, BASELINE, DEFAULT_OPTIONS, MemoryOption, parse_options
from .report import ANCHORS, TARGETS, report, summarise
from .setting import SIZES, VARIANTS, TrainShape, size_label


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
    p.add_argument(
        "--quantize-base",
        choices=QUANTIZE_FORMATS,
        help="also measure ours with model.quantize_base=FORMAT (own transformer, after the comparison)",
    )
    p.add_argument("--fp8-base", action="store_true", help="the same as --quantize-base fp8 (its earlier name)")
    p.add_argument(
        "--block-swap",
        metavar="N|all",
        help="also measure ours with model.block_swap=N (the last N blocks' frozen weights in CPU memory)",
    )
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="also measure ours with train.optimizer=NAME")
    p.add_argument(
        "--memory-options",
        nargs="?",
        const=",".join(o.spec for o in DEFAULT_OPTIONS),
        metavar="LIST",
        help="measure only ours, once per memory option, each on its own transformer; LIST: comma-separated "
        "specs, '+' joining a base format (fp8/int8/nf4), an optimizer and swap-all or swapN, or 'base' "
        f"(default: {','.join(o.spec for o in DEFAULT_OPTIONS)})",
    )
    p.add_argument("--lora-rank", type=int, help="plain-LoRA rank (default: 256 full, scaled with the hidden size)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (CPU runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--system-malloc",
        action="store_true",
        help="CPU: time with glibc's default allocator (default: keep freed memory, see common.keep_freed_memory)",
    )
    p.add_argument(
        "--out",
        help="JSON path (default: benchmarks/results/training-<device>[-<size>][-memory].json)",
    )
    args = p.parse_args(argv)
    if args.fp8_base:
        if args.quantize_base not in (None, "fp8"):
            p.error(f"--fp8-base is --quantize-base fp8; it cannot go with --quantize-base {args.quantize_base}")
        args.quantize_base = "fp8"
    swap = 0
    if args.block_swap is not None:
        text = args.block_swap.strip().lower()
        if text == "all":
            swap = ALL_BLOCKS
        elif text.isdigit():
            swap = int(text)
        else:
            p.error(f"--block-swap takes a count of blocks or 'all'; got {args.block_swap!r}")
    args.extra = MemoryOption(args.quantize_base or "none", swap, args.optimizer or "adamw")
    if args.memory_options is not None:
        if not args.extra.is_baseline:
            p.error(
                "--memory-options measures its own list of options; --quantize-base, --fp8-base, --block-swap "
                "and --optimizer add one option to the comparison: write it into the list instead"
            )
        try:
            args.options = parse_options(args.memory_options)
        except ValueError as err:
            p.error(str(err))
    return args


def _check_swap(option: MemoryOption, shape: TrainShape) -> None:
    blocks = shape.num_double + shape.num_single
    if option.swap_count(shape) > blocks:
        raise SystemExit(
            f"block swap of {option.swap_count(shape)} blocks asked for, but size {shape.name} has {blocks} "
            f"({shape.num_double} double + {shape.num_single} single); use at most {blocks}, or all"
        )


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
    memory_mode = args.memory_options is not None
    options: tuple[MemoryOption, ...] = args.options if memory_mode else (args.extra,)
    for option in options:
        _check_swap(option, shape)
    if not memory_mode and not args.extra.is_baseline and args.extra.missing():
        raise SystemExit(args.extra.missing())
    out_path = args.out or f"benchmarks/results/training-{device.type}{suffix}{'-memory' if memory_mode else ''}.json"
    command = "PYTHONPATH=. python -m benchmarks.training " + shlex.join(sys.argv[1:] if argv is None else argv)

    log(
        f"size {size}: {shape.num_double}+{shape.num_single} blocks, hidden {shape.hidden}, "
        f"{shape.text_tokens} text tokens, sides {shape.sides}, on {device}; MoLE N={shape.num_experts} "
        f"k={shape.top_k} r={shape.rank}, LoRA r={shape.lora_rank}; {warmup} warmup, {rounds} rounds"
    )
    load_before = os.getloadavg()
    LOAD_DURING.clear()
    if rss is not None and not tiny:
        return_freed_memory()  # from the start: RSS then tracks live memory (measure_cpu_memory)
    labels = [size_label(side) for side in shape.sides]
    results: dict[str, dict[str, Record]] = {label: {} for label in labels}
    meta: dict[str, Any] = {}
    if memory_mode:
        timing = _memory_options(args, shape, device, rss, malloc, rounds, warmup, results, meta)
    else:
        _comparison(args, shape, device, rss, malloc, rounds, warmup, results, meta)
        timing = "interleaved rounds" + ("" if args.extra.is_baseline else "; the memory option after them, alone")
    load_after = os.getloadavg()

    data: dict[str, Any] = {
        "benchmark": "training",
        "mode": "memory options" if memory_mode else "comparison",
        "command": command,
        "config": {
            **asdict(shape),
            "hidden": shape.hidden,
            "mlp": 4 * shape.hidden,
            "batch": 1,
            **meta,
            "gradient_checkpointing": True,
            "optimizer": (
                "each row's train.optimizer as training.optim.build_optimizer builds it (AdamW: torch's fused kernel)"
                if memory_mode
                else "torch AdamW (not fused) for every variant; another train.optimizer as the trainer builds it"
            ),
            "memory_options": [o.spec for o in options if memory_mode or not o.is_baseline],
            "rounds": rounds,
            "warmup": warmup,
            "timing": timing,
            "malloc": {
                "keep-freed": "timed steps: glibc keeps freed memory (common.keep_freed_memory)",
                "system": "glibc defaults",
            }[malloc],
            "memory": _memory_note(cuda, memory_mode, any(o.block_swap for o in options)),
        },
        "environment": {
            **environment(device),
            "load_average_before": load_before,
            "load_average_after": load_after,
            "load_average_1min_max_during": max(LOAD_DURING, default=None),
        },
        "targets": TARGETS,
        "anchors": ANCHORS,
        "sizes": {label: summarise(recs) for label, recs in results.items()},
    }
    write_json(out_path, data)
    print(report(data))
    log(f"wrote {out_path}")
    return data


def _memory_note(cuda: bool, memory_mode: bool, swap: bool) -> str:
    if cuda:
        note = "torch.cuda.max_memory_allocated per step"
        note += "" if memory_mode else ", other variants' state parked on the CPU"
    else:
        note = (
            "one untimed step per variant and size, before any timing, glibc returning freed memory (mmap for >= "
            "128 KiB, trimmed heap): its peak RSS (VmHWM, reset via /proc/self/clear_refs) minus the RSS before it, "
            "plus the frozen base and the variant's weights + optimizer state counted from the tensors"
        )
    if swap:
        note += (
            "; block swap: the swapped blocks' weights wait in CPU memory (the last column), outside the peak, as "
            "on a GPU (on the CPU both are the same memory; the blocks copied in during the step are in the peak)"
        )
    return note


def _comparison(
    args: argparse.Namespace,
    shape: TrainShape,
    device: torch.device,
    rss: RssPeak | None,
    malloc: str,
    rounds: int,
    warmup: int,
    results: dict[str, dict[str, Record]],
    meta: dict[str, Any],
) -> None:
    """Ours, plain LoRA and the reference way interleaved; then ours with ``args.extra`` if one was asked for."""
    cuda = device.type == "cuda"
    labels = [size_label(side) for side in shape.sides]

    def build(option: MemoryOption) -> TrainingBench:
        variants = VARIANTS if option.is_baseline else ("ours",)
        seconds, bench = timed(
            lambda: TrainingBench(shape, device, option=option, seed=args.seed, variants=variants), device
        )
        log(f"built{f' ({option.label})' if option.label else ''} in {seconds:.1f} s")
        return bench

    def where(option: MemoryOption) -> str:
        return f", {option.label}" if option.label else ""

    phases = [BASELINE] if args.extra.is_baseline else [BASELINE, args.extra]
    if cuda:  # one transformer at a time on the device: each peak is its own
        for option in phases:
            bench = build(option)
            meta.update(meta or bench_meta(bench))
            for side, label in zip(shape.sides, labels, strict=True):
                log(f"{label}{where(option)}")
                records = new_records(bench)
                measure_time(bench, side, records, rounds=rounds, warmup=warmup)
                results[label].update(records)
            bench = None
            _free()
    else:  # memory first (allocator returning freed memory), then timing (keeping it)
        benches = [build(option) for option in phases]
        meta.update(bench_meta(benches[0]))
        per = [{label: new_records(b) for label in labels} for b in benches]
        if rss is not None:
            for bench, records in zip(benches, per, strict=True):
                for side, label in zip(shape.sides, labels, strict=True):
                    log(f"{label}{where(bench.option)}: memory")
                    measure_cpu_memory(bench, side, records[label], rss)
        if malloc == "keep-freed":
            keep_freed_memory()
        for bench, records in zip(benches, per, strict=True):
            for side, label in zip(shape.sides, labels, strict=True):
                log(f"{label}{where(bench.option)}: time")
                measure_time(bench, side, records[label], rounds=rounds, warmup=warmup)
                results[label].update(records[label])
        benches = per = None
        _free()


def _memory_options(
    args: argparse.Namespace,
    shape: TrainShape,
    device: torch.device,
    rss: RssPeak | None,
    malloc: str,
    rounds: int,
    warmup: int,
    results: dict[str, dict[str, Record]],
    meta: dict[str, Any],
) -> str:
    """Ours once per memory option, each on its own transformer; a missing library or an error is that row.
    Returns how the timed steps were taken (for the JSON)."""
    per = {option: option_records(shape, device, option) for option in args.options}
    log(f"memory options: {', '.join(o.spec for o in args.options)}")
    timing = "one option after another, each built, timed and dropped"
    if device.type == "cuda":  # one pass, one transformer at a time: the timed steps' peaks are the memory
        for option in args.options:
            measure_option(shape, device, option, per[option], seed=args.seed, rounds=rounds, warmup=warmup, meta=meta)
    else:  # every memory step (allocator returning freed memory) before any timing (keeping it)
        if rss is not None:
            for option in args.options:
                measure_option(shape, device, option, per[option], seed=args.seed, rss=rss, timing=False, meta=meta)
        if malloc == "keep-freed":
            keep_freed_memory()
        fits = _all_fit(per, rss is not None)
        if fits is None:
            for option in args.options:
                kw = {"seed": args.seed, "rounds": rounds, "warmup": warmup, "meta": meta}
                measure_option(shape, device, option, per[option], **kw)
        else:  # every option built at once, timed in interleaved rounds: load on a shared machine hits all alike
            timing = f"interleaved rounds over every option, all built at once ({fits})"
            benches = {}
            for option in args.options:
                if any(r.status == "ok" for r in per[option].values()):
                    bench = build_option(shape, device, option, per[option], seed=args.seed, meta=meta)
                    if bench is not None:
                        benches[option] = bench
            for side in shape.sides:
                label = size_label(side)
                pairs = [(b, b.variants[0]) for o, b in benches.items() if per[o][label].status == "ok"]
                log(f"{label}: time, {len(pairs)} options interleaved")
                records = {o.variant_name: per[o][label] for o in benches}
                interleave(pairs, side, records, rounds=rounds, warmup=warmup, tolerant=True)
            benches = None
            _free()
    for option in args.options:
        for label, rec in per[option].items():
            results[label][rec.name] = rec
    if not meta:  # no option could be built: what the shape alone says
        dtype = str(torch.bfloat16 if device.type == "cuda" else torch.float32).removeprefix("torch.")
        meta.update(mole_layers=None, lora_modules=None, plain_lora_rank_on_mole_layers=shape.top_k * shape.rank)
        meta.update(dtype=dtype, autocast="bf16" if device.type == "cuda" else None)
    return timing


def _all_fit(per: dict[MemoryOption, dict[str, Record]], measured: bool) -> str | None:
    """CPU: whether every option's bench fits in memory at once (weights, swapped weights and optimizer
    state as the memory pass counted them, plus the largest step, within half of what the system has
    available), as a phrase for the JSON; None if not or unknown (then one option after another)."""
    if not measured:
        return None
    recs = [r for records in per.values() for r in records.values() if r.status == "ok" and r.step_peak is not None]
    if not recs:
        return None
    held = sum(
        max(r.frozen + r.host + r.state for r in records.values())
        for records in per.values()
        if any(r.status == "ok" for r in records.values())
    )
    need = held + max(r.step_peak for r in recs)
    available = _available_bytes()
    if available is None or need > available / 2:
        log(
            f"timing one option after another: all at once would hold {need / 2**30:.1f} GiB, "
            f"{'unknown' if available is None else f'{available / 2**30:.1f} GiB'} available"
        )
        return None
    return f"{need / 2**30:.1f} GiB held, {available / 2**30:.1f} GiB were available"


def _available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
