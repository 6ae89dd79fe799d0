"""Layer names: canonical (diffusers) module names and their ComfyUI/BFL counterparts.

Adapters always name layers the diffusers way (``transformer_blocks.3.ff.net.2``), because that is
how the reference checkpoints and every diffusers/peft Flux LoRA are keyed. ComfyUI's Flux fuses
some of those Linears (q/k/v into ``qkv``, single-block q/k/v + MLP-in into ``linear1``), so a
canonical layer maps onto a BFL module plus, where fused, a slice of its output rows.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "REFERENCE_LORA_TARGETS",
    "BflTarget",
    "block_of",
    "double_ff_out",
    "reference_targets",
    "rule_names",
    "single_proj_out",
    "to_bfl",
    "to_comfy_flux2",
]

_DOUBLE = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
_SINGLE = re.compile(r"^single_transformer_blocks\.(\d+)\.(.+)$")

# Unfused diffusers suffix -> BFL suffix, per block kind.
_DOUBLE_PLAIN = {
    "ff.net.2": "img_mlp.2",
    "ff.net.0.proj": "img_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
}
# Fused diffusers suffix -> (BFL suffix, slot index, slot count in units of hidden size).
_DOUBLE_FUSED = {
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
}
_SINGLE_PLAIN = {"proj_out": "linear2", "norm.linear": "modulation.lin"}
_SINGLE_FUSED = {"attn.to_q": 0, "attn.to_k": 1, "attn.to_v": 2}


# The reference recipe's plain-LoRA targets: module-name suffixes (peft matches a module whose name
# is, or ends with ".", one of them) on the image embedder and inside the Flux blocks.
REFERENCE_LORA_TARGETS = (
    "x_embedder",
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "norm1.linear",
    "norm.linear",
    "ff.net.0.proj",
    "proj_mlp",
)


def double_ff_out(n: int) -> str:
    """The image-stream feed-forward output of double block ``n`` (a reference MoLE target)."""
    return f"transformer_blocks.{n}.ff.net.2"


def single_proj_out(n: int) -> str:
    """The output projection of single block ``n`` (a reference MoLE target)."""
    return f"single_transformer_blocks.{n}.proj_out"


def reference_targets(num_double: int = 19, num_single: int = 38) -> list[str]:
    """The reference setup's MoLE layers, in model order (double blocks first)."""
    return [double_ff_out(n) for n in range(num_double)] + [single_proj_out(n) for n in range(num_single)]


def block_of(name: str) -> tuple[str, int]:
    """Which block a canonical layer lives in: ``("double", n)`` or ``("single", n)``."""
    if m := _DOUBLE.match(name):
        return "double", int(m.group(1))
    if m := _SINGLE.match(name):
        return "single", int(m.group(1))
    raise ValueError(
        f"layer {name!r} is not inside a transformer block; expected 'transformer_blocks.N.…' or "
        "'single_transformer_blocks.N.…'"
    )


def rule_names(layers: Sequence[str]) -> list[str]:
    """How people read and write each layer: the rule selector ``double:3`` / ``single:12``.

    One naming everywhere a person reads a layer (council summaries, maps, rule text, errors); the
    canonical name stays for files and hovers. A block holding more than one of ``layers`` keeps
    the canonical names of those layers, which rules accept as selectors too.
    """
    blocks = [block_of(name) for name in layers]
    short = [f"{kind}:{n}" for kind, n in blocks]
    return [s if short.count(s) == 1 else name for s, name in zip(short, layers, strict=True)]


@dataclass(frozen=True)
class BflTarget:
    """Where a canonical layer lives in a ComfyUI (BFL) Flux: module, and the output rows it owns."""

    module: str
    rows: tuple[int, int] | None = None  # (start, length) within a fused weight's output rows


def to_bfl(name: str, hidden_size: int, mlp_ratio: float = 4.0) -> BflTarget:
    """Map a canonical diffusers layer name onto ComfyUI's Flux module (and slice, when fused)."""
    mlp = int(hidden_size * mlp_ratio)
    if m := _DOUBLE.match(name):
        n, rest = m.groups()
        if rest in _DOUBLE_PLAIN:
            return BflTarget(f"double_blocks.{n}.{_DOUBLE_PLAIN[rest]}")
        if rest in _DOUBLE_FUSED:
            module, slot = _DOUBLE_FUSED[rest]
            return BflTarget(f"double_blocks.{n}.{module}", (slot * hidden_size, hidden_size))
    elif m := _SINGLE.match(name):
        n, rest = m.groups()
        if rest in _SINGLE_PLAIN:
            return BflTarget(f"single_blocks.{n}.{_SINGLE_PLAIN[rest]}")
        if rest in _SINGLE_FUSED:
            return BflTarget(f"single_blocks.{n}.linear1", (_SINGLE_FUSED[rest] * hidden_size, hidden_size))
        if rest == "proj_mlp":
            return BflTarget(f"single_blocks.{n}.linear1", (3 * hidden_size, mlp))
    raise ValueError(f"layer {name!r} has no ComfyUI Flux counterpart that InstructMoLE knows of")


# FLUX.2 (diffusers ``Flux2Transformer2DModel``) -> ComfyUI's Flux with global modulation. No
# per-block modulation Linears; the single block's fused input and output keep one name each.
_FLUX2_DOUBLE_PLAIN = {
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
}
_FLUX2_SINGLE_PLAIN = {"attn.to_out": "linear2", "attn.to_qkv_mlp_proj": "linear1"}


def to_comfy_flux2(name: str, hidden_size: int, _mlp_hidden: int = 0) -> BflTarget:
    """Map a canonical FLUX.2 diffusers layer name onto ComfyUI's module (and slice, when fused)."""
    if m := _DOUBLE.match(name):
        n, rest = m.groups()
        if rest in _FLUX2_DOUBLE_PLAIN:
            return BflTarget(f"double_blocks.{n}.{_FLUX2_DOUBLE_PLAIN[rest]}")
        if rest in _DOUBLE_FUSED:
            module, slot = _DOUBLE_FUSED[rest]
            return BflTarget(f"double_blocks.{n}.{module}", (slot * hidden_size, hidden_size))
    elif m := _SINGLE.match(name):
        n, rest = m.groups()
        if rest in _FLUX2_SINGLE_PLAIN:
            return BflTarget(f"single_blocks.{n}.{_FLUX2_SINGLE_PLAIN[rest]}")
    raise ValueError(f"layer {name!r} has no ComfyUI FLUX.2 counterpart that InstructMoLE knows of")
