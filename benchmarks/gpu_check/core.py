"""The GPU check's stages that need no ComfyUI: environment, adapter loading, the core's modes and speed.

Everything here is the existing benchmark code (``benchmarks.inference``, ``benchmarks.common``) run
at the check's shapes: the full FLUX.1 Kontext transformer in bf16 on CUDA, the ``quick`` config in
fp32 on the CPU for the dry run. Only what the check adds lives here: the choice of variants,
bounds, and keeping each stage inside its time limit.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import time
from dataclasses import replace
from typing import Any

import torch

from .stage import StageContext, StageResult, require

__all__ = ["AGREEMENT_TOLERANCE", "TARGETS", "core_stage", "environment_stage", "load_stage"]

# ‖out − reference‖ / ‖reference − base‖ allowed between paths that compute the same formula. fp32:
# the CPU runs agree to ~5e-5 (README, Benchmarks). bf16: every path rounds each layer's output to
# 8 bits of mantissa at different points, which the network then carries; a wrong path (another
# council, a dropped term) is off by ~1.
AGREEMENT_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.1}
# The design's targets on an H100 at full size (README, Benchmarks): dynamic and merged forward over
# the base forward, folding one council into the 57 layers, loading a full-size adapter.
TARGETS = {"dynamic": 1.03, "merged": 1.005, "fold_ms": 300.0, "load_ms": 2000.0}
FULL_SIZE_BYTES = 2 * 11.9e9  # the full transformer's weights in bf16
OPTIONAL_PACKAGES = (
    "diffusers",
    "transformers",
    "accelerate",
    "peft",
    "safetensors",
    "einops",
    "torchsde",
    "comfy_aimdo",
    "comfy_kitchen",
    "av",
    "bitsandbytes",  # the training stage's nf4 base and 8-bit AdamW (carried trimmed, see gpu_check.sh --prepare)
)


def _version(module: str) -> str | None:
    """A package's version without importing it (importing diffusers alone takes seconds)."""
    if importlib.util.find_spec(module) is None:
        return None
    from importlib import metadata

    for dist in (module, module.replace("_", "-")):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "installed"


def environment_stage(ctx: StageContext, res: StageResult) -> None:
    """What the numbers were measured on; never fails for a missing optional package."""
    device = torch.device(ctx.device)
    env = _environment(device)
    env["packages"] = {name: _version(name) for name in OPTIONAL_PACKAGES}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        env["gpu_memory_gib"] = total / 2**30
        env["gpu_free_gib"] = free / 2**30
        env["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    res.put(**env)
    ctx.log(f"torch {torch.__version__} on {env.get('gpu') or env['cpu']}; packages {env['packages']}")


def _environment(device: torch.device) -> dict[str, Any]:
    """``common.environment`` without importing diffusers (seconds, and it may be missing)."""
    from ..common import _cpu_name

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device)}
    env["cpu"], env["cpu_count"] = _cpu_name(), os.cpu_count()
    env["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def _config(ctx: StageContext) -> Any:
    """The core benchmark's ``full`` config on CUDA (halved in depth if the card cannot hold it),
    ``quick`` for the dry run."""
    from ..inference import CONFIGS

    if ctx.dry_run:
        return CONFIGS["quick"]
    cfg = CONFIGS["full"]
    free, _ = torch.cuda.mem_get_info()
    if free < 1.8 * FULL_SIZE_BYTES:
        cfg = replace(
            cfg, name="full-width, half depth", num_double=cfg.num_double // 2, num_single=cfg.num_single // 2
        )
        ctx.log(f"only {free / 2**30:.0f} GiB free: building {cfg.num_double}+{cfg.num_single} blocks")
    return cfg


def _dtype(ctx: StageContext) -> torch.dtype:
    return torch.float32 if ctx.device == "cpu" else torch.bfloat16


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def load_stage(ctx: StageContext, res: StageResult) -> None:
    """Save an adapter of the config's size in bf16 and time ``load_adapter`` to the CPU and the device."""
    from instructmole import Adapter

    from ..inference import build_mole, measure_load

    device = torch.device(ctx.device)
    cfg = _config(ctx)
    adapter = Adapter(build_mole(cfg, device, seed=2))
    params = adapter.model.num_parameters()
    res.put(config=cfg.name, layers=len(adapter.config.instruction_layers), expert_parameters=params["experts"])
    ctx.log(f"adapter: {res.data['layers']} layers, {params['experts'] / 1e6:.1f} M expert parameters")
    load = measure_load(adapter, {}, torch.bfloat16, device, reps=2)  # the best of two: warm page cache
    entry = load["mole"]
    ms = min(entry.get("device_ms", entry["cpu_ms"]))  # warm page cache: the best run is the library's cost
    res.put(file_mib=entry["file_mb"], load_cpu_ms=entry["cpu_ms"], load_device_ms=entry.get("device_ms"))
    res.target(
        f"load_adapter to {device.type}, {entry['file_mb']:.0f} MiB",
        ms,
        TARGETS["load_ms"],
        "ms",
        applies=not ctx.dry_run and cfg.name == "full",
    )
    res.put(peak_gib=_peak_gib(device))


def core_stage(ctx: StageContext, res: StageResult) -> None:
    """The core's modes against its reference formula, and what each costs, on one transformer."""
    require("diffusers", "the core stage builds diffusers' FluxTransformer2DModel")
    import instructmole as im
    from instructmole.fold import fold_council

    from ..common import Variant, median, run_interleaved, timed
    from ..inference import (
        DenseReference,
        _agreement,
        _paired_ratio,
        _peak_extra_gib,
        _repeat_ms,
        build_mole,
        build_transformer,
        kontext_inputs,
    )

    device, dtype = torch.device(ctx.device), _dtype(ctx)
    cfg = _config(ctx)
    res.put(
        config=cfg.name,
        blocks=f"{cfg.num_double}+{cfg.num_single}",
        hidden=cfg.hidden,
        tokens=f"{cfg.image_tokens} image + {cfg.text_tokens} text",
        dtype=str(dtype).removeprefix("torch."),
        mole=f"N={cfg.num_experts} k={cfg.top_k} r={cfg.rank}",
    )
    seconds, transformer = timed(lambda: build_transformer(cfg, device, dtype, seed=0), device)
    ctx.log(f"transformer {cfg.num_double}+{cfg.num_single} blocks, hidden {cfg.hidden}, built in {seconds:.1f} s")
    inputs = kontext_inputs(cfg, 1, device, dtype, seed=1)
    adapter = im.Adapter(build_mole(cfg, device, seed=2))
    council = adapter.route(inputs["encoder_hidden_states"], inputs["pooled_projections"])
    fixed = council.row(0)
    res.put(layers=len(adapter.config.instruction_layers))

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return transformer(**inputs)[0]

    forward()
    one, _ = timed(forward, device)
    variants = [
        Variant("base", lambda: None),
        Variant("dynamic", lambda: im.attach(transformer, adapter)),
        Variant("fixed", lambda: im.attach(transformer, adapter, council=fixed)),
        Variant("merged", lambda: im.attach(transformer, adapter, mode="merged", council=fixed)),
        Variant("dense experts", lambda: DenseReference(transformer, adapter, lora=False)),
    ]
    warmup = 1 if ctx.dry_run else 2
    # A round is one forward per variant plus the merged fold; keep the rounds inside half of what is
    # left, so the fold timing and the report still fit in the stage's limit.
    round_s = len(variants) * one * 1.4 + 0.5
    budget = ctx.left() * 0.5 - (warmup + 1) * round_s
    rounds = max(2, min(2 if ctx.dry_run else 10, int(budget / round_s)))
    ctx.log(f"base forward {one * 1e3:.0f} ms; {len(variants)} variants, {warmup} warmup, {rounds} interleaved rounds")
    run_interleaved(variants, forward, device, rounds=rounds, warmup=warmup)

    base = variants[0]
    speed = {
        v.name: {
            "median_ms": median(v.samples) * 1e3,
            "ratio": median(v.samples) / median(base.samples),
            "paired_ratio": _paired_ratio(v.samples, base.samples, 1),
            "peak_gib": v.peak_bytes / 2**30 if v.peak_bytes is not None else None,
        }
        for v in variants
    }
    res.put(rounds=rounds, speed=speed)
    tolerance = AGREEMENT_TOLERANCE[dtype]
    outputs = {v.name: v.first_output for v in variants}
    effect = ((outputs["dense experts"] - outputs["base"]).norm() / outputs["base"].norm()).item()
    res.put(adapter_effect=effect)
    finite = all(bool(torch.isfinite(o).all()) for o in outputs.values())
    res.check("every output finite", float(finite), 1.0, "==")
    res.check("adapter changes the output (‖reference − base‖ / ‖base‖)", effect, 1e-4, ">=")
    for name, value in _agreement(variants).items():
        res.check(f"{name} (‖out − ref‖ / ‖ref − base‖)", value, tolerance)
    full = not ctx.dry_run and cfg.name == "full"
    for name in ("dynamic", "merged"):
        res.target(f"{name} forward / base forward", speed[name]["paired_ratio"], TARGETS[name], "×", applies=full)

    ctx.log("timing the fold")
    with torch.no_grad():
        fold_ms = _repeat_ms(lambda: fold_council(adapter.model, fixed), device, 3)
        transient = _peak_extra_gib(
            lambda: im.attach(transformer, adapter, mode="merged", council=fixed).detach(), device
        )
    merged = next(v for v in variants if v.name == "merged")
    res.put(
        fold_council_ms=fold_ms,
        attach_merged_ms=[s * 1e3 for s in merged.setup_samples],
        attach_merged_transient_gib=transient,
        peak_gib=_peak_gib(device),
    )
    res.target(f"fold a council into {res.data['layers']} layers", min(fold_ms), TARGETS["fold_ms"], "ms", applies=full)
