"""Inference cost of InstructMoLE inside ComfyUI: the pack's patched MODEL on a random-weight Flux.

Why a second benchmark: ``benchmarks/inference.py`` measures the core on a diffusers transformer,
but ComfyUI users run something else: the pack's object-patched Linear forwards, its
DIFFUSION_MODEL wrapper and ComfyUI weight patches, on ComfyUI's own Flux, loaded by
``ModelPatcher``. This script times that path with the same shapes, seeds and random adapter as
the core benchmark, in one process, interleaved:

* ``base``         the unpatched ``ModelPatcher``;
* ``auto-exact``   ``apply_adapter`` (InstructMoLE Load Adapter), routed every forward from the exact
                   signal that InstructMoLE Text Encode attaches (the ``instructmole_t5`` /
                   ``instructmole_pooled`` int32 bit-cast conds, built by the pack's ``attach_signal``
                   and handed over the way sampling does);
* ``auto-approx``  the same MODEL with no carried signal: routed from ComfyUI's own T5 context;
* ``fixed``        ``apply_council(..., "fixed")`` (Apply Council): one council, dynamic expert terms;
* ``merged``       ``apply_council(..., "merged")``: the council as ComfyUI weight patches, which
                   ComfyUI folds into the weights when it loads the model.

Only ``apply_model`` (the denoised prediction, with the patcher's wrappers merged into
``transformer_options`` as sampling does) is timed. Every variant is loaded with
``load_models_gpu`` before its forwards in every round, outside the timed region: ComfyUI keeps one
clone of a model patched at a time, so each switch really unpatches the previous clone and patches
the next one (for ``merged`` that is the fold, timed per load and reported separately). After each
variant's forwards its output is compared with its first one, so a switch that failed to re-patch
would show up as a changed output, not as a fast time.

Configs are the core's: ``full`` (CUDA default, bf16) is FLUX.1 Kontext at 1024² target + 1024²
reference, exact signal at 512 T5 tokens and ComfyUI's 256-token context; ``scaled`` (CPU default)
and ``quick`` as in ``benchmarks/inference.py``. Weights are random (speed does not depend on them).

    COMFYUI_PATH=/path/to/ComfyUI PYTHONPATH=. python -m benchmarks.comfyui --device cpu
    COMFYUI_PATH=/path/to/ComfyUI PYTHONPATH=. python -m benchmarks.comfyui --device cuda

Run it in ComfyUI's Python environment (diffusers is not needed).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

import instructmole as im
from tests.comfyui.bootstrap import bootstrap_comfy, load_pack
from tests.comfyui.comfy_tiny import with_installed_flux_fields

from .common import (
    Variant,
    environment,
    keep_freed_memory,
    log,
    markdown_table,
    median,
    run_interleaved,
    timed,
    write_json,
)
from .inference import CONFIGS, BenchConfig, _paired_ratio, build_mole

__all__ = ["COMFY_CONTEXT_TOKENS", "build_comfy_flux", "comfy_unet_config", "main"]

COMFY_CONTEXT_TOKENS = 256  # ComfyUI pads T5 to 256 tokens; the exact signal uses the training length
LATENT_CHANNELS = 16
SIGMA = 0.5
GUIDANCE = 3.5
VARIANTS = ("base", "auto-exact", "auto-approx", "fixed", "merged")
# (variant, reference): the pairs that must compute the same thing, for the agreement figures.
AGREEMENT = (("auto-exact", "fixed"), ("merged", "fixed"))
USAGE_ERROR = 2


def _usage_error(message: str) -> SystemExit:
    """A user's mistake: one line on stderr and exit status 2 (argparse's convention)."""
    print(f"benchmarks.comfyui: {message}", file=sys.stderr, flush=True)
    return SystemExit(USAGE_ERROR)


# ---- the ComfyUI model ---------------------------------------------------------------------------


def comfy_unet_config(cfg: BenchConfig) -> dict[str, Any]:
    """ComfyUI's Flux ``unet_config`` for a core benchmark config (the same transformer, BFL layout).

    The core's diffusers model takes 2x2-packed latents (64 channels, patch 1); ComfyUI's Flux
    patchifies 16 latent channels itself (patch 2). mlp_ratio 4 and theta 10000 are FLUX.1's.
    """
    if cfg.in_channels != LATENT_CHANNELS * 4:
        raise ValueError(f"config {cfg.name}: expected {LATENT_CHANNELS * 4} packed input channels")
    return with_installed_flux_fields(
        {
            "image_model": "flux",
            "in_channels": LATENT_CHANNELS,
            "out_channels": LATENT_CHANNELS,
            "vec_in_dim": cfg.pooled_dim,
            "context_in_dim": cfg.text_dim,
            "hidden_size": cfg.hidden,
            "mlp_ratio": 4.0,
            "num_heads": cfg.heads,
            "depth": cfg.num_double,
            "depth_single_blocks": cfg.num_single,
            "axes_dim": list(cfg.axes_dims_rope),
            "theta": 10000,
            "patch_size": 2,
            "qkv_bias": True,
            "guidance_embed": True,
        }
    )


@torch.no_grad()
def _random_init_(model: nn.Module, seed: int) -> None:
    """Fill every parameter in place, where it lives: ComfyUI's layers leave them uninitialised.

    Matrices and the biases next to them get ``U(±1/√fan_in)`` (torch's default Linear init, which
    the core's diffusers model gets too, so activations have the same scale); other biases get 0
    and other 1-D parameters (norm scales) get 1.
    """
    torch.manual_seed(seed)
    for module in model.modules():
        weight = getattr(module, "weight", None)
        fan_in = math.prod(weight.shape[1:]) if isinstance(weight, Tensor) and weight.ndim >= 2 else None
        for name, param in module.named_parameters(recurse=False):
            if param.ndim >= 2:
                bound = 1 / math.sqrt(math.prod(param.shape[1:]))
                param.uniform_(-bound, bound)
            elif name == "bias":
                if fan_in is None:
                    param.zero_()
                else:
                    param.uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
            else:
                param.fill_(1.0)


def build_comfy_flux(cfg: BenchConfig, device: torch.device, dtype: torch.dtype, seed: int) -> Any:
    """A ``ModelPatcher`` around a random ``model_base.Flux``, built and initialised on ``device``.

    Built through ``comfy.supported_models.Flux(unet_config).get_model``, as ComfyUI's loaders do
    after detection, so the model has Flux's latent format, CONST model sampling and extra conds.
    ComfyUI's layers skip initialisation, so nothing is spent before the in-place random fill.
    """
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    model_config = comfy.supported_models.Flux(comfy_unet_config(cfg))
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, device=device)
    _random_init_(model.diffusion_model, seed)
    model.diffusion_model.eval()
    return comfy.model_patcher.ModelPatcher(
        model,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )


def _minor_faults() -> int | None:
    """Minor page faults of this process so far (None where ``resource`` is missing: Windows).

    Why: on CPU the allocator can hand a forward's activations freshly mapped pages every time, and
    the faults cost as much as real work (seen with merged weights); counting them tells such an
    artifact from compute.
    """
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# ---- inputs ---------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """One Kontext sampling step's inputs, as ``apply_model`` receives them after ``cond_cat``."""

    latents: Tensor  # [b, 16, H, W] fp32 on the device (sampling keeps x in fp32)
    sigma: Tensor  # [b]
    context: Tensor  # [b, ComfyUI tokens, text_dim]: ComfyUI's T5 context, in the model dtype
    pooled: Tensor  # [b, pooled_dim]
    guidance: Tensor  # [b]
    reference: Tensor  # [b, 16, H, W]: the Kontext reference latent, in model space
    t5_exact: Tensor  # [b, exact tokens, text_dim] fp32 on the CPU, as Text Encode makes it
    pooled_exact: Tensor  # [b, pooled_dim] fp32 on the CPU


def make_inputs(cfg: BenchConfig, batch: int, device: torch.device, dtype: torch.dtype, seed: int) -> Inputs:
    """Random inputs at the config's shapes: reference latent the size of the target.

    ComfyUI's context is the first 256 tokens of the exact signal (the same prompt, as far as
    random features go): at equal lengths both routes see the same numbers.
    """
    g = torch.Generator().manual_seed(seed)
    side = 2 * cfg.image_side  # latent pixels per side: packed tokens are 2x2 latent patches
    t5 = torch.randn(batch, cfg.text_tokens, cfg.text_dim, generator=g)
    pooled = torch.randn(batch, cfg.pooled_dim, generator=g)
    context_tokens = min(cfg.text_tokens, COMFY_CONTEXT_TOKENS)
    return Inputs(
        latents=torch.randn(batch, LATENT_CHANNELS, side, side, generator=g).to(device),
        sigma=torch.full((batch,), SIGMA, device=device),
        context=t5[:, :context_tokens].to(device, dtype),
        pooled=pooled.to(device, dtype),
        guidance=torch.full((batch,), GUIDANCE, device=device),
        reference=torch.randn(batch, LATENT_CHANNELS, side, side, generator=g).to(device, dtype),
        t5_exact=t5,
        pooled_exact=pooled,
    )


def carried_signal_kwargs(pack: ModuleType, inputs: Inputs) -> dict[str, Tensor]:
    """The exact signal as the model receives it: made by the pack's ``attach_signal`` on a
    conditioning, then ``process_cond`` and ``concat`` as ``samplers._calc_cond_batch`` does."""
    conditioning = [[inputs.context, {"pooled_output": inputs.pooled}]]
    attached = pack.nodes.signal.attach_signal(conditioning, inputs.t5_exact, inputs.pooled_exact)
    batch = inputs.latents.shape[0]
    model_conds = attached[0][1]["model_conds"]
    keys = (pack.nodes.signal.T5_KEY, pack.nodes.signal.POOLED_KEY)
    return {k: model_conds[k].process_cond(batch_size=batch, area=None).concat([]) for k in keys}


# ---- variants -------------------------------------------------------------------------------------


@dataclass
class ComfyVariant:
    """A patched MODEL, the extra conds its forward gets, and what the rounds observed about it."""

    name: str
    patcher: Any
    extra: dict[str, Tensor] = field(default_factory=dict)
    load_s: list[float] = field(default_factory=list)  # every load_models_gpu, the first (warmup) included
    drift: float = 0.0  # max |output − first output| over all forwards: 0 when every switch re-patched
    exact_flags: set[bool | None] = field(default_factory=set)  # runtime.last_exact seen after its forwards
    lowvram: set[bool] = field(default_factory=set)  # whether ComfyUI loaded the model partially
    faults: list[float] = field(default_factory=list)  # minor page faults per forward, per visit (warmup first)


def _transformer_options(patcher: Any, sigma: Tensor) -> dict[str, Any]:
    """``transformer_options`` as sampling builds them: the patcher's own, its wrappers and callbacks
    merged in by ComfyUI's ``merge_nested_dicts`` (as ``sampler_helpers.prepare_model_patcher``),
    plus the per-step entries."""
    from comfy.patcher_extension import merge_nested_dicts

    options = dict(patcher.model_options.get("transformer_options", {}))
    options["wrappers"] = merge_nested_dicts(options.get("wrappers", {}), patcher.wrappers)
    options["callbacks"] = merge_nested_dicts(options.get("callbacks", {}), patcher.callbacks)
    options["cond_or_uncond"] = [0] * sigma.shape[0]
    options["sigmas"] = sigma
    return options


class _Runner:
    """Installs one variant at a time (load outside the timer) and runs its ``apply_model``."""

    def __init__(self, inputs: Inputs, device: torch.device, attachment: str) -> None:
        self.inputs, self.device, self.attachment = inputs, device, attachment
        self.timing: dict[str, Variant] = {}  # the timing records, for each variant's first output
        self.variant: ComfyVariant | None = None
        self.options: dict[str, Any] = {}
        self.last: Tensor | None = None
        self.forwards = 0  # forwards since the current variant was loaded
        self.faults_at_load: int | None = None

    def setup(self, v: ComfyVariant) -> _Leave:
        import comfy.model_management

        seconds, _ = timed(lambda: comfy.model_management.load_models_gpu([v.patcher]), self.device)
        v.load_s.append(seconds)
        v.lowvram.add(bool(getattr(v.patcher.model, "model_lowvram", False)))
        self.variant, self.options, self.last = v, _transformer_options(v.patcher, self.inputs.sigma), None
        self.forwards, self.faults_at_load = 0, _minor_faults()
        return _Leave(self, v, self.timing[v.name])

    def forward(self) -> Tensor:
        assert self.variant is not None, "forward before a variant was loaded"
        x = self.inputs
        out = self.variant.patcher.model.apply_model(
            x.latents,
            x.sigma,
            c_crossattn=x.context,
            transformer_options=self.options,
            y=x.pooled,
            guidance=x.guidance,
            ref_latents=[x.reference],
            **self.variant.extra,
        )
        self.last, self.forwards = out, self.forwards + 1
        return out


@dataclass
class _Leave:
    """Returned by a variant's setup; ``run_interleaved`` calls ``detach`` after its forwards
    (untimed): checks that the output is still the variant's first one and records the routing."""

    runner: _Runner
    variant: ComfyVariant
    timing: Variant

    def detach(self) -> None:
        faults, start = _minor_faults(), self.runner.faults_at_load
        if faults is not None and start is not None and self.runner.forwards:
            self.variant.faults.append((faults - start) / self.runner.forwards)
        last, first = self.runner.last, self.timing.first_output
        if last is not None and first is not None:
            diff = (last.detach().float().cpu() - first).abs().max().item()
            self.variant.drift = max(self.variant.drift, diff)
        runtime = self.variant.patcher.get_attachment(self.runner.attachment)
        if runtime is not None and runtime.mode == "auto":
            self.variant.exact_flags.add(runtime.last_exact)
            runtime.last_exact = None  # so the next variant on this MODEL must set it again
        self.runner.variant = None


def _timed_calls(fn: Callable[[], Any], device: torch.device, reps: int) -> tuple[list[float], Any]:
    """Milliseconds of ``reps`` synchronised calls, and the first call's result (kept for use)."""
    samples, kept = [], None
    for i in range(reps):
        seconds, result = timed(fn, device)
        samples.append(seconds * 1e3)
        if i == 0:
            kept = result
    return samples, kept


def build_variants(
    pack: ModuleType, base: Any, adapter_path: Path, inputs: Inputs, device: torch.device, reps: int
) -> tuple[list[ComfyVariant], dict[str, list[float]]]:
    """The five MODELs, made by the pack's own functions (what its nodes call), and what making
    them cost: loading the adapter file, ``apply_adapter``, and ``apply_council`` in both modes
    (merged computes the fold factors here; ComfyUI writes them into the weights at load)."""
    runtime = pack.nodes.runtime
    one_time: dict[str, list[float]] = {}
    one_time["load_adapter (pack, cpu)"], adapter = _timed_calls(
        lambda: pack.instructmole.load_adapter(adapter_path), device, reps
    )
    one_time["apply_adapter"], auto = _timed_calls(lambda: runtime.apply_adapter(base, adapter), device, reps)
    council = adapter.route(inputs.t5_exact, inputs.pooled_exact)  # what the Route node gives for this prompt
    one_time["apply_council fixed"], fixed = _timed_calls(
        lambda: runtime.apply_council(auto, council, "fixed"), device, reps
    )
    one_time["apply_council merged (fold factors)"], merged = _timed_calls(
        lambda: runtime.apply_council(auto, council, "merged"), device, reps
    )
    variants = [
        ComfyVariant("base", base),
        ComfyVariant("auto-exact", auto, carried_signal_kwargs(pack, inputs)),
        ComfyVariant("auto-approx", auto),
        ComfyVariant("fixed", fixed),
        ComfyVariant("merged", merged),
    ]
    return variants, one_time


# ---- figures --------------------------------------------------------------------------------------


def _relative(out: Tensor, ref: Tensor, base: Tensor) -> float:
    """``‖out − ref‖ / ‖ref − base‖``: an error relative to the adapter's own effect (as the core)."""
    effect = (ref - base).norm().item()
    return (out - ref).norm().item() / effect if effect else float("nan")


def agreement(outputs: dict[str, Tensor]) -> dict[str, float]:
    """Pairs that compute the same thing by different code paths.

    ``auto-exact vs fixed``: the wrapper routing from the carried signal vs the Route node's council
    for the same signal. ``merged vs fixed``: ComfyUI's weight patches from the fold factors vs the
    dynamic expert terms.
    """
    base = outputs["base"]
    return {f"{a} vs {b}": _relative(outputs[a], outputs[b], base) for a, b in AGREEMENT}


def checks(variants: Sequence[ComfyVariant], outputs: dict[str, Tensor], latents: Tensor) -> dict[str, Any]:
    """Evidence that each timed variant was the one intended.

    ``effect``: ``‖out − base‖ / ‖latents − base‖``, the adapter's change relative to the base
    model's own prediction (``x − denoised = σ·v``; 0 would mean the adapter was not active);
    ``drift``: the largest change of a variant's output over all its forwards (a switch that did not
    re-patch would change it); ``routed_exact``: what the auto runtime reported after its forwards
    (the exact-signal variant must route from the carried signal, the other from ComfyUI's context);
    ``auto-approx vs auto-exact``: the routing difference (0 when both signals have the same tokens).
    """
    base = outputs["base"]
    prediction = (latents.float().cpu() - base).norm()
    by_name = {v.name: v for v in variants}
    return {
        "finite": all(bool(torch.isfinite(o).all()) for o in outputs.values()),
        "effect": {n: ((o - base).norm() / prediction).item() for n, o in outputs.items() if n != "base"},
        "drift": {v.name: v.drift for v in variants},
        "routed_exact": {n: sorted(by_name[n].exact_flags, key=str) for n in ("auto-exact", "auto-approx")},
        "lowvram": any(True in v.lowvram for v in variants),
        "auto-approx vs auto-exact": _relative(outputs["auto-approx"], outputs["auto-exact"], base),
    }


def _comfy_environment(device: torch.device) -> dict[str, Any]:
    """``common.environment`` plus ComfyUI's version and attention; works without diffusers (not
    a ComfyUI requirement), recording it as absent."""
    import comfy.ldm.modules.attention as attention
    import comfy.model_management

    env = environment(device)
    try:
        from comfyui_version import __version__ as comfy_version
    except ImportError:
        comfy_version = None
    env["comfyui"] = comfy_version
    env["comfy_attention"] = attention.optimized_attention.__name__
    env["comfy_vram_state"] = comfy.model_management.vram_state.name
    return env


# ---- command line ---------------------------------------------------------------------------------


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", choices=sorted(CONFIGS), help="default: full on CUDA, scaled on CPU")
    p.add_argument("--quick", action="store_true", help="tiny config, 2 rounds: a smoke test in seconds")
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default: 10 CUDA, 5 CPU, 2 quick)")
    p.add_argument("--warmup", type=int, help="untimed forwards per variant first (default: 3 CUDA, 1 CPU)")
    p.add_argument("--per-round", type=int, default=1, help="timed forwards per variant per round")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (CPU runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--system-malloc",
        action="store_true",
        help="on CPU, leave glibc's malloc as it is (default for full CPU runs: keep freed memory, see "
        "keep_freed_memory; --quick never changes it)",
    )
    p.add_argument(
        "--comfy-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra ComfyUI command-line argument, e.g. --comfy-arg=--use-pytorch-cross-attention (repeatable)",
    )
    p.add_argument("--out", help="JSON path (default: benchmarks/results/comfyui-<device>[-quick].json)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print markdown tables to stdout, write JSON, return the results."""
    args = parse_args(argv)
    comfyui_path = os.environ.get("COMFYUI_PATH")
    if not comfyui_path:
        raise _usage_error("COMFYUI_PATH is not set: point it at a ComfyUI checkout (the folder with main.py)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise _usage_error("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    saved_threads = torch.get_num_threads()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
        args.malloc = "keep-freed" if not (args.quick or args.system_malloc) and keep_freed_memory() else "system"
    else:
        args.malloc = "system"  # the CUDA caching allocator serves the forward; host mallocs are small
    try:
        with tempfile.TemporaryDirectory(prefix="instructmole-comfy-bench-") as tmp:
            return _run(args, comfyui_path, Path(tmp))
    finally:
        torch.set_num_threads(saved_threads)


def _bootstrap(args: argparse.Namespace, comfyui_path: str, base_directory: Path) -> tuple[ModuleType, torch.device]:
    """ComfyUI imported for the asked device and this repo loaded as its node pack."""
    try:
        bootstrap_comfy(comfyui_path, str(base_directory), cpu=args.device == "cpu", extra_args=args.comfy_arg)
    except RuntimeError as err:
        raise _usage_error(str(err)) from None
    import comfy.model_management

    device = comfy.model_management.get_torch_device()
    if device.type != args.device:
        raise _usage_error(f"ComfyUI chose {device}, not the asked {args.device}")
    return load_pack(), device


def _run(args: argparse.Namespace, comfyui_path: str, tmp: Path) -> dict[str, Any]:
    pack, device = _bootstrap(args, comfyui_path, tmp)
    import comfy.model_management

    name = "quick" if args.quick else (args.config or ("full" if device.type == "cuda" else "scaled"))
    cfg = CONFIGS[name]
    dtype = _DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    rounds = args.rounds or (2 if args.quick else 10 if device.type == "cuda" else 5)
    warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 1)
    reps = 1 if args.quick else 3
    out_path = args.out or f"benchmarks/results/comfyui-{device.type}{'-quick' if args.quick else ''}.json"
    context_tokens = min(cfg.text_tokens, COMFY_CONTEXT_TOKENS)

    log(
        f"config {name}: {cfg.num_double}+{cfg.num_single} blocks, hidden {cfg.hidden}, "
        f"{cfg.image_tokens} image + {context_tokens} text tokens (exact signal {cfg.text_tokens}), "
        f"{str(dtype)[6:]} on {device}, MoLE N={cfg.num_experts} k={cfg.top_k} r={cfg.rank}"
    )
    seconds, base = timed(lambda: build_comfy_flux(cfg, device, dtype, args.seed), device)
    log(f"  ComfyUI Flux built in {seconds:.1f} s")
    inputs = make_inputs(cfg, args.batch, device, dtype, args.seed + 1)
    adapter_path = im.Adapter(build_mole(cfg, torch.device("cpu"), args.seed + 2)).save(tmp / "adapter.safetensors")
    variants: list[ComfyVariant] = []
    try:
        # ComfyUI runs nodes, loads and sampling under inference mode; so does everything from here.
        with torch.inference_mode():
            variants, one_time = build_variants(pack, base, adapter_path, inputs, device, reps)
            runner = _Runner(inputs, device, pack.nodes.runtime.ATTACHMENT)
            timing = [Variant(v.name, partial(runner.setup, v)) for v in variants]
            runner.timing = {t.name: t for t in timing}
            load_before = os.getloadavg()
            log(f"timing {len(timing)} variants: {warmup} warmup, {rounds} interleaved rounds")
            run_interleaved(timing, runner.forward, device, rounds=rounds, warmup=warmup, per_round=args.per_round)
            load_after = os.getloadavg()
    finally:
        comfy.model_management.unload_all_models()  # give the weights back; never leave the fold applied
    outputs = {t.name: t.first_output for t in timing if t.first_output is not None}
    merged = next(v for v in variants if v.name == "merged")
    one_time["merged: first load (ComfyUI applies the fold)"] = [merged.load_s[0] * 1e3]
    base_t = timing[0]
    results: dict[str, Any] = {
        "benchmark": "comfyui",
        "config": {
            **asdict(cfg),
            "hidden": cfg.hidden,
            "image_tokens": cfg.image_tokens,
            "latent_side": 2 * cfg.image_side,
            "context_tokens": context_tokens,
            "exact_signal_tokens": cfg.text_tokens,
            "batch": args.batch,
            "dtype": str(dtype).removeprefix("torch."),
            "rounds": rounds,
            "warmup": warmup,
            "per_round": args.per_round,
            "comfy_args": list(args.comfy_arg),
            "malloc": args.malloc,
        },
        "environment": {
            **_comfy_environment(device),
            "load_average_before": load_before,
            "load_average_after": load_after,
        },
        "variants": {
            t.name: {
                "median_ms": median(t.samples) * 1e3,
                "ratio": median(t.samples) / median(base_t.samples),
                "paired_ratio": _paired_ratio(t.samples, base_t.samples, args.per_round),
                "min_ms": min(t.samples) * 1e3,
                "min_ratio": min(t.samples) / min(base_t.samples),
                "samples_ms": [s * 1e3 for s in t.samples],
                "load_ms": median(v.load_s[1:]) * 1e3,  # per round, after the warmup's first load
                "load_samples_ms": [s * 1e3 for s in v.load_s],
                "minor_faults_per_forward": median(v.faults[1:]) if len(v.faults) > 1 else None,
                "peak_gib": t.peak_bytes / 2**30 if t.peak_bytes is not None else None,
            }
            for t, v in zip(timing, variants, strict=True)
        },
        "one_time_ms": one_time,
        "agreement": agreement(outputs),
        "checks": checks(variants, outputs, inputs.latents),
    }
    write_json(out_path, results)
    print(report(results))
    log(f"wrote {out_path}")
    return results


def report(results: dict[str, Any]) -> str:
    """The markdown summary printed to stdout."""
    cfg, env = results["config"], results["environment"]
    where = env.get("gpu") or f"{env['cpu']}, {env['torch_threads']} threads"
    head = (
        f"InstructMoLE in ComfyUI {env['comfyui']}, config {cfg['name']} ({cfg['num_double']}+{cfg['num_single']} "
        f"blocks, hidden {cfg['hidden']}, latent {cfg['latent_side']}² + reference, {cfg['context_tokens']} T5 "
        f"tokens, exact signal {cfg['exact_signal_tokens']}, batch {cfg['batch']}, {cfg['dtype']}; "
        f"N={cfg['num_experts']} k={cfg['top_k']} r={cfg['rank']}) on {where}, attention "
        f"{env['comfy_attention']}, malloc {cfg['malloc']}; apply_model medians of {cfg['rounds']} interleaved rounds"
    )
    rows = [
        (
            name,
            f"{v['median_ms']:.1f}",
            f"{v['ratio']:.3f}",
            f"{v['paired_ratio']:.3f}",
            f"{v['min_ms']:.1f}",
            f"{v['min_ratio']:.3f}",
            f"{v['load_ms']:.1f}",
            "n/a" if v["minor_faults_per_forward"] is None else f"{v['minor_faults_per_forward']:.0f}",
        )
        for name, v in results["variants"].items()
    ]
    header = (
        "variant",
        "median ms",
        "vs base",
        "vs base, paired",
        "min ms",
        "vs base, min",
        "switch-in load ms",
        "page faults / forward",
    )
    parts = [
        head,
        "",
        markdown_table(header, rows),
        "",
        "Switch-in load: ComfyUI's load_models_gpu for the variant each round, untimed in the forward columns; it "
        "includes unpatching the clone loaded before (restoring the weights after merged) and, for merged, the fold. "
        "Page faults: minor faults of the process per timed forward (median); on CPU, many of them mean the "
        "allocator gave the forward fresh pages, a cost that is not the variant's compute.",
    ]
    busy = max(env["load_average_before"][0], env["load_average_after"][0])
    if env["device"] == "cpu" and busy > env["torch_threads"] + 0.5:
        parts += [
            "",
            f"Note: the machine was shared (1-minute load average up to {busy:.1f} on {env['cpu_count']} cores): "
            "the min column is the cleanest comparison here.",
        ]
    once = [(k, f"{median(v):.1f}") for k, v in results["one_time_ms"].items()]
    parts += ["", markdown_table(("one-time cost", "median ms"), once)]
    agree = [(k, f"{v:.2e}") for k, v in results["agreement"].items()]
    parts += ["", markdown_table(("agreement (‖out − ref‖ / ‖ref − base‖)", "value"), agree)]
    c = results["checks"]
    rows_c = [
        ("outputs finite", str(c["finite"])),
        *((f"effect of {n} (‖out − base‖ / ‖x − base‖)", f"{e:.3e}") for n, e in c["effect"].items()),
        ("max output drift over rounds", f"{max(c['drift'].values()):.3e}"),
        *((f"{n} routed from the exact signal", str(f)) for n, f in c["routed_exact"].items()),
        ("auto-approx vs auto-exact (routing, not an error)", f"{c['auto-approx vs auto-exact']:.2e}"),
        ("ComfyUI loaded partially (lowvram)", str(c["lowvram"])),
    ]
    parts += ["", markdown_table(("check", "value"), rows_c)]
    return "\n".join(parts)


if __name__ == "__main__":
    main()
