"""What the results are judged against and how they are summarised: targets, ratios, the markdown table.

Why apart from the measuring: the JSON summary and the printed report are pure functions of the
records and the run's metadata, so they can change (or be re-rendered from a saved JSON) without
touching what is measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..common import markdown_table, median
from .measure import Record
from .setting import FP8_NAME

# What the design asks of the trainer, and what it measured for the reference (DESIGN.md §4).
TARGETS = {
    "ours / reference way time": "<= 0.8 (H100, full size), with no more peak memory",
    "ours / plain LoRA time": "<= 1.10",
    "ours, fp8 base peak at 1024² + reference": "<= 24 GB (CUDA)",
}
ANCHORS = {
    "reference step, H100, 1024² + reference": (
        "2955 ms, 30.7 GB (LoRA r256 + MoLE, bf16 trainables, checkpointing, fwd+bwd, no optimizer)"
    ),
    "reference step, H100, 512² + reference": "932 ms, 26.9 GB",
}


def _paired(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over rounds of a / b in the same round: cancels drift that spans a round."""
    return median([x / y for x, y in zip(a, b, strict=False)])


def summarise(records: dict[str, Record]) -> dict[str, Any]:
    ours = records.get("ours")
    ours = ours if ours is not None and ours.status == "ok" else None
    variants = {}
    for name, rec in records.items():
        entry: dict[str, Any] = {
            "median_ms": median(rec.samples) * 1e3 if rec.samples else None,  # None: a skipped or failed option
            "min_ms": min(rec.samples) * 1e3 if rec.samples else None,
            "samples_ms": [s * 1e3 for s in rec.samples],
            "peak_gib": None if rec.peak is None else rec.peak / 2**30,
            "step_peak_gib": None if rec.step_peak is None else rec.step_peak / 2**30,
            "state_gib": rec.state / 2**30,
            "frozen_gib": rec.frozen / 2**30,
            "first_step_losses": rec.first,
        }
        if rec.option is not None:  # a memory option's row: what it sets, the swapped weights, its status
            entry.update(option=rec.option, host_gib=rec.host / 2**30, build_s=rec.build_s)
            entry.update(status=rec.status, reason=rec.reason)
        if ours is not None and ours.samples and rec.samples:
            entry["vs_ours"] = median(rec.samples) / median(ours.samples)
            if rec.paired and ours.paired:  # timed in the same rounds (else: no rounds to pair with)
                entry["vs_ours_paired"] = _paired(rec.samples, ours.samples)
        variants[name] = entry
    ratios: dict[str, Any] = {}
    if ours is not None:
        for other in ("reference way", "plain LoRA"):
            if other in records and records[other].samples:
                rec = records[other]
                ratios[f"ours / {other} time"] = median(ours.samples) / median(rec.samples)
                ratios[f"ours / {other} time, paired"] = _paired(ours.samples, rec.samples)
                if ours.peak and rec.peak:
                    ratios[f"ours / {other} peak memory"] = ours.peak / rec.peak
    return {"variants": variants, "ratios": ratios}


def report(data: dict[str, Any]) -> str:
    """The markdown summary printed to stdout."""
    cfg, env = data["config"], data["environment"]
    cuda = env["device"].startswith("cuda")
    where = env.get("gpu") or f"{env['cpu']}, {env['torch_threads']} threads"
    options = data.get("mode") == "memory options"
    step = "fwd + bwd + clip + each option's optimizer" if options else "fwd + bwd + clip + AdamW"
    rounds = f"medians of {cfg['rounds']} interleaved rounds after {cfg['warmup']} warm-up step(s)."
    if options:
        rounds = (
            f"each option on its own transformer; timed steps: {cfg.get('timing', 'one option after another')}; "
            f"medians of {cfg['rounds']} after {cfg['warmup']} warm-up step(s); optimizer: {cfg['optimizer']}."
        )
    head = [
        f"`{data['command']}`",
        "",
        f"InstructMoLE training step, size {cfg['name']} ({cfg['num_double']}+{cfg['num_single']} blocks, hidden "
        f"{cfg['hidden']}, {cfg['text_tokens']} text tokens; batch 1, target + same-size reference, gradient "
        f"checkpointing, {step}; base {cfg['dtype']}"
        f"{', bf16 autocast' if cfg['autocast'] else ''}; MoLE N={cfg['num_experts']} k={cfg['top_k']} "
        f"r={cfg['rank']} on {cfg['mole_layers']} layers, peft LoRA r={cfg['lora_rank']} on "
        f"{cfg['lora_modules']} Linears) on {where}; torch {env['torch']}, diffusers {env['diffusers']}; {rounds}",
    ]
    mem = "peak GiB (max allocated, alone)" if cuda else "peak GiB (frozen + state + step RSS)"
    header = ["size", "variant", "median ms", "× ours", "× ours, paired", "min ms", mem, "state GiB", "step GiB"]
    host = any(v.get("host_gib") for s in data["sizes"].values() for v in s["variants"].values())
    if host:
        header.append("swapped to CPU GiB")
    rows = []
    for label, s in data["sizes"].items():
        for name, v in s["variants"].items():
            if v.get("status", "ok") != "ok":  # one line: why this option has no numbers
                reason = (v.get("reason") or "").replace("|", "/")
                rows.append((label, name, f"{v['status']}: {reason}", *[""] * (len(header) - 3)))
                continue
            row = [
                label,
                name,
                f"{v['median_ms']:.0f}",
                f"{v['vs_ours']:.3f}" if "vs_ours" in v else "",
                f"{v['vs_ours_paired']:.3f}" if "vs_ours_paired" in v else "",
                f"{v['min_ms']:.0f}",
                _f2(v["peak_gib"]),
                f"{v['state_gib']:.2f}",
                _f2(v["step_peak_gib"]),
            ]
            if host:
                row.append(f"{v.get('host_gib') or 0:.2f}")
            rows.append(row)
    parts = [*head, "", markdown_table(header, rows)]
    checks = []
    for label, s in data["sizes"].items():
        for name, value in s["ratios"].items():
            checks.append((label, name, f"{value:.3f}", _target_of(name)))
        fp8 = s["variants"].get(FP8_NAME)
        if fp8 is not None and fp8["peak_gib"] is not None:
            gb = fp8["peak_gib"] * 2**30 / 1e9
            target = TARGETS[f"{FP8_NAME} peak at 1024² + reference"]
            checks.append((label, f"{FP8_NAME}: peak GB (10⁹ bytes)", f"{gb:.2f}", target))
    if checks:
        parts += ["", markdown_table(("size", "check", "value", "target"), checks)]
    notes = [
        f"Memory: {cfg['memory']}.",
        *(
            [
                "'× ours' of a row without a paired ratio compares across phases (a memory option timed on its own "
                "transformer apart from ours), so it is not paired."
            ]
            if any(
                "vs_ours" in v and "vs_ours_paired" not in v
                for s in data["sizes"].values()
                for v in s["variants"].values()
            )
            else []
        ),
        "Anchors (DESIGN.md §4, reference code on an H100, bf16 trainables, fwd+bwd without optimizer): "
        + "; ".join(f"{k}: {v}" for k, v in ANCHORS.items())
        + ".",
        "Targets: " + "; ".join(f"{k} {v}" for k, v in TARGETS.items()) + ".",
    ]
    during = env.get("load_average_1min_max_during") or 0.0
    busy = max(env["load_average_before"][0], env["load_average_after"][0], during)
    if not cuda and busy > env["torch_threads"] + 0.5:
        notes.append(
            f"The machine was shared (1-minute load average up to {busy:.1f} during the run, "
            f"{env['torch_threads']} benchmark threads on {env['cpu_count']} cores): other processes inflate some "
            "samples; the paired ratios and the min column are the cleaner comparisons."
        )
    parts += ["", *[f"- {n}" for n in notes]]
    return "\n".join(parts)


def _target_of(ratio: str) -> str:
    if ratio.endswith("peak memory"):
        return "<= 1.0 (no more memory)" if "reference" in ratio else ""
    return TARGETS.get(ratio.removesuffix(", paired"), "")


def _f2(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"
