"""Fold one council into weight deltas, for merged inference (zero cost per step after the fold).

For a layer with council ``(j, w_j)``: ``ΔWᵀ = Σ_j w_j · scale · A_j B_j``, i.e. in ``nn.Linear``
layout (``[out, in]``) ``ΔW = up @ down`` with ``down = [A_j]ᵀ`` stacked (``[k·r, in]``) and
``up = [w_j · scale · B_jᵀ]`` (``[out, k·r]``). The factor form is what ComfyUI's LoRA patches take;
the product is what an in-place merge adds.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from einops import rearrange
from torch import Tensor

from .council import Council
from .model import InstructMoLE

__all__ = ["council_factors", "fold_council", "iter_fold"]


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


def iter_fold(
    model: InstructMoLE, council: Council, *, factors: bool = False, dtype: torch.dtype = torch.float32
) -> Iterator[tuple[str, Tensor | tuple[Tensor, Tensor]]]:
    """Per instruction-routed layer, one at a time: ``ΔW [out, in]`` (or its ``(down, up)`` factors).

    One layer at a time, so that a caller merging into full-size weights never holds every layer's
    ΔW at once (about 10 GB in fp32 for FLUX.1). Layers whose council is empty are skipped.
    """
    council = _single(council)
    council.check_adapter(model.config.instruction_layers, model.config.num_experts, model.fingerprint())
    indices, weights = council.compact()
    scale = model.config.scale
    for row, name in enumerate(council.layers):
        w = weights[0, row]
        keep = w != 0
        if not keep.any():
            continue
        layer = model.layer(name)
        device = layer.A.device
        down, up = council_factors(
            layer.A.to(dtype), layer.B.to(dtype), indices[0, row][keep].to(device), w[keep].to(device), scale
        )
        yield name, ((down, up) if factors else up @ down)


def fold_council(
    model: InstructMoLE, council: Council, *, factors: bool = False, dtype: torch.dtype = torch.float32
) -> dict[str, Tensor | tuple[Tensor, Tensor]]:
    """``iter_fold`` collected into a dict (fine for factors; for full ΔW prefer iterating)."""
    return dict(iter_fold(model, council, factors=factors, dtype=dtype))
