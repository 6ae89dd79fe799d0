"""Inference cost of InstructMoLE on a random-weight diffusers Flux Kontext transformer.

Why: the design promises that routed inference costs about what the base model costs (only the k
chosen experts run, concatenated into one rank ``k·r`` product per row) while the reference
implementation computes all N experts plus an unmerged rank-256 LoRA. This script measures both
on the same transformer, in the same process, interleaved, so the ratios are trustworthy:

* ``base``             the transformer alone;
* ``dynamic``          ``instructmole.attach(transformer, adapter)``: every row routed from its own
                       conditioning by the Perceiver each forward, k experts computed;
* ``fixed``            ``attach(..., council=council.row(0))``: one council, same dynamic path;
* ``merged``           ``attach(..., mode="merged", council=...)``: the council folded into W0; the
                       forward should cost exactly ``base`` (the fold is timed separately);
* ``dense experts``    the reference's MoLE: all N experts materialised and mixed (``dense_delta``)
                       through plain forward hooks, routing included;
* ``dynamic + LoRA``   ``dynamic`` with the adapter's plain LoRA part applied unmerged by ``attach``;
* ``reference``        the reference's inference: dense experts plus the unmerged plain LoRA.

The first five (no plain LoRA) isolate the MoLE cost; the last two show what the LoRA part adds.
Also timed: the one-time fold (the merged ``attach`` call, and ``fold_council`` alone) and
``load_adapter`` on a saved adapter file. Weights are random: speed does not depend on them, and no
checkpoint can be downloaded here.

Configs: ``full`` (CUDA default) is FLUX.1 Kontext's transformer at 1024² target + 1024² reference,
bf16; ``scaled`` (CPU default) is the design's CPU stand-in; ``quick`` is a seconds-long smoke test.

    PYTHONPATH=. .venv/bin/python -m benchmarks.inference --device cpu
    PYTHONPATH=. python -m benchmarks.inference --device cuda
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import instructmole as im
from instructmole.experts import dense_delta
from instructmole.fold import fold_council
from instructmole.layers import REFERENCE_LORA_TARGETS

from .common import (
    Detachable,
    Variant,
    environment,
    keep_freed_memory,
    log,
    markdown_table,
    median,
    random_flux,
    run_interleaved,
    sync,
    timed,
    write_json,
)

__all__ = ["CONFIGS", "BenchConfig", "DenseReference", "main"]

REFERENCE_LORA_RANK = 256  # at hidden 3072; scaled configs keep rank / hidden constant
FULL_HIDDEN = 3072


@dataclass(frozen=True)
class BenchConfig:
    """Transformer shape, token counts and MoLE/LoRA sizes of one benchmark setting."""

    name: str
    num_double: int
    num_single: int
    heads: int
    head_dim: int
    axes_dims_rope: tuple[int, int, int]
    text_dim: int  # joint_attention_dim (T5 width); also the router's text_dim
    pooled_dim: int  # CLIP pooled width; also the router's width
    in_channels: int
    image_side: int  # packed latent tokens per side, for the target and again for the reference
    text_tokens: int
    num_experts: int = 8
    top_k: int = 4
    rank: int = 32
    alpha: float = 32.0
    router_heads: int = 12
    router_head_dim: int = 64
    lora_rank: int = REFERENCE_LORA_RANK

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    @property
    def image_tokens(self) -> int:
        return 2 * self.image_side**2


def _scaled_lora_rank(hidden: int) -> int:
    return max(4, round(REFERENCE_LORA_RANK * hidden / FULL_HIDDEN))


CONFIGS: dict[str, BenchConfig] = {
    # FLUX.1 Kontext [dev]: 1024² target + 1024² reference -> 2 x 64² packed tokens, T5 at 512.
    "full": BenchConfig(
        "full",
        num_double=19,
        num_single=38,
        heads=24,
        head_dim=128,
        axes_dims_rope=(16, 56, 56),
        text_dim=4096,
        pooled_dim=768,
        in_channels=64,
        image_side=64,
        text_tokens=512,
    ),
    # The design's CPU stand-in: 4 + 8 blocks, hidden 1024 (8 x 128), 2 x 576 image + 256 text tokens.
    # T5 width stays 4096: the context embedder and the router's proj_in on 256 tokens cost
    # ~2 GFLOP each against ~500 GFLOP for the forward, so the real width is affordable and keeps
    # the router's share honest. LoRA rank keeps rank/hidden of the reference (256/3072).
    "scaled": BenchConfig(
        "scaled",
        num_double=4,
        num_single=8,
        heads=8,
        head_dim=128,
        axes_dims_rope=(16, 56, 56),
        text_dim=4096,
        pooled_dim=768,
        in_channels=64,
        image_side=24,
        text_tokens=256,
        lora_rank=_scaled_lora_rank(1024),
    ),
    # Smoke test: every code path in a few seconds.
    "quick": BenchConfig(
        "quick",
        num_double=1,
        num_single=1,
        heads=2,
        head_dim=32,
        axes_dims_rope=(8, 12, 12),
        text_dim=64,
        pooled_dim=32,
        in_channels=64,
        image_side=4,
        text_tokens=8,
        num_experts=4,
        top_k=2,
        rank=4,
        alpha=4.0,
        router_heads=2,
        router_head_dim=16,
        lora_rank=8,
    ),
}


# ---- model, inputs, adapter ---------------------------------------------------------------------


def build_transformer(cfg: BenchConfig, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """A random Kontext-shaped transformer, built directly on ``device`` in ``dtype``, frozen."""
    return random_flux(cfg, device, dtype, seed).eval().requires_grad_(False)


def kontext_inputs(cfg: BenchConfig, batch: int, device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    """Target + reference image tokens (reference ids carry index 1 on the first axis), T5, pooled."""
    g = torch.Generator().manual_seed(seed)
    side = cfg.image_side
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    target = torch.stack([torch.zeros(side * side), rows.flatten().float(), cols.flatten().float()], -1)
    reference = target.clone()
    reference[:, 0] = 1

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype)

    return {
        "hidden_states": rand(batch, cfg.image_tokens, cfg.in_channels),
        "encoder_hidden_states": rand(batch, cfg.text_tokens, cfg.text_dim),
        "pooled_projections": rand(batch, cfg.pooled_dim),
        "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),
        "img_ids": torch.cat([target, reference]).to(device),
        "txt_ids": torch.zeros(cfg.text_tokens, 3, device=device),
        "guidance": torch.full((batch,), 3.5, device=device, dtype=dtype),
        "return_dict": False,
    }


def mole_config(cfg: BenchConfig) -> im.MoLEConfig:
    return im.MoLEConfig.for_flux(
        num_double=cfg.num_double,
        num_single=cfg.num_single,
        hidden_size=cfg.hidden,
        num_experts=cfg.num_experts,
        top_k=cfg.top_k,
        rank=cfg.rank,
        alpha=cfg.alpha,
        text_dim=cfg.text_dim,
        router_dim=cfg.pooled_dim,
        router_heads=cfg.router_heads,
        router_head_dim=cfg.router_head_dim,
        text_length=cfg.text_tokens,  # the signal's length at this size: what the adapter is "trained" on
    )


def build_mole(cfg: BenchConfig, device: torch.device, seed: int) -> im.InstructMoLE:
    """A random adapter model with non-trivial councils: B ~ N(0, 0.01), gates ~ N(0, 1)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = im.InstructMoLE(mole_config(cfg))
    with torch.no_grad():
        for _, layer in model.named_layers():
            layer.B.normal_(0.0, 0.01)
            layer.gate.weight.normal_(0.0, 1.0)
    return model.eval().requires_grad_(False)


def lora_modules(transformer: nn.Module) -> list[str]:
    """Linears the reference's plain LoRA targets (exact name or ``.<target>`` suffix, as peft)."""
    return [
        name
        for name, module in transformer.named_modules()
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in REFERENCE_LORA_TARGETS)
    ]


def build_lora(transformer: nn.Module, rank: int, dtype: torch.dtype, seed: int) -> dict[str, Tensor]:
    """A random plain LoRA in the adapter file's key layout (alpha = rank, as the reference's 256/256)."""
    g = torch.Generator().manual_seed(seed)
    device = next(transformer.parameters()).device
    out: dict[str, Tensor] = {}
    for name in lora_modules(transformer):
        linear = transformer.get_submodule(name)
        down = torch.randn(rank, linear.in_features, generator=g) / math.sqrt(linear.in_features)
        up = torch.randn(linear.out_features, rank, generator=g) * 0.01
        out[f"transformer.{name}.lora_A.weight"] = down.to(device, dtype)
        out[f"transformer.{name}.lora_B.weight"] = up.to(device, dtype)
        out[f"transformer.{name}.alpha"] = torch.tensor(float(rank), device=device)
    return out


# ---- the reference way --------------------------------------------------------------------------


class DenseReference:
    """The reference implementation's inference cost, rebuilt with forward hooks.

    Routing runs every forward (as in ``attach``), then every instruction-routed layer computes
    all N experts and mixes them with the council's dense weights (``dense_delta``); optionally
    the adapter's plain LoRA is added unmerged to its Linears (``x Aᵀ Bᵀ · alpha/r``, as peft).
    """

    def __init__(self, transformer: nn.Module, adapter: im.Adapter, *, experts: bool = True, lora: bool = True) -> None:
        cfg = adapter.config
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._weights: Tensor | None = None
        ref = transformer.get_submodule(cfg.layer_names[0]).weight
        device, dtype = ref.device, ref.dtype
        try:
            if experts:
                self._hooks.append(
                    transformer.register_forward_pre_hook(self._router(adapter, device), with_kwargs=True)
                )
                for row, name in enumerate(cfg.instruction_layers):
                    layer = adapter.model.layer(name)
                    A, B = layer.A.detach().to(device, dtype), layer.B.detach().to(device, dtype)
                    self._hook(transformer, name, self._expert_term(row, A, B, cfg.scale))
            if lora:
                for part in adapter.lora_parts():
                    down, up = part.down.to(device, dtype), part.up.to(device, dtype)
                    self._hook(transformer, part.module, _lora_term(down, up, part.scale))
        except BaseException:
            self.detach()
            raise

    def _router(self, adapter: im.Adapter, device: torch.device) -> Callable[..., None]:
        def pre_hook(_module: nn.Module, _args: tuple, kwargs: dict) -> None:
            council = adapter.route(kwargs["encoder_hidden_states"], kwargs["pooled_projections"])
            self._weights = council.weights.to(device)  # [b, L, n], zero outside the council

        return pre_hook

    def _expert_term(self, row: int, A: Tensor, B: Tensor, scale: float) -> Callable[[Tensor], Tensor]:
        def term(x: Tensor) -> Tensor:
            assert self._weights is not None, "expert layer called outside a transformer forward"
            return dense_delta(x, A, B, self._weights[:, row], scale)

        return term

    def _hook(self, transformer: nn.Module, name: str, term: Callable[[Tensor], Tensor]) -> None:
        def hook(_module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
            return output + term(inputs[0]).to(output.dtype)

        self._hooks.append(transformer.get_submodule(name).register_forward_hook(hook))

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._weights = None


def _lora_term(down: Tensor, up: Tensor, scale: float) -> Callable[[Tensor], Tensor]:
    return lambda x: (x @ down.t()) @ up.t() * scale


# ---- measurements -------------------------------------------------------------------------------


def _variants(transformer: nn.Module, adapter: im.Adapter, with_lora: im.Adapter, council: im.Council) -> list[Variant]:
    fixed = council.row(0)

    def none() -> Detachable | None:
        return None

    return [
        Variant("base", none),
        Variant("dynamic", lambda: im.attach(transformer, adapter)),
        Variant("fixed", lambda: im.attach(transformer, adapter, council=fixed)),
        Variant("merged", lambda: im.attach(transformer, adapter, mode="merged", council=fixed)),
        Variant("dense experts", lambda: DenseReference(transformer, adapter, lora=False)),
        Variant("dynamic + LoRA", lambda: im.attach(transformer, with_lora), group="lora"),
        Variant("reference", lambda: DenseReference(transformer, with_lora), group="lora"),
    ]


# What each variant's output should equal (the slow, plain formula), for the agreement check.
_REFERENCE_OF = {
    "dynamic": "dense experts",
    "fixed": "dense experts",
    "merged": "dense experts",
    "dynamic + LoRA": "reference",
}


def _agreement(variants: Sequence[Variant]) -> dict[str, float]:
    """``‖out − ref‖ / ‖ref − base‖``: the error relative to the adapter's own effect."""
    outs = {v.name: v.first_output for v in variants}
    base = outs["base"]
    result = {}
    for name, ref_name in _REFERENCE_OF.items():
        out, ref = outs.get(name), outs.get(ref_name)
        if out is None or ref is None or base is None:
            continue
        effect = (ref - base).norm().item()
        result[f"{name} vs {ref_name}"] = (out - ref).norm().item() / effect if effect else float("nan")
    return result


def _repeat_ms(
    fn: Callable[[], Any], device: torch.device, times: int, after: Callable[[Any], None] | None = None
) -> list[float]:
    """Milliseconds of ``times`` synchronised calls (``after`` cleans up each result, untimed)."""
    samples = []
    for _ in range(times):
        seconds, result = timed(fn, device)
        samples.append(seconds * 1e3)
        if after is not None:
            after(result)
        del result
    return samples


def _peak_extra_gib(fn: Callable[[], Any], device: torch.device) -> float | None:
    """GiB the call allocated beyond what was live before it (CUDA only; None elsewhere)."""
    if device.type != "cuda":
        return None
    sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**30


def measure_fold(
    transformer: nn.Module,
    adapter: im.Adapter,
    with_lora: im.Adapter,
    council: im.Council,
    device: torch.device,
    reps: int,
) -> dict[str, Any]:
    """One-time costs of merged mode: ``fold_council`` alone and the merged ``attach`` with the LoRA.

    Also the transient device memory of a merged attach (every layer's fp32 delta is live at once),
    which decides whether merged mode fits next to the model on a given card. The LoRA merge can
    run out of memory on an 80 GB card at full size; that is recorded, not fatal.
    """
    fixed = council.row(0)
    result: dict[str, Any] = {"layers": len(adapter.config.instruction_layers)}
    with torch.no_grad():
        result["fold_council_all_layers_ms"] = _repeat_ms(lambda: fold_council(adapter.model, fixed), device, reps)
        result["attach_merged_peak_extra_gib"] = _peak_extra_gib(
            lambda: im.attach(transformer, adapter, mode="merged", council=fixed).detach(), device
        )
        try:
            result["attach_merged_with_lora_ms"] = _repeat_ms(
                lambda: im.attach(transformer, with_lora, mode="merged", council=fixed),
                device,
                reps,
                after=lambda handle: handle.detach(),
            )
        except torch.cuda.OutOfMemoryError as err:  # attach restores the weights before raising
            result["attach_merged_with_lora_error"] = f"out of memory: {str(err).splitlines()[0]}"
            log(f"  merged attach with the LoRA ran out of memory: {result['attach_merged_with_lora_error']}")
            torch.cuda.empty_cache()
    return result


def measure_load(
    adapter: im.Adapter, lora: dict[str, Tensor], dtype: torch.dtype, device: torch.device, reps: int
) -> dict[str, Any]:
    """Save the adapter (experts + router, then also with the plain LoRA) and time ``load_adapter``.

    The file was just written, so these are warm page-cache numbers: parsing, validation and copy,
    not the disk.
    """
    model = copy.deepcopy(adapter.model).to("cpu", dtype)
    cpu_lora = {k: (v if k.endswith(".alpha") else v.to(dtype)).cpu() for k, v in lora.items()}
    results: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch.")}
    with tempfile.TemporaryDirectory(prefix="instructmole-bench-") as tmp:
        for label, part in (("mole", {}), ("mole_lora", cpu_lora)):
            path = im.Adapter(model, dict(part)).save(Path(tmp) / f"{label}.safetensors")
            entry: dict[str, Any] = {"file_mb": path.stat().st_size / 2**20}
            log(f"  load {label}: {entry['file_mb']:.1f} MiB")
            entry["cpu_ms"] = _repeat_ms(lambda p=path: im.load_adapter(p), torch.device("cpu"), reps)
            if device.type != "cpu":
                entry["device_ms"] = _repeat_ms(lambda p=path: im.load_adapter(p, device=device), device, reps)
            results[label] = entry
            path.unlink()
    return results


# ---- command line -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", choices=sorted(CONFIGS), help="default: full on CUDA, scaled on CPU")
    p.add_argument("--quick", action="store_true", help="tiny config, 2 rounds: a smoke test in seconds")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default: 10 CUDA, 9 CPU, 2 quick)")
    p.add_argument("--warmup", type=int, help="untimed forwards per variant first (default: 3 CUDA, 1 CPU)")
    p.add_argument("--per-round", type=int, default=1, help="timed forwards per variant per round")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (CPU runs)")
    p.add_argument("--lora-rank", type=int, help="plain LoRA rank (default: 256 full, scaled by hidden)")
    p.add_argument("--skip-load", action="store_true", help="do not time load_adapter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--system-malloc",
        action="store_true",
        help="keep glibc's default allocator on CPU (default: keep freed memory, see common.keep_freed_memory)",
    )
    p.add_argument("--out", help="JSON path (default: benchmarks/results/inference-<device>[-quick].json)")
    return p.parse_args(argv)


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _paired_ratio(samples: Sequence[float], base: Sequence[float], per_round: int) -> float:
    """Median over rounds of (variant / base in the same round): cancels drift that spans a round."""

    def at(values: Sequence[float], r: int) -> float:
        return median(values[r * per_round : (r + 1) * per_round])

    ratios = [at(samples, r) / at(base, r) for r in range(len(base) // per_round)]
    return median(ratios)


def _ms(samples_ms: Sequence[float]) -> str:
    return f"{median(samples_ms):.1f}"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print markdown tables to stdout, write JSON, return the results."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    name = "quick" if args.quick else (args.config or ("full" if device.type == "cuda" else "scaled"))
    cfg = CONFIGS[name]
    if args.lora_rank:
        cfg = replace(cfg, lora_rank=args.lora_rank)
    dtype = _DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    rounds = args.rounds or (2 if args.quick else 10 if device.type == "cuda" else 9)
    warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 1)
    reps = 2 if args.quick else 5 if device.type == "cuda" else 3
    malloc = "system"
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        if not (args.quick or args.system_malloc) and keep_freed_memory():
            malloc = "keep-freed"
    out_path = args.out or f"benchmarks/results/inference-{device.type}{'-quick' if args.quick else ''}.json"

    log(
        f"config {name}: {cfg.num_double}+{cfg.num_single} blocks, hidden {cfg.hidden}, "
        f"{cfg.image_tokens} image + {cfg.text_tokens} text tokens, {str(dtype)[6:]} on {device}, "
        f"MoLE N={cfg.num_experts} k={cfg.top_k} r={cfg.rank}, LoRA r={cfg.lora_rank}"
    )
    seconds, transformer = timed(lambda: build_transformer(cfg, device, dtype, args.seed), device)
    log(f"  transformer built in {seconds:.1f} s")
    inputs = kontext_inputs(cfg, args.batch, device, dtype, args.seed + 1)
    adapter = im.Adapter(build_mole(cfg, device, args.seed + 2))
    lora = build_lora(transformer, cfg.lora_rank, dtype, args.seed + 3)
    with_lora = im.Adapter(adapter.model, lora)
    council = adapter.route(inputs["encoder_hidden_states"], inputs["pooled_projections"])

    def forward() -> Tensor:
        with torch.inference_mode():
            return transformer(**inputs)[0]

    variants = _variants(transformer, adapter, with_lora, council)
    load_before = os.getloadavg()
    log(f"timing {len(variants)} variants: {warmup} warmup, {rounds} interleaved rounds")
    run_interleaved(variants, forward, device, rounds=rounds, warmup=warmup, per_round=args.per_round)

    log("timing the fold")
    fold = measure_fold(transformer, adapter, with_lora, council, device, reps)
    fold["attach_merged_ms"] = [s * 1e3 for v in variants if v.name == "merged" for s in v.setup_samples]
    load = None
    if not args.skip_load:
        log("timing load_adapter")
        load = measure_load(adapter, lora, dtype, device, reps)

    load_after = os.getloadavg()
    base, base_min = median(variants[0].samples), min(variants[0].samples)
    results: dict[str, Any] = {
        "benchmark": "inference",
        "config": {
            **asdict(cfg),
            "hidden": cfg.hidden,
            "image_tokens": cfg.image_tokens,
            "batch": args.batch,
            "dtype": str(dtype).removeprefix("torch."),
            "rounds": rounds,
            "warmup": warmup,
            "per_round": args.per_round,
            "lora_modules": len(lora_modules(transformer)),
            "malloc": malloc,
        },
        "environment": {
            **environment(device),
            "load_average_before": load_before,
            "load_average_after": load_after,
        },
        "variants": {
            v.name: {
                "group": v.group,
                "median_ms": median(v.samples) * 1e3,
                "ratio": median(v.samples) / base,
                "paired_ratio": _paired_ratio(v.samples, variants[0].samples, args.per_round),
                "min_ms": min(v.samples) * 1e3,
                "min_ratio": min(v.samples) / base_min,
                "samples_ms": [s * 1e3 for s in v.samples],
                "peak_gib": v.peak_bytes / 2**30 if v.peak_bytes is not None else None,
            }
            for v in variants
        },
        "agreement": _agreement(variants),
        "fold": fold,
        "load": load,
    }
    write_json(out_path, results)
    print(report(results))
    log(f"wrote {out_path}")
    return results


def report(results: dict[str, Any]) -> str:
    """The markdown summary printed to stdout (and pasted into the benchmarks README)."""
    cfg, env = results["config"], results["environment"]
    where = env.get("gpu") or f"{env['cpu']}, {env['torch_threads']} threads"
    head = (
        f"InstructMoLE inference, config {cfg['name']} ({cfg['num_double']}+{cfg['num_single']} blocks, "
        f"hidden {cfg['hidden']}, {cfg['image_tokens']}+{cfg['text_tokens']} tokens, "
        f"batch {cfg['batch']}, "
        f"{cfg['dtype']}; N={cfg['num_experts']} k={cfg['top_k']} r={cfg['rank']}, plain LoRA "
        f"r={cfg['lora_rank']} on {cfg['lora_modules']} Linears) on {where}; medians of {cfg['rounds']} "
        "interleaved rounds"
    )
    rows = [
        (
            name,
            f"{v['median_ms']:.1f}",
            f"{v['ratio']:.3f}",
            f"{v['paired_ratio']:.3f}",
            f"{v['min_ms']:.1f}",
            f"{v['min_ratio']:.3f}",
        )
        for name, v in results["variants"].items()
    ]
    header = ("variant", "median ms", "vs base", "vs base, paired per round", "min ms", "vs base, min")
    parts = [head, "", markdown_table(header, rows)]
    busy = max(env["load_average_before"][0], env["load_average_after"][0])
    if env["device"] == "cpu" and busy > env["torch_threads"] + 0.5:
        parts += [
            "",
            f"Note: the machine was shared (1-minute load average up to {busy:.1f}, "
            f"{env['torch_threads']} benchmark threads on {env['cpu_count']} cores): other processes "
            "inflate some samples, so the min column is the cleanest comparison here.",
        ]
    fold = results["fold"]
    once = [
        (f"attach merged (fold {fold['layers']} layers + write weights)", _ms(fold["attach_merged_ms"])),
        ("fold_council alone", _ms(fold["fold_council_all_layers_ms"])),
        (
            "attach merged incl. plain LoRA",
            _ms(fold["attach_merged_with_lora_ms"]) if "attach_merged_with_lora_ms" in fold else "OOM",
        ),
    ]
    if fold.get("attach_merged_peak_extra_gib") is not None:
        once.append(("attach merged: transient device memory (GiB)", f"{fold['attach_merged_peak_extra_gib']:.2f}"))
    load = results.get("load")
    if load:
        for label, what in (("mole", "experts + router"), ("mole_lora", "experts + router + LoRA")):
            entry = load[label]
            once.append(
                (
                    f"load_adapter to cpu, {what} ({entry['file_mb']:.1f} MiB {load['dtype']})",
                    _ms(entry["cpu_ms"]),
                )
            )
            if "device_ms" in entry:
                once.append((f"load_adapter to {env['device']}, {what}", _ms(entry["device_ms"])))
    parts += ["", markdown_table(("one-time cost", "median ms"), once)]
    if results["agreement"]:
        agree = [(k, f"{v:.2e}") for k, v in results["agreement"].items()]
        parts += ["", markdown_table(("agreement (‖out − ref‖ / ‖ref − base‖)", "value"), agree)]
    return "\n".join(parts)


if __name__ == "__main__":
    main()
