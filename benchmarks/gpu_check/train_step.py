"""The GPU check's training stage: one training step of the reference recipe under each memory option.

Why: the trainer's memory options (``model.quantize_base``, ``model.block_swap``, ``train.optimizer``)
and the plan that chooses among them (``python -m training --plan``) have only been measured on a
CPU; what a card needs for the reference recipe at 1024² + one reference is what a user buys a card
by. So this stage takes, on the full-size random-weight FLUX.1 Kontext transformer in bf16 (built as
the other stages build it: ``benchmarks.common.random_flux``), the trainer's own step (``ours`` of
``benchmarks.training``: its config, ``setup_transformer``, ``TrainingModel``, ``BlockSwap``,
``build_optimizer``) once per option: one warm-up step (it creates the optimizer state), then one
timed step whose ``torch.cuda.max_memory_allocated`` is the option's peak.

Every option runs on a transformer of its own, built and dropped in turn, under the stage's clock:
an option that would not finish in the time left (judged from the options before it) is a row "not
run: out of time" rather than the reason the stage is killed; one that fails (a missing library, an
out-of-memory, a kernel the device lacks) is a row with its one-line error, and the stage goes on.
Rows are written as they come, so a stage killed at its limit still reports what it measured.

``--dry-run``: the same code on ``instructmole.tiny``'s Flux on the CPU, in fp32; the peak there is the
step's resident memory (``benchmarks.training.memory.RssPeak``) plus the weights and optimizer state.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any

import torch

from .stage import StageContext, StageResult, require

__all__ = ["FULL_SIDE", "training_stage"]

FULL_SIDE = 64  # packed tokens per side of a 1024² target (VAE 8×, 2×2 packing); the reference is as large
RESERVE_S = 4.0  # kept back at the end of the stage: the last row and the stage's result are written
# An option's time is judged from the slowest before it; block swap also pins and copies the whole base
# to the host first.
GROWTH = {"plain": 1.2, "swap": 2.0}
HALF_DEPTH_BELOW_GIB = 48.0  # the bf16 baseline's planned peak is ~39 GiB (README), plus the context and slack
TARGET_CARD_GB = 24.0  # README: the reference recipe fits a 24 GB card with an nf4 base and 8-bit AdamW


def _shape(ctx: StageContext) -> Any:
    from ..training.setting import SIZES

    if ctx.dry_run:
        return SIZES["tiny"]
    shape = replace(SIZES["full"], sides=(FULL_SIDE,))
    free, _ = torch.cuda.mem_get_info()
    if free < HALF_DEPTH_BELOW_GIB * 2**30:
        shape = replace(shape, name="full width, half depth", num_double=9, num_single=19)
        ctx.log(f"only {free / 2**30:.0f} GiB free: building {shape.num_double}+{shape.num_single} blocks")
    return shape


def _gib(n: int | None) -> float | None:
    return None if n is None else n / 2**30


def training_stage(ctx: StageContext, res: StageResult) -> None:
    """One step of the trainer under each memory option (``GPU_CHECK_OPTIONS``), a row each."""
    require("diffusers", "the training stage builds diffusers' FluxTransformer2DModel")
    require("peft", "the reference recipe's plain LoRA is peft's")
    from ..training.measure import measure_option, option_records
    from ..training.memory import RssPeak
    from ..training.options import GPU_CHECK_OPTIONS
    from ..training.setting import size_label

    device = torch.device(ctx.device)
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)  # as the trainer: its SDPA backward failed on our H100s
    shape = _shape(ctx)
    side = shape.sides[-1]
    label = size_label(side)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    res.put(
        config=shape.name,
        blocks=f"{shape.num_double}+{shape.num_single}",
        hidden=shape.hidden,
        dtype=dtype,
        tokens=f"{side * side} target + {side * side} reference + {shape.text_tokens} text",
        size=label,
        recipe=(
            f"MoLE N={shape.num_experts} k={shape.top_k} r={shape.rank} on the reference's layers, peft LoRA "
            f"r={shape.lora_rank} on the reference's Linears, gradient checkpointing"
            + (", bf16 autocast, fp32 trainable weights" if device.type == "cuda" else ", fp32")
        ),
        memory=(
            "torch.cuda.max_memory_allocated of the timed step (after a warm-up step that creates the optimizer state)"
            if device.type == "cuda"
            else "CPU: the step's peak RSS growth (VmHWM) + frozen base + trainable weights + optimizer state"
        ),
    )
    rows: dict[str, dict[str, Any]] = {
        o.spec: {"name": o.variant_name, "status": "not run", "reason": "out of time: the stage's limit came first"}
        for o in GPU_CHECK_OPTIONS
    }
    res.put(options=rows)
    rss = None
    if device.type == "cpu":
        rss = RssPeak()
        rss = rss if rss.ok else None
    took: list[float] = []
    for option in GPU_CHECK_OPTIONS:
        row = rows[option.spec]
        left = ctx.left() - RESERVE_S
        need = max(took) * GROWTH["swap" if option.block_swap else "plain"] if took else 0.0
        if left <= 0 or need > left:
            row["reason"] = f"out of time: about {need:.0f} s needed, {max(left, 0):.0f} s left in the stage"
            ctx.log(f"{option.variant_name}: not run ({row['reason']})")
            res.put(options=rows)
            continue
        row["reason"] = f"started at +{ctx.elapsed():.0f} s; the stage's limit came before it ended"
        res.put(options=rows)
        ctx.log(f"{option.variant_name}: building and stepping")
        began = time.perf_counter()
        records = option_records(shape, device, option)
        measure_option(shape, device, option, records, rss=rss, rounds=1, warmup=1)
        seconds = time.perf_counter() - began
        rec = records[label]
        row.update(status=rec.status, reason=rec.reason, seconds=seconds, option=rec.option)
        if rec.status == "ok":
            took.append(seconds)
            row.update(
                ms_per_step=rec.samples[0] * 1e3 if rec.samples else None,
                peak_gib=_gib(rec.peak),
                step_peak_gib=_gib(rec.step_peak),
                state_gib=_gib(rec.state),
                frozen_gib=_gib(rec.frozen),
                host_gib=_gib(rec.host),
                build_s=rec.build_s,
                losses=rec.first,
            )
        ctx.log(
            f"{option.variant_name}: {rec.status}"
            + (f" ({rec.reason})" if rec.reason else "")
            + (f", {row['ms_per_step']:.0f} ms/step, peak {_num(row['peak_gib'])} GiB" if rec.status == "ok" else "")
            + f", {seconds:.1f} s in all"
        )
        res.put(options=rows)
    ran = [r for r in rows.values() if r["status"] == "ok"]
    if ran:
        finite = all(math.isfinite(x) for r in ran for x in (r.get("losses") or {}).values())
        res.check("training losses finite (every option that ran)", float(finite), 1.0, "==")
    full = not ctx.dry_run and shape.name == "full"
    fp8, small = rows.get("fp8", {}).get("peak_gib"), rows.get("nf4+adamw8bit", {}).get("peak_gib")
    if fp8 is not None:  # the design's target (benchmarks.training.report.TARGETS)
        res.target(f"training {label}, fp8 base: peak allocated", fp8 * 2**30 / 1e9, TARGET_CARD_GB, "GB", full)
    if small is not None:  # the README's claim, by the planner's rule for a card: peak + slack + CUDA context
        from training.plan import CONTEXT, SLACK

        need = (small * 2**30 * (1 + SLACK) + CONTEXT) / 1e9
        what = f"training {label}, nf4 base + AdamW 8-bit: peak × {1 + SLACK:g} + {CONTEXT / 2**30:g} GiB context"
        res.target(what, need, TARGET_CARD_GB, "GB", full)


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
