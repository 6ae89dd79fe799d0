"""Training losses: load balancing over councils, and output-space orthogonality.

Both are written as functions of *sums over routed units* (instances or tokens) so that a
multi-process run can add the sums of every process first and then apply the formula: the loss
is then the loss of the global batch, exactly, instead of an average of per-process losses.

Orthogonality in Gram form: with ``P = X [A_1..A_n]`` (tokens × n·r) and ``B`` stacked as
``n·r × out``, ``vec(E_i) · vec(E_j) = Σ_rs (PᵀP)_{ir,js} (B Bᵀ)_{ir,js}``; ``PᵀP`` is a sum over
tokens, and the ``n × tokens × out`` stack of expert outputs is never built.
``orthogonality_loss_reference`` is the materialised formula the tests compare against.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

__all__ = [
    "balance_statistics",
    "load_balancing_from_statistics",
    "load_balancing_loss",
    "orthogonality_from_gram",
    "orthogonality_loss",
    "orthogonality_loss_reference",
    "projection_gram",
]


def balance_statistics(probs: Tensor, indices: Tensor) -> tuple[Tensor, Tensor, int]:
    """``(prob_sum [L, n], slot_counts [L, n], units)`` of one batch's routing.

    ``probs``: ``[..., L, n]`` (any leading axes are routed units: instances, or instances × tokens);
    ``indices``: the chosen experts, ``[..., L, k]``. ``[units, n]`` / ``[units, k]`` mean one layer.
    """
    if probs.ndim == 2:
        probs, indices = probs[:, None], indices[:, None]
    probs = probs.reshape(-1, *probs.shape[-2:]).float()
    indices = indices.reshape(-1, *indices.shape[-2:])
    counts = torch.zeros_like(probs).scatter_add_(-1, indices, torch.ones_like(indices, dtype=probs.dtype))
    return probs.sum(0), counts.sum(0).detach(), probs.shape[0]


def load_balancing_from_statistics(
    prob_sum: Tensor, counts: Tensor, units: int | Tensor, prob_units: float | Tensor | None = None
) -> Tensor:
    """Per layer ``N · Σ_i f_i p_i`` (``[L]``), the recipe's formula.

    ``f_i = counts_i / units``: the share of routed units whose top-k holds expert ``i`` (so
    ``Σ_i f_i = k``); ``p_i = prob_sum_i / prob_units`` (default ``units``): the mean probability.
    Balanced routing scores ``k``, routing collapsed onto one council scores ``N``.

    ``prob_units`` apart from ``units`` serves gradient accumulation: ``counts``/``units`` of the
    whole optimizer step and ``prob_sum`` of one micro-batch, with ``prob_units = units / M`` for
    ``M`` micro-batches, give terms whose mean over the step (what accumulation takes) is the
    step's ``N · Σ_i f_i p_i`` exactly, in value and gradient (``f`` carries no gradient).
    """
    n = prob_sum.shape[-1]
    f = counts / units
    p = prob_sum / (units if prob_units is None else prob_units)
    return n * (f * p).sum(-1)


def load_balancing_loss(probs: Tensor, indices: Tensor) -> Tensor:
    """``N · Σ_i f_i p_i`` of one batch, averaged over layers (see ``balance_statistics`` for shapes)."""
    prob_sum, counts, units = balance_statistics(probs, indices)
    return load_balancing_from_statistics(prob_sum, counts, units).mean()


def projection_gram(proj: Tensor) -> Tensor:
    """``PᵀP`` (``[n·r, n·r]``, fp32) of the expert projections ``proj = X A`` (``[..., n, r]``)."""
    p = rearrange(proj, "... n r -> (...) (n r)").float()
    with torch.autocast(p.device.type, enabled=False):
        return p.t() @ p


def orthogonality_from_gram(gram: Tensor, B: Tensor, eps: float = 1e-12) -> Tensor:
    """``1/(N(N-1)) Σ_{i≠j} cos²(vec E_i, vec E_j)`` from ``projection_gram`` and ``B [n, r, o]``.

    The LoRA scale multiplies every expert alike and cancels in the cosine, so it is left out.
    """
    n, r, _ = B.shape
    with torch.autocast(gram.device.type, enabled=False):
        b = rearrange(B.float(), "n r o -> (n r) o")
        inner = rearrange(gram.float() * (b @ b.t()), "(i r) (j s) -> i j r s", r=r, s=r).sum((-2, -1))
        norms = inner.diagonal().clamp_min(eps).sqrt()  # clamp: B starts at 0, sqrt'(0) would be inf
        cos = inner / (norms[:, None] * norms[None, :])
        off = cos.pow(2).sum() - cos.diagonal().pow(2).sum()
    return off / (n * (n - 1))


def orthogonality_loss(proj: Tensor, B: Tensor, eps: float = 1e-12) -> Tensor:
    """Orthogonality of one batch from ``proj = X A`` (``[..., n, r]``) and ``B [n, r, o]``."""
    return orthogonality_from_gram(projection_gram(proj), B, eps)


def orthogonality_loss_reference(x: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """The same loss the obvious way: materialise every expert's output and take cosines."""
    xf = x.reshape(-1, x.shape[-1]).float()
    outs = torch.einsum("ti,nir,nro->nto", xf, A.float(), B.float()).reshape(A.shape[0], -1)
    unit = torch.nn.functional.normalize(outs, dim=-1)
    cos = unit @ unit.t()
    n = A.shape[0]
    return (cos.pow(2).sum() - cos.diagonal().pow(2).sum()) / (n * (n - 1))
