"""Training losses: load balancing over instance councils, and output-space orthogonality.

The orthogonality loss is computed in Gram form: with ``P_i = X A_i`` (tokens × r),
``vec(E_i) · vec(E_j) = Σ (P_iᵀ P_j) ⊙ (B_i B_jᵀ)``, so only ``X [A_1..A_n]`` is needed and the
``n × tokens × out`` stack of expert outputs is never built. ``orthogonality_loss_reference`` is
the materialised formula it is tested against.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["load_balancing_loss", "orthogonality_loss", "orthogonality_loss_reference"]


def load_balancing_loss(probs: Tensor, indices: Tensor) -> Tensor:
    """``N · Σ_i f_i p_i``, averaged over layers.

    ``probs``: router probabilities ``[b, n]`` or ``[b, layers, n]`` (tokens may stand in for
    instances: any leading axes before the layer axis are routed units). ``indices``: the chosen
    experts, same leading axes and ``k`` last. ``f_i`` is the share of the ``b·k`` routing slots
    that went to expert ``i`` and ``p_i`` its mean probability, so a perfectly balanced router
    scores exactly 1 and a collapsed one scores up to N.
    """
    if probs.ndim == 2:
        probs, indices = probs[:, None], indices[:, None]
    n = probs.shape[-1]
    probs = probs.reshape(-1, *probs.shape[-2:])  # [units, layers, n]
    indices = indices.reshape(-1, *indices.shape[-2:])  # [units, layers, k]
    counts = torch.zeros_like(probs).scatter_add_(-1, indices, torch.ones_like(indices, dtype=probs.dtype))
    f = counts.sum(0) / (indices.shape[0] * indices.shape[-1])  # [layers, n]
    p = probs.mean(0)  # [layers, n]
    return n * (f * p).sum(-1).mean()


def orthogonality_loss(proj: Tensor, B: Tensor, eps: float = 1e-12) -> Tensor:
    """``1/(N(N-1)) Σ_{i≠j} cos²(vec E_i, vec E_j)`` from ``proj = X A`` (``[..., n, r]``) and ``B [n, r, o]``.

    The LoRA scale multiplies every expert alike and cancels in the cosine, so it is left out.
    """
    n, r = proj.shape[-2:]
    p = proj.reshape(-1, n, r).float()
    b = B.float()
    ptp = torch.einsum("tir,tjs->ijrs", p, p)
    bbt = torch.einsum("iro,jso->ijrs", b, b)
    gram = (ptp * bbt).sum((-2, -1))  # [n, n]
    norms = gram.diagonal().clamp_min(eps).sqrt()  # clamp: B starts at 0, sqrt'(0) would be inf
    cos = gram / (norms[:, None] * norms[None, :])
    off = cos.pow(2).sum() - cos.diagonal().pow(2).sum()
    return off / (n * (n - 1))


def orthogonality_loss_reference(x: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """The same loss the obvious way: materialise every expert's output and take cosines."""
    xf = x.reshape(-1, x.shape[-1]).float()
    outs = torch.einsum("ti,nir,nro->nto", xf, A.float(), B.float()).reshape(A.shape[0], -1)
    unit = torch.nn.functional.normalize(outs, dim=-1)
    cos = unit @ unit.t()
    n = A.shape[0]
    return (cos.pow(2).sum() - cos.diagonal().pow(2).sum()) / (n * (n - 1))
