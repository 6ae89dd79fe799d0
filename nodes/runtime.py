"""InstructMoLE on a ComfyUI MODEL: per-row routing, dynamic expert terms, merged councils.

Everything is installed copy-on-write on a ``ModelPatcher`` clone, and nothing renames or replaces
a module, so other LoRAs, fp8 weights and low-VRAM offloading keep working on the same layers.
There is one mechanism, a DIFFUSION_MODEL wrapper, for every way ComfyUI runs a model:

* per forward it routes every row of the batch once, from the exact signal its conditioning
  carries (InstructMoLE Text Encode) or, failing that, from the features the model reads (FLUX.1:
  T5 and the CLIP pooled vector; Qwen-Image: its text features and attention mask; FLUX.2: its text
  features), per the architecture ``place`` found (``instructmole/families.py``);
* for that forward only, it gives each target Linear *of the model being run*
  (``executor.class_obj``) a forward that calls the one it had (ComfyUI's cast / weight-function /
  low-VRAM / hook path, or another pack's patch) and adds the council term, and restores the
  modules and clears the routing state in ``finally``;
* merged councils and the plain-LoRA part are ordinary ComfyUI weight patches.

Why not object patches: they are bound to the Linear modules of the model they were made on.
ComfyUI v0.33 samples a hooked conditioning on a *non-dynamic delegate* of a dynamic-VRAM model
(``ModelPatcher.clone(disable_dynamic=True)``: a freshly loaded copy with the patches copied over),
and object patches bound to the original's modules would bypass the copy's weights, its weight
patches and hook weights. The wrapper travels with every clone and always meets the modules that
really run.

The routing state lives on one core ``MoLERuntime`` per patched MODEL (held by the ``ComfyRuntime``
attachment of the patcher), never on a module or class, so two adapters on two clones in one graph
never share it; the diffusers ``attach`` and the trainer install the same core object.
"""

from __future__ import annotations

import functools
import inspect
import logging
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..instructmole import Adapter, Council, CouncilMismatchError, InstructMoLEError
from ..instructmole.checks import checked_strength
from ..instructmole.families import FAMILIES, Architecture, block_counts, check_model_fits
from ..instructmole.runtime import DeviceCache, MoLERuntime, RoutingError
from .signal import CHECK_KEY, MASK_KEY, POOLED_KEY, T5_KEY, rows_still_matching, unpack, unpack_mask

ATTACHMENT = "instructmole"
PREFIX = "diffusion_model."
LORA_PREFIX = "transformer."  # how an adapter file names its plain-LoRA layers (``instructmole/adapter.py``)
log = logging.getLogger("instructmole")


class ModelMismatchError(InstructMoLEError):
    """The MODEL is not one this adapter can be applied to."""


@dataclass(frozen=True)
class Placement:
    """Where a canonical layer lives in this ComfyUI model."""

    name: str  # canonical diffusers name
    module: str  # e.g. "diffusion_model.double_blocks.3.img_mlp.2"
    rows: tuple[int, int] | None  # output rows of a fused weight, or None


def model_architecture(adapter: Adapter, patcher: Any) -> Architecture:
    """The architecture of the MODEL's diffusion model, checked against the adapter's family
    (``families.check_model_fits``): one sentence naming what to load when it does not fit."""
    diffusion = getattr(getattr(patcher, "model", None), "diffusion_model", None)
    if not isinstance(diffusion, torch.nn.Module):
        family = FAMILIES.get(adapter.config.base_model)
        title = family.title if family is not None else adapter.config.base_model
        raise ModelMismatchError(
            f"this MODEL is not one InstructMoLE knows (FLUX.1, FLUX.2 or Qwen-Image), and the adapter was made "
            f"for {title}; load {title}"
        )
    return check_model_fits(adapter.config, diffusion, ModelMismatchError).arch


def _widths(arch: Architecture, diffusion: Any) -> tuple[int, int]:
    """(hidden, MLP hidden) of a ComfyUI diffusion model of ``arch``: the text embedder's output width
    and the first double block's image-MLP width (FLUX.2's fused SwiGLU input holds two halves)."""
    hidden = diffusion.get_submodule(arch.inputs["comfy"].text).out_features
    double = diffusion.get_submodule(arch.double_blocks["comfy"])[0]
    first = double.img_mlp.net[0].proj if arch.key == "qwen_image" else double.img_mlp[0]
    return hidden, first.out_features // (2 if arch.key == "flux2" else 1)


def place(adapter: Adapter, patcher: Any) -> list[Placement]:
    """Map every adapter layer onto the model and check its shape; errors say what does not fit."""
    arch = model_architecture(adapter, patcher)
    diffusion = patcher.model.diffusion_model
    hidden, mlp_hidden = _widths(arch, diffusion)
    placements = []
    for spec in adapter.config.layers:
        try:
            target = arch.comfy_target(spec.name, hidden, mlp_hidden)
        except ValueError as err:
            raise ModelMismatchError(f"{err}; use an adapter made for {arch.title}") from None
        try:
            linear = patcher.get_model_object(PREFIX + target.module)
        except AttributeError:
            double, single = block_counts(diffusion, arch)
            raise ModelMismatchError(
                f"the adapter's layer {spec.name!r} ({target.module}) does not exist in this model; "
                f"it has {double} double and {single} single blocks"
            ) from None
        out = target.rows[1] if target.rows else linear.out_features
        if (linear.in_features, out) != (spec.in_features, spec.out_features):
            raise ModelMismatchError(
                f"the adapter's layer {spec.name!r} is {spec.in_features}->{spec.out_features} but the model's "
                f"{target.module} is {linear.in_features}->{out}; use an adapter trained for this model"
            )
        placements.append(Placement(spec.name, PREFIX + target.module, target.rows))
    return placements


@dataclass(frozen=True)
class TokenLayout:
    """Where a forward's tokens sit, for maps of per-token routing.

    ComfyUI's Fluxes run the image tokens alone through the double blocks (the target image's
    ``grid`` first, reference images after) and ``[text; image]`` through the single blocks;
    Qwen-Image has double blocks only. ``grid``: the target's tokens per side (the latent over the
    architecture's patch, rounded up as the model pads). ``cond_or_uncond``: ComfyUI's order of the
    batch's equal chunks (0 = positive, 1 = negative).
    """

    text_tokens: int
    grid: tuple[int, int]
    cond_or_uncond: tuple[int, ...]

    def image_tokens(self, name: str, choices: Tensor) -> Tensor:
        """The target image's tokens of layer ``name``'s ``[rows, tokens]`` choices, positive rows only."""
        start = self.text_tokens if name.startswith("single_transformer_blocks.") else 0
        picked = choices[:, start : start + self.grid[0] * self.grid[1]]
        if 0 in self.cond_or_uncond and len(self.cond_or_uncond) > 1:
            chunk = picked.shape[0] // len(self.cond_or_uncond)
            first = self.cond_or_uncond.index(0) * chunk
            picked = picked[first : first + chunk]
        return picked


# The 4th argument ComfyUI's diffusion model forward receives (after x, timestep, context), per
# architecture, and what the router reads from it: FLUX.1's ``y`` is the CLIP pooled vector,
# Qwen-Image's ``attention_mask`` the text tokens it attends to; FLUX.2's ``y`` is unused (None).
_FOURTH: dict[str, str | None] = {"flux1": "pooled", "qwen_image": "mask", "flux2": None}


def token_mask(attention_mask: Tensor | None) -> Tensor | None:
    """The text tokens a ComfyUI ``attention_mask [rows, tokens]`` lets the model attend to, as a bool
    mask (None: all): an integer mask is 1 for a token (ComfyUI's text encoders), a floating one an
    additive bias (Qwen-Image's forward turns integer masks into ``(m - 1) * dtype max``)."""
    if attention_mask is None:
        return None
    if attention_mask.is_floating_point():
        return attention_mask > -1e4
    return attention_mask != 0


@dataclass(frozen=True)
class _Signal:
    """Routing inputs for some rows: text features, pooled vector (FLUX.1) and token mask (text families)."""

    text: Tensor
    pooled: Tensor | None
    mask: Tensor | None

    def rows(self, keep: Tensor) -> _Signal:
        """The signal of the rows ``keep`` (bool ``[rows]``) marks."""
        pooled = None if self.pooled is None else self.pooled[keep]
        return _Signal(self.text[keep], pooled, None if self.mask is None else self.mask[keep])

    def route(self, core: MoLERuntime) -> tuple[Tensor, Tensor, Tensor]:
        return core.route(self.text, self.pooled, mask=self.mask)


class ComfyRuntime:
    """The core ``MoLERuntime`` of one adapter on one MODEL clone, fed from ComfyUI's forward.

    What is ComfyUI's own lives here: where the routing signal comes from (the exact signal an
    InstructMoLE Text Encode put in the conditioning, or the features ComfyUI hands the model),
    merged weight patches, and deriving clones; the routing state and the expert term are the core's.
    """

    def __init__(
        self,
        adapter: Adapter,
        placements: list[Placement],
        *,
        expert_strength: float = 1.0,
        council: Council | None = None,
        merged: bool = False,
        cache: DeviceCache | None = None,
    ) -> None:
        self.adapter, self.placements = adapter, placements
        self.arch = FAMILIES[adapter.config.base_model].arch  # the MODEL's, as ``place`` checked
        self.core = MoLERuntime(
            adapter.model,
            council=council,
            merged=merged,
            expert_strength=expert_strength,
            adapter_id=adapter.adapter_id,
            cache=cache or adapter.cache,
        )
        self.last_exact: bool | None = None  # whether the latest councils came from the exact signal
        self.last_exact_rows: tuple[bool, ...] = ()  # the same, row by row
        self.last_layout: TokenLayout | None = None  # where the image tokens sat in the latest forward
        # The token map's record: the latest forward that held a positive row (under CFG the negative
        # may run last, in a forward of its own), with its per-token first choices (device tensors).
        self.map_record: tuple[TokenLayout, dict[str, Tensor]] | None = None
        self._warned = False
        self._warned_length = False
        # The forward installed on each module of a model this runtime ran (kept while the module lives).
        self._forwards: weakref.WeakKeyDictionary[Any, Callable] = weakref.WeakKeyDictionary()
        self.merged_patches: list = []  # the weight-patch keys this runtime merged (to undo on replace)

    @property
    def expert_strength(self) -> float:
        return self.core.expert_strength

    @property
    def council(self) -> Council | None:
        return self.core.council

    @property
    def last_council(self) -> Council | None:
        """The councils of the latest auto-routed forward (built on demand: no device sync per step)."""
        return self.core.last_council

    @property
    def merged(self) -> bool:
        return self.core.merged

    @property
    def mode(self) -> str:
        return self.core.mode

    def derive(self, council: Council | None, merged: bool) -> ComfyRuntime:
        """A runtime for a clone with another council/mode, sharing the device caches."""
        return ComfyRuntime(
            self.adapter,
            self.placements,
            expert_strength=self.expert_strength,
            council=council,
            merged=merged,
            cache=self.core.cache,
        )

    # ---- per forward (the DIFFUSION_MODEL wrapper) --------------------------------------------

    @torch.no_grad()
    def begin(self, x: Tensor, context: Tensor, fourth: Tensor | None, options: dict, kwargs: dict) -> None:
        """Route every row of one forward. ``fourth``: the model's 4th argument (``_FOURTH``)."""
        cfg = self.adapter.config
        patch = self.arch.comfy_patch
        self.last_layout = TokenLayout(
            text_tokens=context.shape[1],
            grid=(-(-x.shape[-2] // patch), -(-x.shape[-1] // patch)),  # the model pads to its patches
            cond_or_uncond=tuple(options.get("cond_or_uncond") or ()),
        )
        if self.merged or self.council is not None or not cfg.instruction_layers:
            self.core.begin(None, None, rows=x.shape[0], device=x.device)
            return
        own = self._own_signal(context, fourth)
        clip = cfg.router_pool == "clip"
        rows = x.shape[0]
        exact = torch.zeros(rows, dtype=torch.bool)
        if T5_KEY in kwargs and (POOLED_KEY if clip else MASK_KEY) in kwargs:
            exact[:] = True
            if CHECK_KEY in kwargs:  # rows whose conditioning a core node edited after Text Encode
                exact = rows_still_matching(kwargs[CHECK_KEY], context, own.pooled).cpu()
        self._note_fallback(int((~exact).sum()), rows, context.shape[1], T5_KEY in kwargs)
        if bool(exact.all()):
            self._begin(self._carried_signal(kwargs, x.device), rows)
        elif not bool(exact.any()):
            self._begin(own, rows)
        else:  # some rows exact, some not: the signals differ in length, so route the two groups apart
            mask = exact.to(x.device)
            routed_own = own.rows(~mask).route(self.core)
            routed_carried = self._carried_signal(kwargs, x.device).rows(mask).route(self.core)
            routed = []
            for own_part, carried_part in zip(routed_own, routed_carried, strict=True):
                joined = own_part.new_empty((rows, *own_part.shape[1:]))
                joined[~mask], joined[mask] = own_part, carried_part
                routed.append(joined)
            self.core.begin(None, None, rows=rows, routed=tuple(routed))
        # A FLUX.1 router reads every T5 token (no mask): a signal encoded for another length is close,
        # not exact. A text family's router reads only the masked tokens, whatever the padding.
        if clip and T5_KEY in kwargs and kwargs[T5_KEY].shape[1] != cfg.text_length:
            exact[:] = False
            if not self._warned_length:
                self._warned_length = True
                log.warning(
                    "InstructMoLE: the conditioning's routing signal has %d T5 tokens but this adapter was trained "
                    "with %d: routed from it, close but not exact.",
                    kwargs[T5_KEY].shape[1],
                    cfg.text_length,
                )
        self.last_exact = bool(exact.all())
        self.last_exact_rows = tuple(exact.tolist())

    def _own_signal(self, context: Tensor, fourth: Tensor | None) -> _Signal:
        """What the model itself reads: its text features, and per ``_FOURTH`` the pooled vector or mask."""
        reads = _FOURTH[self.arch.key]
        if reads == "pooled" and fourth is None:
            raise RoutingError("InstructMoLE needs the CLIP pooled vector (y) to route; use FLUX conditioning")
        pooled = fourth if reads == "pooled" else None
        mask = token_mask(fourth) if reads == "mask" else None
        if self.arch.router_pool == "text":
            # ComfyUI pads FLUX.2's text to 512 tokens with zeros in front (model_base.Flux2): no token of
            # the prompt is all zero, so those are left out as padding is in training.
            real = context.abs().amax(dim=-1) > 0
            mask = real if mask is None else mask.to(real.device) & real
        return _Signal(context, pooled, mask)

    @staticmethod
    def _carried_signal(kwargs: dict, device: torch.device) -> _Signal:
        """The exact signal the rows' conditionings carry (``nodes/signal.py``), on ``device``."""
        pooled = unpack(kwargs[POOLED_KEY]).to(device) if POOLED_KEY in kwargs else None
        mask = unpack_mask(kwargs[MASK_KEY]).to(device) if MASK_KEY in kwargs else None
        return _Signal(unpack(kwargs[T5_KEY]).to(device), pooled, mask)

    def _begin(self, signal: _Signal, rows: int) -> None:
        self.core.begin(signal.text, signal.pooled, rows=rows, mask=signal.mask)

    def _note_fallback(self, own: int, rows: int, tokens: int, carried: bool) -> None:
        """Say once per runtime why councils are close rather than exact (routing from ComfyUI's features)."""
        if not own or self._warned:
            return
        self._warned = True
        if carried:
            log.info(
                "InstructMoLE: %d of %d rows carry a conditioning that a node changed after InstructMoLE Text "
                "Encode (ConditioningZeroOut, Average, Concat, ...): routed from their own features, as the "
                "model sees them, not from the instruction they were encoded from.",
                own,
                rows,
            )
        elif self.adapter.config.router_pool == "clip":
            log.info(
                "InstructMoLE: routing a conditioning from ComfyUI's own T5 features (padded to %d tokens, "
                "not the %d the adapter was trained with): close, not exact. Encode with 'InstructMoLE Text "
                "Encode' for exact councils.",
                tokens,
                self.adapter.config.text_length,
            )
        else:
            log.info(
                "InstructMoLE: routing a conditioning from the %s ComfyUI hands the model (%d tokens, every token "
                "the model attends to): close, not exact. Encode with 'InstructMoLE Text Encode' for exact councils.",
                self.arch.text_features,
                tokens,
            )

    def end(self) -> None:
        layout = self.last_layout
        if layout is not None and (not layout.cond_or_uncond or 0 in layout.cond_or_uncond):
            self.map_record = (layout, self.core.token_choices)
        self.core.end()

    def wrapper(
        self,
        executor: Any,
        x: Tensor,
        timestep: Tensor,
        context: Tensor,
        fourth: Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Tensor:
        """One forward of the diffusion model. ComfyUI passes its arguments positionally, and the 4th
        differs by architecture (``_FOURTH``: FLUX's ``y``, Qwen-Image's ``attention_mask``): it is
        handed on untouched."""
        self.begin(x, context, fourth, _transformer_options(executor, args, kwargs), kwargs)
        installed: list[tuple[Any, bool, Any]] = []
        try:
            self._install_forwards(executor.class_obj, installed)
            return executor(x, timestep, context, fourth, *args, **kwargs)
        finally:  # also after a failure half-way through installing: every module gets its own back
            _restore_forwards(installed)
            self.end()

    # ---- per Linear (forwards installed for one forward of the diffusion model) ----------------

    def delta(self, name: str, x: Tensor) -> Tensor | None:
        return self.core.delta(name, x)

    def add_term(self, name: str, x: Tensor, out: Tensor) -> Tensor:
        return self.core.add_term(name, x, out)

    @property
    def dynamic_placements(self) -> list[Placement]:
        """The layers that need a term per forward (the runtime's ``layers``: all, or once merged
        only the token-routed ones)."""
        return [p for p in self.placements if p.name in self.core.layers]

    def _install_forwards(self, diffusion_model: Any, installed: list[tuple[Any, bool, Any]]) -> None:
        """Give each dynamic layer of ``diffusion_model`` (the module tree this forward really runs)
        a forward that adds the term, noting in ``installed`` what to restore. One forward object per
        module and runtime, so ``torch.compile`` guards see the same function on every step."""
        for p in self.dynamic_placements:
            module = _get_module(diffusion_model, p.module.removeprefix(PREFIX))
            own = module.__dict__.get("forward")
            if getattr(own, "instructmole_runtime", None) is self:
                continue  # already ours (a re-entrant call): never chain a term twice
            forward = self._forwards.get(module)
            if forward is None or forward.instructmole_inner is not own:
                forward = _patched_forward(self, p, module, own)
                self._forwards[module] = forward
            installed.append((module, "forward" in module.__dict__, own))
            module.forward = forward


def _get_module(root: Any, path: str) -> Any:
    """``root``'s submodule at a dotted ``path`` (through ``torch.compile``'s wrappers, which forward
    attribute access to the module they compiled)."""
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _restore_forwards(installed: list[tuple[Any, bool, Any]]) -> None:
    for module, had_own, own in reversed(installed):
        if had_own:
            module.forward = own
        else:
            del module.forward


def _transformer_options(executor: Any, args: tuple, kwargs: dict) -> dict:
    """``transformer_options`` wherever the model passes it: ComfyUI's Flux and Qwen-Image pass it
    positionally (8th and 7th argument of ``_forward``), other callers by keyword."""
    if "transformer_options" in kwargs:
        return kwargs["transformer_options"] or {}
    original = getattr(executor, "original", None)
    index = _options_index(getattr(original, "__func__", original))
    if index is not None and index < len(args) and isinstance(args[index], dict):
        return args[index]
    return {}


@functools.lru_cache(maxsize=64)
def _options_index(function: Any) -> int | None:
    """Where ``transformer_options`` sits in ``*args`` after (x, timestep, context, 4th), if anywhere."""
    try:
        names = [n for n in inspect.signature(function).parameters if n != "self"]
        index = names.index("transformer_options") - 4
    except (TypeError, ValueError):
        return None
    return index if index >= 0 else None


def _patched_forward(runtime: ComfyRuntime, place_: Placement, module: Any, own: Any) -> Callable:
    """A forward for ``module``: the one it had (its own instance forward, e.g. another pack's, or
    the class forward through ComfyUI's casting) plus the council term."""
    call = own if own is not None else type(module).forward.__get__(module)
    name, rows = place_.name, place_.rows

    def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        out = call(x, *args, **kwargs)
        if rows is None:
            return runtime.add_term(name, x, out)
        delta = runtime.delta(name, x)
        if delta is None:
            return out
        out = out.clone()
        out[..., rows[0] : rows[0] + rows[1]] += delta.to(out.dtype)
        return out

    forward.instructmole_runtime = runtime  # type: ignore[attr-defined]
    forward.instructmole_inner = own  # type: ignore[attr-defined]
    return forward


def _install(m: Any, runtime: ComfyRuntime) -> None:
    """Install ``runtime`` on the clone ``m``: the wrapper (replacing an earlier runtime's), merged weight patches."""
    from comfy.patcher_extension import WrappersMP
    from comfy.weight_adapter import LoRAAdapter

    previous: ComfyRuntime | None = m.get_attachment(ATTACHMENT)
    # Undo what an earlier InstructMoLE runtime merged on this chain, then merge ours.
    if previous is not None and previous.merged_patches:
        for key in previous.merged_patches:
            weight_key = key if isinstance(key, str) else key[0]
            kept = [p for p in m.patches.get(weight_key, []) if not getattr(p[1], "instructmole", False)]
            if kept:
                m.patches[weight_key] = kept
            else:
                m.patches.pop(weight_key, None)
        m.patches_uuid = uuid.uuid4()
    if runtime.merged:
        factors = dict(runtime.core.folded(factors=True))
        patches = {}
        for p in runtime.placements:
            if p.name not in factors:
                continue
            down, up = factors[p.name]
            patch = LoRAAdapter(set(), (up, down, None, None, None, None))
            patch.instructmole = True
            key = p.module + ".weight"
            patches[key if p.rows is None else (key, (0, p.rows[0], p.rows[1]))] = patch
        m.add_patches(patches, 1.0)
        runtime.merged_patches = list(patches)
    m.remove_wrappers_with_key(WrappersMP.DIFFUSION_MODEL, ATTACHMENT)
    m.add_wrapper_with_key(WrappersMP.DIFFUSION_MODEL, ATTACHMENT, runtime.wrapper)
    m.set_attachments(ATTACHMENT, runtime)


def apply_adapter(model: Any, adapter: Adapter, *, expert_strength: float = 1.0, lora_strength: float = 1.0) -> Any:
    """A clone of ``model`` with the adapter in auto mode and its plain-LoRA part as weight patches."""
    import comfy.lora

    expert_strength = checked_strength("expert_strength", expert_strength, ModelMismatchError)
    lora_strength = checked_strength("lora_strength", lora_strength, ModelMismatchError)
    if model.get_attachment(ATTACHMENT) is not None:
        raise ModelMismatchError(
            "this MODEL already carries an InstructMoLE adapter; load the second adapter on the base MODEL"
        )
    placements = place(adapter, model)
    m = model.clone()
    if adapter.lora and lora_strength != 0:
        key_map = _lora_key_map(m.model, adapter)
        loaded = comfy.lora.load_lora(adapter.lora, key_map, log_missing=False)
        used = set().union(*(getattr(v, "loaded_keys", set()) for v in loaded.values())) if loaded else set()
        unused = sorted(k for k in adapter.lora if k not in used)
        if unused:
            raise ModelMismatchError(f"the adapter's LoRA tensor {unused[0]!r} matches no layer of this model")
        _check_lora_shapes(m.model, loaded, key_map, adapter.lora)
        m.add_patches(loaded, lora_strength)
    _install(m, ComfyRuntime(adapter, placements, expert_strength=expert_strength))
    return m


def _lora_key_map(model: Any, adapter: Adapter) -> dict:
    """ComfyUI's LoRA key map for ``model``, completed with the adapter's block layers it lacks.

    The adapter names its plain-LoRA layers the diffusers way (``transformer.<canonical name>``).
    ComfyUI's map knows those names for FLUX.1 and Qwen-Image, and for FLUX.2 from v0.33 on; for a
    FLUX.2 MODEL on an older ComfyUI the architecture's own mapping (``comfy_target``: module and
    fused rows) fills in what is missing. Names neither knows stay unmapped (and are refused)."""
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model, {})
    arch = FAMILIES[adapter.config.base_model].arch
    hidden, mlp_hidden = _widths(arch, model.diffusion_model)
    for key in adapter.lora:
        stem = key.rpartition(".lora_")[0] if ".lora_" in key else ""
        if not stem.startswith(LORA_PREFIX) or stem in key_map:
            continue
        try:
            target = arch.comfy_target(stem.removeprefix(LORA_PREFIX), hidden, mlp_hidden)
        except ValueError:
            continue
        weight = f"{PREFIX}{target.module}.weight"
        key_map[stem] = weight if target.rows is None else (weight, (0, *target.rows))
    return key_map


def _weight_slot(key: Any) -> tuple[str, tuple | None]:
    """A ComfyUI LoRA target (``"w.weight"`` or ``("w.weight", (dim, start, length), ...)``) as (key, slice)."""
    if isinstance(key, str):
        return key, None
    offset = key[1] if len(key) > 1 else None
    return key[0], tuple(offset) if offset is not None else None


def _check_lora_shapes(model: Any, loaded: dict, key_map: dict, lora: dict) -> None:
    """Refuse a LoRA part that does not fit its layer now: ComfyUI would log and skip it at sampling.

    The error names the layer as the adapter file does: ComfyUI's key map has several names for one
    weight (v0.33 adds FLUX.2 aliases such as ``attn.to_out``), so only the names the file uses count."""
    import comfy.utils

    stems = {key.rpartition(".lora")[0] for key in lora if ".lora" in key}
    names = {_weight_slot(v): k for k, v in key_map.items() if k in stems}
    for key, patch in loaded.items():
        weight_key, offset = _weight_slot(key)
        weights = getattr(patch, "weights", None) or (patch[1] if isinstance(patch, tuple) else None)
        if weights is None:
            continue
        up, down = weights[0], weights[1]
        shape = comfy.utils.get_attr(model, weight_key).shape
        out = offset[2] if offset is not None else shape[0]
        if up.ndim != 2 or down.ndim != 2 or up.shape[0] != out or down.shape[1] != shape[1]:
            name = names.get((weight_key, offset), weight_key)
            raise ModelMismatchError(
                f"the adapter's LoRA part {name!r} is {down.shape[-1]}->{up.shape[0]} but its layer in this "
                f"model is {shape[1]}->{out}; use an adapter made for this model"
            )


def runtime_of(model: Any) -> ComfyRuntime:
    runtime = model.get_attachment(ATTACHMENT)
    if runtime is None:
        raise ModelMismatchError(
            "this MODEL carries no InstructMoLE adapter; connect the MODEL output of 'InstructMoLE Load Adapter'"
        )
    return runtime


def apply_council(model: Any, council: Council, mode: str) -> Any:
    """A clone of ``model`` whose rows all use ``council``: folded into weights, or applied dynamically."""
    if mode not in ("merged", "fixed"):
        raise InstructMoLEError(f"mode {mode!r} must be 'merged' or 'fixed'")
    if not isinstance(council, Council):
        raise CouncilMismatchError(f"expected an InstructMoLE council, got {type(council).__name__}")
    runtime = runtime_of(model)
    cfg = runtime.adapter.config
    council.check_adapter(cfg.instruction_layers, cfg.num_experts, runtime.adapter.adapter_id)
    if council.batch_size != 1:
        raise CouncilMismatchError(
            f"this council holds {council.batch_size} instructions; route a single instruction to apply it"
        )
    m = model.clone()
    _install(m, runtime.derive(council, merged=mode == "merged"))
    return m
