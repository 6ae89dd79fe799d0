"""The GPU check's ComfyUI stages: does every LoRA effect survive next to the adapter, per patching mode?

Why: on a GPU, ComfyUI v0.33 runs models through dynamic VRAM (``ModelPatcherDynamic``), and a
conditioning that carries hooks (Create Hook LoRA + Set Model Hooks on Cond) makes the sampler swap
the MODEL for a non-dynamic delegate, a fresh copy of the model (``get_non_dynamic_delegate``). A
pack that installs its terms on the model a node saw rather than the one that executes loses an
effect there, silently (issue 17). None of this runs on a CPU, so this stage is the only place the
real thing is measured.

What it runs, through ComfyUI's own sampler (``comfy.sample.sample``, one Euler step, cfg 1, which
is what KSampler calls), every MODEL made by the pack's public functions
(``nodes.runtime.apply_adapter`` / ``apply_council``) and ComfyUI's (``comfy.sd.load_lora_for_models``,
``comfy.hooks.create_hook_lora`` + ``set_hooks_for_conditioning``):

* base, adapter (auto), merged council, a LoRA alone (loader), the LoRA as a hook on the cond;
* the adapter with the LoRA loaded before it and after it, and with the hook; merged with the hook;
* base again, which must be bit-for-bit the first base (nothing left patched).

Checked: the adapter's effect with the LoRA equals its effect alone, and the LoRA's effect with the
adapter equals its effect alone (‖Δ_stacked − Δ_alone‖ / ‖Δ_alone‖). A dropped term gives ~1.

Modes: ``legacy`` is the classic ``ModelPatcher`` (dynamic VRAM off). ``dynamic`` on CUDA starts
comfy-aimdo as ComfyUI's ``main.py`` does and loads the model as ``ModelPatcherDynamic``; on a CPU,
where ComfyUI never builds one, the hooked runs use ``clone(force_deepcopy=True)``, the same branch
of ``clone()`` the delegate takes, so the dry run covers that path.

The model is ComfyUI's Flux at full width (3072, 24 heads) with few blocks on CUDA (the effects do
not need depth, and the stage must stay within minutes), tiny on the CPU. It is written to a file
and loaded the way UNETLoader does (``cached_patcher_init`` set), because the delegate reloads it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import os
import sys
import types
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .stage import Skip, StageContext, StageResult

__all__ = ["EXACT_TOLERANCE", "KEPT_TOLERANCE", "comfy_stage", "load_flux"]

# Two ways to the same weights (hook LoRA vs loader LoRA, LoRA before vs after the adapter):
# ‖a − b‖ over the smallest effect involved. fp32: rounding only (0 to 2e-5 measured on CPU, tiny
# and full width). bf16: the patched weights may be rounded at different points (dynamic VRAM patches
# on the fly), a few per cent of a LoRA delta. The pack's bug of issue 17 gave 0.61 here.
EXACT_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.25}
# An effect stacked vs alone, ‖Δ_stacked − Δ_alone‖ / ‖Δ_alone‖. Not exact: the network is not
# linear, and the cross term grows with the other effect (measured in fp32 on CPU at full width, ~0.4
# per 1 % of the output the other effect moves). With the effects scaled below to a few tenths of a
# per cent it stays near 0.1-0.2; a lost effect gives 1, so the bound only catches gross losses (the
# exact checks above catch partial ones).
KEPT_TOLERANCE = 0.9
ADAPTER_SCALE = 0.25  # on the random adapter's B (build_mole: N(0, 0.01)): an effect of ~0.5 % at full width
LORA_RANK = 16
LORA_SCALE = 0.01  # std of the LoRA's up matrix: an effect of ~0.2 %
GPU_BLOCKS = (2, 4)  # double, single blocks of the full-width model on CUDA


class _Placeholder(type):
    """A stub's class: any attribute of it is another placeholder (``ColorTrc.ARIB_STD_B67`` in an
    enum table at import time), and nothing about it does any work."""

    def __getattr__(cls, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {"__module__": cls.__module__})


class _AvStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Stand-in modules for PyAV (``av`` and ``av.*``), which ``comfy_api`` imports but this check never calls.

    Why: PyAV's wheel is 35 MB, half of what a device call can carry; ComfyUI uses it only to read and
    write video. Every attribute of a stub is a placeholder class, so imports, annotations and enum
    tables work, and a real use (opening a container) fails.
    """

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname == "av" or fullname.startswith("av."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = types.ModuleType(spec.name)
        module.__path__ = []  # a package, so ``av.container`` and the like import too

        def placeholder(name: str) -> type:
            if name.startswith("__"):
                raise AttributeError(name)
            return _Placeholder(name, (), {"__module__": spec.name})

        module.__getattr__ = placeholder  # type: ignore[method-assign]
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


def _stub_av_if_missing(res: StageResult) -> None:
    if importlib.util.find_spec("av") is None:
        sys.meta_path.append(_AvStub())
        res.put(av="stub (PyAV not carried; nothing here reads or writes video)")


def _comfy_config(ctx: StageContext) -> Any:
    """Full width and token counts on CUDA with ``GPU_BLOCKS``; on the CPU two heads of 128 (Flux's
    rope needs head 128), one block of each kind, a 16×16 latent."""
    from ..inference import CONFIGS

    full = CONFIGS["full"]
    if ctx.dry_run:
        return replace(
            CONFIGS["quick"], name="dry run", heads=2, head_dim=128, axes_dims_rope=full.axes_dims_rope, image_side=8
        )
    return replace(full, name="full width", num_double=GPU_BLOCKS[0], num_single=GPU_BLOCKS[1], text_tokens=256)


def _start_aimdo(root: Path, res: StageResult) -> None:
    """comfy-aimdo's first step, as ComfyUI's ``main.py`` takes it: before anything touches CUDA."""
    if "ModelPatcherDynamic" not in (root / "comfy" / "model_patcher.py").read_text():
        raise Skip("this ComfyUI has no dynamic VRAM (ModelPatcherDynamic); it came with v0.33")
    if importlib.util.find_spec("comfy_aimdo") is None:
        raise Skip("comfy_aimdo is not installed: carry its wheel (README 'GPU check')")
    import comfy_aimdo.control

    try:
        comfy_aimdo.control.init(simple_vram_headroom=None, nvml_pressure=True)
    except TypeError:  # older comfy-aimdo protocols, as main.py falls back
        try:
            comfy_aimdo.control.init(simple_vram_headroom=None)
        except TypeError:
            comfy_aimdo.control.init()
    res.put(comfy_aimdo=getattr(comfy_aimdo, "__version__", None) or _dist_version("comfy-aimdo"))


def _enable_dynamic_vram() -> None:
    """The rest of ``main.py``'s dynamic VRAM start: per-device init, then ``ModelPatcherDynamic`` as
    the loaders' patcher class."""
    import comfy.cli_args
    import comfy.memory_management
    import comfy.model_management
    import comfy.model_patcher
    import comfy_aimdo.control

    devices = comfy.model_management.get_all_torch_devices()
    headroom = getattr(comfy.cli_args.args, "vram_headroom", 0) or 0
    try:
        ok = comfy_aimdo.control.init_devices((d.index, int(headroom * 1024**3)) for d in devices)
    except TypeError:
        ok = comfy_aimdo.control.init_devices(d.index for d in devices)
    if not ok:
        raise Skip("comfy-aimdo did not start on this GPU (ComfyUI would fall back to the legacy ModelPatcher)")
    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _bootstrap(ctx: StageContext, dynamic: bool, res: StageResult) -> Any:
    """ComfyUI imported for this stage's device and mode, and the pack loaded as ComfyUI loads it."""
    comfyui_path = os.environ.get("COMFYUI_PATH")
    if not comfyui_path:
        from .run import NO_COMFY

        raise Skip(NO_COMFY)
    root = Path(comfyui_path).resolve()
    if not (root / "comfy" / "model_patcher.py").is_file():
        raise Skip(f"COMFYUI_PATH={comfyui_path} holds no ComfyUI (no comfy/model_patcher.py)")
    _stub_av_if_missing(res)
    cuda = ctx.device == "cuda"
    extra: list[str] = []
    knows_flag = "--disable-dynamic-vram" in (root / "comfy" / "cli_args.py").read_text()
    if cuda and dynamic:
        _start_aimdo(root, res)
        extra = ["--enable-dynamic-vram"]
    elif cuda and knows_flag:
        extra = ["--disable-dynamic-vram"]
    from tests.comfyui.bootstrap import bootstrap_comfy, load_pack

    bootstrap_comfy(str(root), str(ctx.work_dir / "comfy_base"), cpu=not cuda, extra_args=extra)
    if cuda and dynamic:
        _enable_dynamic_vram()
    version_file = root / "comfyui_version.py"
    version = version_file.read_text().split("=")[-1].strip().strip("\"'") if version_file.is_file() else None
    res.put(comfyui=version, comfyui_path=str(root), comfy_args=extra)
    return load_pack()


# ---- the model, loaded as UNETLoader loads it ------------------------------------------------------


def _write_flux(cfg: Any, device: torch.device, dtype: torch.dtype, path: Path) -> dict[str, Any]:
    """A random ComfyUI Flux (the core benchmark's initialisation) saved as a diffusion-model file."""
    from safetensors.torch import save_file

    from ..comfyui import build_comfy_flux, comfy_unet_config

    patcher = build_comfy_flux(cfg, device, dtype, seed=0)
    state = {k: v.detach().to("cpu").contiguous() for k, v in patcher.model.diffusion_model.state_dict().items()}
    del patcher
    if device.type == "cuda":
        torch.cuda.empty_cache()
    save_file(state, str(path))
    return comfy_unet_config(cfg)


def load_flux(path: str, unet_config: dict[str, Any], dtype: torch.dtype, disable_dynamic: bool = False) -> Any:
    """``comfy.sd.load_diffusion_model_state_dict`` for a known ``unet_config`` (detection only knows
    FLUX.1's full width): the same patcher class choice, offload placement and weight assignment, and
    ``cached_patcher_init`` pointing back here, as ``load_diffusion_model`` sets it, for the delegate."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils

    sd = comfy.utils.load_torch_file(path)
    model_config = comfy.supported_models.Flux(dict(unet_config))
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, "")
    core_class = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)  # v0.33 on
    cls = comfy.model_patcher.ModelPatcher if disable_dynamic else core_class
    patcher = cls(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())
    if not mm.is_device_cpu(mm.unet_offload_device()):
        model.to(mm.unet_offload_device())
    if "assign" in inspect.signature(model.load_model_weights).parameters:
        model.load_model_weights(sd, "", assign=patcher.is_dynamic())
    else:
        model.load_model_weights(sd, "")
    patcher.cached_patcher_init = (load_flux, (path, unet_config, dtype))
    return patcher


def _load(cfg: Any, path: Path, unet_config: dict[str, Any], dtype: torch.dtype, legacy: bool) -> Any:
    """At FLUX.1's width, ComfyUI's own ``load_diffusion_model`` (what UNETLoader calls); else the mirror."""
    import comfy.sd

    if cfg.hidden == 3072:
        pin = legacy and _has_param(comfy.sd.load_diffusion_model, "disable_dynamic")
        kwargs = {"disable_dynamic": True} if pin else {}
        return comfy.sd.load_diffusion_model(str(path), **kwargs)
    return load_flux(str(path), unet_config, dtype, disable_dynamic=legacy)


def _has_param(fn: Callable[..., Any], name: str) -> bool:
    return name in inspect.signature(fn).parameters


def _random_lora(patcher: Any, seed: int) -> dict[str, torch.Tensor]:
    """A rank-16 LoRA in ComfyUI's generic key format on every block Linear but the modulations:
    it covers every layer the adapter patches, where a bypassed layer would drop its effect."""
    g = torch.Generator().manual_seed(seed)
    lora: dict[str, torch.Tensor] = {}
    for name, module in patcher.model.diffusion_model.named_modules():
        if not isinstance(module, torch.nn.Linear) or not name.startswith(("double_blocks.", "single_blocks.")):
            continue
        if "mod" in name.rsplit(".", 2)[-2]:  # img_mod.lin, txt_mod.lin, modulation.lin
            continue
        out_f, in_f = module.weight.shape
        key = f"diffusion_model.{name}"
        lora[f"{key}.lora_down.weight"] = torch.randn(LORA_RANK, in_f, generator=g) / in_f**0.5
        lora[f"{key}.lora_up.weight"] = torch.randn(out_f, LORA_RANK, generator=g) * LORA_SCALE
        lora[f"{key}.alpha"] = torch.tensor(float(LORA_RANK))
    return lora


# ---- the stage -----------------------------------------------------------------------------------


def comfy_stage(ctx: StageContext, res: StageResult, dynamic: bool) -> None:
    """Effects alone and stacked, through ComfyUI's sampler, in one patching mode."""
    pack = _bootstrap(ctx, dynamic, res)
    import comfy.hooks
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sample
    import comfy.sd

    from ..inference import build_mole

    device = comfy.model_management.get_torch_device()
    cuda = device.type == "cuda"
    emulate = dynamic and not cuda
    if emulate and not _has_param(comfy.model_patcher.ModelPatcher.clone, "force_deepcopy"):
        raise Skip("this ComfyUI has no clone(force_deepcopy=...), the CPU stand-in for the dynamic VRAM delegate")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    cfg = _comfy_config(ctx)
    dtype = torch.bfloat16 if cuda else torch.float32
    res.put(
        mode="dynamic VRAM" if dynamic else "legacy ModelPatcher",
        delegate="clone(force_deepcopy=True) (CPU stand-in)" if emulate else ("sampler's" if dynamic else None),
        blocks=f"{cfg.num_double}+{cfg.num_single}",
        hidden=cfg.hidden,
        latent=f"{2 * cfg.image_side}² + reference",
        text_tokens=cfg.text_tokens,
        dtype=str(dtype).removeprefix("torch."),
    )
    flux_path = ctx.work_dir / "flux.safetensors"
    unet_config = _write_flux(cfg, device, dtype, flux_path)
    size = flux_path.stat().st_size / 2**30
    ctx.log(f"random Flux {cfg.num_double}+{cfg.num_single} blocks, hidden {cfg.hidden}: {size:.2f} GiB file")
    base = _load(cfg, flux_path, unet_config, dtype, legacy=not dynamic)
    res.put(patcher=type(base).__name__, is_dynamic=bool(getattr(base, "is_dynamic", lambda: False)()))
    if dynamic and cuda and not res.data["is_dynamic"]:
        raise Skip(f"ComfyUI loaded the model as {type(base).__name__}, not ModelPatcherDynamic")

    runtime = pack.nodes.runtime
    mole = build_mole(cfg, torch.device("cpu"), seed=2)
    with torch.no_grad():
        for _, layer in mole.named_layers():
            layer.B.mul_(ADAPTER_SCALE)
    adapter_file = pack.instructmole.Adapter(mole).save(ctx.work_dir / "adapter.safetensors")
    adapter = pack.instructmole.load_adapter(adapter_file)
    g = torch.Generator().manual_seed(1)
    side = 2 * cfg.image_side
    context = torch.randn(1, cfg.text_tokens, cfg.text_dim, generator=g)
    pooled = torch.randn(1, cfg.pooled_dim, generator=g)
    reference = torch.randn(1, 16, side, side, generator=g)
    latent = torch.zeros(1, 16, side, side)
    noise = torch.randn(1, 16, side, side, generator=g)
    plain = [[context, {"pooled_output": pooled, "guidance": 3.5, "reference_latents": [reference]}]]
    negative = [[torch.zeros_like(context), {"pooled_output": torch.zeros_like(pooled), "guidance": 3.5}]]
    lora = _random_lora(base, seed=3)
    hooked = comfy.hooks.set_hooks_for_conditioning(plain, comfy.hooks.create_hook_lora(lora, 1.0, 1.0))
    delegates = _count_delegates(comfy.model_patcher)

    def sample(model: Any, positive: list) -> torch.Tensor:
        if emulate and positive is hooked:
            model = model.clone(force_deepcopy=True)  # what the sampler does on a GPU with dynamic VRAM
            delegates["made"] += 1
        out = comfy.sample.sample(
            model, noise, 1, 1.0, "euler", "simple", positive, negative, latent, denoise=1.0, disable_pbar=True, seed=0
        )
        return out.float().cpu()

    def with_lora(model: Any) -> Any:
        return comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)[0]

    council = adapter.route(context, pooled)

    def merged(model: Any) -> Any:  # Load Adapter, then Apply Council (merged) with the routed council
        return runtime.apply_council(runtime.apply_adapter(model, adapter), council, "merged")

    steps: list[tuple[str, Callable[[], Any], list]] = [
        ("base", lambda: base, plain),
        ("adapter", lambda: runtime.apply_adapter(base, adapter), plain),
        ("merged", lambda: merged(base), plain),
        ("lora", lambda: with_lora(base), plain),
        ("hook", lambda: base, hooked),
        ("lora, then adapter", lambda: runtime.apply_adapter(with_lora(base), adapter), plain),
        ("adapter, then lora", lambda: with_lora(runtime.apply_adapter(base, adapter)), plain),
        ("adapter + hook", lambda: runtime.apply_adapter(base, adapter), hooked),
        ("lora, then merged", lambda: merged(with_lora(base)), plain),
        ("merged + hook", lambda: merged(base), hooked),
        ("base again", lambda: base, plain),
    ]
    out: dict[str, torch.Tensor] = {}
    seconds: dict[str, float] = {}
    for name, make, positive in steps:
        # Each run from unloaded models: a run must not find weights that the one before left patched
        # (a bypassed layer would then read the previous run's LoRA and hide its own loss).
        comfy.model_management.unload_all_models()
        start = ctx.elapsed()
        out[name] = sample(make(), positive)
        seconds[name] = ctx.elapsed() - start
        ctx.log(f"sampled {name}: {seconds[name]:.2f} s")
        res.put(sample_s=seconds)
    comfy.model_management.unload_all_models()

    exact, kept = EXACT_TOLERANCE[dtype], KEPT_TOLERANCE
    norm = out["base"].norm().item()
    effects = {name: (out[name] - out["base"]).norm().item() / norm for name in ("adapter", "merged", "lora", "hook")}
    res.put(effect_vs_base_output=effects, delegates_made=delegates["made"])
    for name in ("adapter", "merged", "lora", "hook"):
        res.check(f"{name} changes the output (‖Δ‖ / ‖base‖)", effects[name], 1e-4, ">=")
    res.check("every output finite", float(all(bool(torch.isfinite(o).all()) for o in out.values())), 1.0, "==")
    # Exact: two ways to the same weights. Error over the smaller of the two effects involved.
    smallest = min((out[n] - out["base"]).norm().item() for n in ("adapter", "merged", "lora"))
    for a, b, what in (
        ("hook", "lora", "hook LoRA = loader LoRA, alone"),
        ("adapter + hook", "lora, then adapter", "adapter + hook LoRA = adapter + loader LoRA"),
        ("adapter, then lora", "lora, then adapter", "LoRA loaded after the adapter = before it"),
        ("merged + hook", "lora, then merged", "merged + hook LoRA = merged + loader LoRA"),
    ):
        res.check(f"{what} (‖a − b‖ / smallest effect)", (out[a] - out[b]).norm().item() / smallest, exact)
    # Kept: each effect, stacked, against the same effect alone. Not exact (the network is not
    # linear: the cross terms), but a dropped effect gives ~1.
    ratios = {}
    for stacked, other, alone, what in (
        ("lora, then adapter", "lora", "adapter", "adapter effect, LoRA loaded before"),
        ("lora, then adapter", "adapter", "lora", "LoRA effect, loaded before the adapter"),
        ("adapter, then lora", "lora", "adapter", "adapter effect, LoRA loaded after"),
        ("adapter, then lora", "adapter", "lora", "LoRA effect, loaded after the adapter"),
        ("adapter + hook", "hook", "adapter", "adapter effect, hooked cond"),
        ("adapter + hook", "adapter", "hook", "hook LoRA effect, with the adapter"),
        ("merged + hook", "hook", "merged", "merged effect, hooked cond"),
        ("merged + hook", "merged", "hook", "hook LoRA effect, with merged"),
    ):
        stacked_term, alone_term = out[stacked] - out[other], out[alone] - out["base"]
        ratios[what] = {
            "ratio": stacked_term.norm().item() / alone_term.norm().item(),
            "error": (stacked_term - alone_term).norm().item() / alone_term.norm().item(),
        }
        res.check(f"{what} kept (‖Δ_stacked − Δ_alone‖ / ‖Δ_alone‖)", ratios[what]["error"], kept)
    res.put(effect_stacked_vs_alone=ratios)
    restored = (out["base again"] - out["base"]).abs().max().item()
    res.check("base after all the others, bit for bit (max |Δ|)", restored, 0.0, "==")
    if dynamic:
        res.check("hooked runs went through a non-dynamic delegate (count)", float(delegates["made"]), 1.0, ">=")
    if cuda:
        res.put(peak_gib=torch.cuda.max_memory_allocated(device) / 2**30)


def _relative(out: torch.Tensor, ref: torch.Tensor, base: torch.Tensor | float) -> float:
    """``‖out − ref‖ / ‖ref − base‖``."""
    scale = (ref - base).norm().item()
    return (out - ref).norm().item() / scale if scale else float("nan")


def _count_delegates(model_patcher: Any) -> dict[str, int]:
    """Count the sampler's ``get_non_dynamic_delegate`` calls (this process only), so the report can
    say the hooked runs really took the delegate."""
    counter = {"made": 0}
    cls = getattr(model_patcher, "ModelPatcherDynamic", None)
    original = getattr(cls, "get_non_dynamic_delegate", None)
    if original is None:
        return counter

    def counted(self: Any) -> Any:
        counter["made"] += 1
        return original(self)

    cls.get_non_dynamic_delegate = counted
    return counter
