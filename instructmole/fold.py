"""Fold one council into weight deltas, for merged inference (zero cost per step after the fold).

For a layer with council ``(j, w_j)``: ``ΔWᵀ = Σ_j w_j · scale · A_j B_j``, i.e. in ``nn.Linear``
layout (``[out, in]``) ``ΔW = up @ down`` with ``down = [A_j]ᵀ`` stacked (``[k·r, in]``) and
``up = [w_j · scale · B_jᵀ]`` (``[out, k·r]``). The factor form is what ComfyUI's LoRA patches take;
the product is what an in-place merge adds.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from .council import Council
from .model import InstructMoLE

__all__ = ["council_factors", "fold_council"]


def council_factors(A: Tensor, B: Tensor, indices: Tensor, weights: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``(down [k·r, in], up [out, k·r])`` of one layer's council (``indices``/``weights``: ``[k]``)."""
    down = rearrange(A[indices], "k i r -> (k r) i")
    up = rearrange(B[indices] * (weights * scale).to(B.dtype)[:, None, None], "k r o -> o (k r)")
    return down, up


def _single(council: Council) -> Council:
    if council.batch_size != 1:
        raise ValueError(
            f"merging folds one council into the weights, but this council has {council.batch_size} "
            "instances; pick one with council.row(i)"
        )
    return council


def fold_council(
    model: InstructMoLE, council: Council, *, factors: bool = False, dtype: torch.dtype = torch.float32
) -> dict[str, Tensor | tuple[Tensor, Tensor]]:
    """Per instruction-routed layer: ``ΔW [out, in]`` (or its ``(down, up)`` factors) for one council.

    Layers whose council is empty (e.g. scaled to 0) are left out.
    """
    council = _single(council)
    council.check_adapter(model.config.instruction_layers, model.config.num_experts, model.fingerprint())
    indices, weights = council.compact()
    out: dict[str, Tensor | tuple[Tensor, Tensor]] = {}
    scale = model.config.scale
    for row, name in enumerate(council.layers):
        w = weights[0, row]
        keep = w != 0
        if not keep.any():
            continue
        layer = model.layer(name)
        down, up = council_factors(
            layer.A.to(dtype),
            layer.B.to(dtype),
            indices[0, row][keep].to(layer.A.device),
            w[keep].to(layer.A.device),
            scale,
        )
        out[name] = (down, up) if factors else up @ down
    return out
