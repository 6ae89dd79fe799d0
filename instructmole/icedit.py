"""ICEdit's MoE-LoRA files, read as InstructMoLE adapters (written from the published formula).

ICEdit (FLUX.1 Fill [dev]) ships a diffusers LoRA safetensors in which some Linears carry a
mixture of LoRA experts routed per token::

    transformer.<module>.lora_A.expert_<j>.weight   [r, in]    expert j's down-projection
    transformer.<module>.lora_B.expert_<j>.weight   [out, r]   expert j's up-projection
    transformer.<module>.lora_route.weight          [N, in]    the token gate (no bias)

and every other target is a plain LoRA (``lora_A.weight``/``lora_B.weight``, no alpha: scale 1).
Per token x of such a layer's input: ``logits = route(x)``, the top-k logits are kept and
softmaxed among themselves, and ``out = W0 x + Σ_j w_j · B_j A_j x`` (k = 1 at inference, so the
chosen expert's weight is exactly 1).

That is an InstructMoLE adapter whose layers are all token-routed (``routing="token"``) with
``token_weights="renormalised"``, ``alpha = rank`` (scale 1), ``A = stack(lora_A.expert_jᵀ)``,
``B = stack(lora_B.expert_jᵀ)`` and ``gate = lora_route``; the plain part is kept as the adapter's
LoRA part under the same key names. There is no instruction router: the adapter carries a
minimal one (every size 1, all zeros) only so that the file layout, which always has a router,
round-trips; nothing ever runs it (``check_model_fits`` and ``begin`` skip routers when no layer is
instruction-routed).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import Tensor

from .adapter import _LORA_KEY, RESERVED_METADATA, Adapter, AdapterError, _checked_tensor_dict, _short
from .config import ConfigError, LayerSpec, MoLEConfig, _show
from .layers import block_of
from .model import make_router

__all__ = ["ICEDIT_BASE", "ICEDIT_PROMPT", "convert_icedit", "is_icedit"]

ICEDIT_BASE = "flux.1-fill-dev"
# ICEdit's fixed instruction prefix (its training captions): the edit follows "but".
ICEDIT_PROMPT = (
    "A diptych with two side-by-side images of the same scene. "
    "On the right, the scene is exactly the same as on the left but "
)
_MODULE = r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*?"
_EXPERT = re.compile(rf"transformer\.({_MODULE})\.lora_(A|B)\.expert_(\d+)\.weight")
_ROUTE = re.compile(rf"transformer\.({_MODULE})\.lora_route\.weight")
# The instruction router nobody runs: every size at its minimum (see the module docstring).
_NO_ROUTER = {
    "text_dim": 1,
    "router_dim": 1,
    "router_heads": 1,
    "router_head_dim": 1,
    "router_depth": 1,
    "router_ff_mult": 1,
    "router_dropout": 0.0,
    "gate_noise": False,
}


def is_icedit(keys: Iterable[str]) -> bool:
    """Whether tensor names look like an ICEdit MoE-LoRA (any expert or route key)."""
    return any(_EXPERT.fullmatch(k) or _ROUTE.fullmatch(k) for k in keys if isinstance(k, str))


def _natural(name: str) -> tuple:
    """Sort key: double blocks, then single blocks, ``…blocks.2`` before ``…blocks.10``."""
    parts = tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))
    return (not name.startswith("transformer_blocks."), parts)


def convert_icedit(
    tensors: dict[str, Tensor],
    *,
    top_k: int = 1,
    metadata: dict[str, str] | None = None,
    source: str = "",
    base_model: str = ICEDIT_BASE,
) -> Adapter:
    """An ICEdit MoE-LoRA state dict as an InstructMoLE ``Adapter`` (exact: same formula).

    ``top_k``: experts per token (ICEdit's inference uses 1; its loader never reads another).
    Every tensor must be an expert, a route or a plain LoRA tensor; anything else, a missing
    partner or shapes that disagree is an ``AdapterError`` naming the tensor."""
    where = f"{source}: " if source else ""
    tensors = _checked_tensor_dict(tensors, where)
    experts: dict[str, dict[str, dict[int, Tensor]]] = {}
    routes: dict[str, Tensor] = {}
    lora: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in tensors.items():
        if m := _EXPERT.fullmatch(key):
            experts.setdefault(m.group(1), {"A": {}, "B": {}})[m.group(2)][int(m.group(3))] = value
        elif m := _ROUTE.fullmatch(key):
            routes[m.group(1)] = value
        elif _LORA_KEY.fullmatch(key):
            lora[key] = value
        else:
            unknown.append(key)
    if unknown:
        unknown.sort()
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise AdapterError(
            f"{where}tensor {_show(unknown[0], 120)}{more} is not part of an ICEdit MoE-LoRA, which holds only "
            "'transformer.<module>.lora_A.expert_<j>.weight', '.lora_B.expert_<j>.weight', '.lora_route.weight' "
            "and plain '.lora_A.weight'/'.lora_B.weight' tensors"
        )
    for module in sorted(set(experts) | set(routes)):
        if module not in routes:
            raise AdapterError(
                f"{where}the experts of {_show(module, 120)} have no 'transformer.{module}.lora_route.weight' to "
                "route them; the file is incomplete"
            )
        if module not in experts:
            raise AdapterError(
                f"{where}'transformer.{module}.lora_route.weight' routes no experts (no "
                f"'transformer.{module}.lora_A.expert_0.weight'); the file is incomplete"
            )
    if not routes:
        raise AdapterError(f"{where}the file holds no ICEdit experts (no '.lora_route.weight' tensor)")

    layers, mole = [], {}
    num_experts = rank = None
    for module in sorted(routes, key=_natural):
        route, bank = routes[module], experts[module]
        base = f"transformer.{module}"
        for kind, other in (("A", "B"), ("B", "A")):
            lonely = sorted(set(bank[kind]) - set(bank[other]))
            if lonely:
                raise AdapterError(
                    f"{where}'{base}.lora_{kind}.expert_{lonely[0]}.weight' has no matching "
                    f"'{base}.lora_{other}.expert_{lonely[0]}.weight'"
                )
        ids = sorted(bank["A"])
        if ids != list(range(len(ids))):
            missing = min(set(range(len(ids) + 1)) - set(ids))
            raise AdapterError(
                f"{where}{_show(module, 120)} has experts {ids[:8]} but lacks expert {missing}; experts must be "
                "numbered 0 to N-1"
            )
        n = len(ids)
        downs, ups = [bank["A"][j] for j in ids], [bank["B"][j] for j in ids]
        for j, (down, up) in enumerate(zip(downs, ups, strict=True)):
            if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
                raise AdapterError(
                    f"{where}expert {j} of {_show(module, 120)} has lora_A {tuple(down.shape)} and lora_B "
                    f"{tuple(up.shape)}; lora_A must be [rank, in] and lora_B [out, rank]"
                )
            if (down.shape, up.shape) != (downs[0].shape, ups[0].shape):
                raise AdapterError(
                    f"{where}the experts of {_show(module, 120)} differ in shape (expert 0: lora_A "
                    f"{tuple(downs[0].shape)}, expert {j}: {tuple(down.shape)}); every expert of a layer must match"
                )
        r, width_in, width_out = downs[0].shape[0], downs[0].shape[1], ups[0].shape[0]
        if route.ndim != 2 or tuple(route.shape) != (n, width_in):
            raise AdapterError(
                f"{where}'{base}.lora_route.weight' has shape {tuple(route.shape)} but {_show(module, 120)} has "
                f"{n} experts reading width {width_in}; it must be [{n}, {width_in}]"
            )
        if num_experts is None:
            num_experts, rank = n, r
        elif (n, r) != (num_experts, rank):
            raise AdapterError(
                f"{where}{_show(module, 120)} has {n} experts of rank {r} but earlier layers have {num_experts} of "
                f"rank {rank}; this converter needs one expert count and rank for the whole file"
            )
        for value in (*downs, *ups, route):
            if not value.is_floating_point():
                raise AdapterError(
                    f"{where}the experts of {_show(module, 120)} have dtype {value.dtype}; they must be floating point"
                )
        try:
            block_of(module)
            layers.append(LayerSpec(module, width_in, width_out, "token"))
        except (ConfigError, ValueError) as err:
            raise AdapterError(f"{where}ICEdit layer {_show(module, 120)} cannot be used: {_short(err)}") from None
        mole[f"mole.{module}.A"] = torch.stack([d.t() for d in downs])
        mole[f"mole.{module}.B"] = torch.stack([u.t() for u in ups])
        mole[f"mole.{module}.gate"] = route

    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise AdapterError(f"{where}top_k={_show(top_k)} must be an integer from 1 to the {num_experts} experts")
    try:
        config = MoLEConfig(
            layers=tuple(layers),
            num_experts=num_experts,
            top_k=top_k,
            rank=rank,
            alpha=float(rank),  # scale 1, as ICEdit applies its experts
            token_weights="renormalised",
            base_model=base_model,
            extra={"source": "icedit", "note": "ICEdit MoE-LoRA, token-routed, converted on load"},
            **_NO_ROUTER,
        )
    except ConfigError as err:
        raise AdapterError(f"{where}the ICEdit file does not make a valid adapter: {err}") from None
    dtype = mole[f"mole.{layers[0].name}.A"].dtype
    device = mole[f"mole.{layers[0].name}.A"].device
    with torch.device("meta"):
        router = make_router(config)
    for key, value in router.state_dict().items():
        mole[f"router.{key}"] = torch.zeros(value.shape, dtype=dtype, device=device)
    meta = {k: v for k, v in (metadata or {}).items() if k not in RESERVED_METADATA}
    meta["converted_from"] = "icedit"
    return Adapter.from_tensors(config, {**mole, **lora}, meta, source=source)
