"""The expert bank of one MoLE layer and its forward paths, all batched over experts.

Axis legend: b = instances (batch rows), t = tokens, i = in_features, o = out_features,
n = experts, k = council slots, r = rank.

A bank holds A as one ``n × i × r`` tensor and B as one ``n × r × o`` tensor. Each path adds
``Σ_j w_j · scale · x A_j B_j`` to a frozen Linear's output; they differ in what they compute:

* ``council_delta`` — inference: per instance only its k council members, gathered and
  concatenated into one rank ``k·r`` product per row (the 1.03× path);
* ``council_delta_with_projections`` — training: ``P = x [A_1..A_n]`` once, which feeds both the
  council output and the Gram-form orthogonality loss, never the ``n × t × o`` stack;
* ``token_delta`` — per-token top-k routing for layers configured so: tokens grouped by expert,
  each group multiplied by its own expert only (``…_with_projections`` for training, which needs
  every expert's projection anyway);
* ``dense_delta`` — every expert materialised, weighted; the plain formula tests compare against.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

ExpertInit = Literal["reference", "lora"]

__all__ = [
    "ExpertInit",
    "MoLELayer",
    "council_delta",
    "council_delta_with_projections",
    "dense_delta",
    "token_delta",
    "token_delta_with_projections",
    "token_route",
]


def _flat(x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """View ``x`` as ``[b, t, i]`` (tokens may be several axes, or none)."""
    shape = x.shape
    return x.reshape(shape[0], -1, shape[-1]), shape


def council_delta(x: Tensor, A: Tensor, B: Tensor, indices: Tensor, weights: Tensor, scale: float) -> Tensor:
    """Council path: ``Σ_j w_j · scale · x A_j B_j`` with only the chosen experts computed.

    ``indices``/``weights``: ``[b, k]`` (a council per row) or ``[k]`` (one council for all rows,
    which turns the gathers into one shared rank-``k·r`` matrix pair). Zero-weight slots (padding
    of councils of uneven size) contribute exactly nothing.
    """
    xf, shape = _flat(x)
    w = (weights * scale).to(B.dtype)
    if indices.ndim == 1:
        down = rearrange(A[indices], "k i r -> i (k r)")
        up = rearrange(B[indices] * w[:, None, None], "k r o -> (k r) o")
        out = (xf @ down) @ up
    else:
        down = rearrange(A[indices], "b k i r -> b i (k r)")
        up = rearrange(B[indices] * w[..., None, None], "b k r o -> b (k r) o")
        out = torch.bmm(torch.bmm(xf, down), up)
    return out.reshape(*shape[:-1], B.shape[-1])


def council_delta_with_projections(
    x: Tensor, A: Tensor, B: Tensor, indices: Tensor, weights: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """Training path: the council output plus ``P = x [A_1..A_n]`` (``[b, t, n, r]``) for the Gram loss.

    Gradients reach every expert's A through P (the orthogonality loss needs them) while the
    output only ever multiplies the chosen experts' B.
    """
    xf, shape = _flat(x)
    n, _, r = A.shape
    proj = rearrange(xf @ rearrange(A, "n i r -> i (n r)"), "b t (n r) -> b t n r", n=n)
    k = indices.shape[-1]
    chosen = torch.gather(proj, 2, indices[:, None, :, None].expand(-1, proj.shape[1], k, r))
    up = rearrange(B[indices] * (weights * scale).to(B.dtype)[..., None, None], "b k r o -> b (k r) o")
    out = torch.bmm(rearrange(chosen, "b t k r -> b t (k r)"), up)
    return out.reshape(*shape[:-1], B.shape[-1]), proj


def dense_delta(x: Tensor, A: Tensor, B: Tensor, weights: Tensor, scale: float) -> Tensor:
    """Reference formula: all ``n`` expert outputs materialised, then mixed by ``weights [b, n]``."""
    xf, shape = _flat(x)
    stack = torch.einsum("bti,nir,nro->bnto", xf, A, B) * scale
    out = torch.einsum("bnto,bn->bto", stack, weights.to(stack.dtype))
    return out.reshape(*shape[:-1], B.shape[-1])


def token_route(
    x: Tensor,
    gate: Tensor,
    top_k: int,
    noise_std: float = 0.0,
    noise: Tensor | None = None,
    renormalise: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token gates: ``(probs [b, t, n], indices [b, t, k], weights [b, t, k])``.

    ``weights``: the top-k of the softmax over all ``n`` experts (unnormalised top-k), or with
    ``renormalise`` the softmax over the ``k`` selected logits only (they sum to 1; ICEdit's
    MoE-LoRA). ``probs`` is the softmax over all experts either way (the load-balancing loss
    reads it). ``noise`` (standard normal, ``[b, t, n]``): the draw to scale by ``noise_std``
    instead of drawing one.
    """
    xf, _ = _flat(x)
    logits = (xf @ gate.t().to(xf.dtype)).float()
    if noise_std > 0:
        draw = torch.randn_like(logits) if noise is None else noise.to(logits)
        logits = logits + draw * noise_std
    probs = logits.softmax(-1)
    if renormalise:
        chosen, indices = logits.topk(top_k, dim=-1)
        weights = chosen.softmax(-1)
    else:
        weights, indices = probs.topk(top_k, dim=-1)
    return probs, indices, weights


def token_delta(x: Tensor, A: Tensor, B: Tensor, indices: Tensor, weights: Tensor, scale: float) -> Tensor:
    """Token-routed experts: each token mixes its own top-k (``indices``/``weights``: ``[b, t, k]``).

    When each token uses at most a quarter of the experts (ICEdit: 1 of 4), the tokens are grouped
    by expert and every group meets only its own expert's ``A`` and ``B``: the down-projection, the
    bulk of the work (``in`` is 4-5× ``out`` on FLUX's routed layers), costs ``k/n`` of computing
    every expert's. With a larger share the saving no longer pays for gathering the input ``k``
    times (measured on CPU, ``benchmarks/icedit.py``), so the masked all-experts path runs.
    """
    if 4 * indices.shape[-1] > A.shape[0]:
        return token_delta_with_projections(x, A, B, indices, weights, scale)[0]
    xf, shape = _flat(x)
    rows = xf.reshape(-1, xf.shape[-1])
    chosen, mix = indices.reshape(rows.shape[0], -1), (weights * scale).reshape(rows.shape[0], -1).to(B.dtype)
    experts = torch.arange(A.shape[0], device=chosen.device)
    out = None
    for slot in range(chosen.shape[1]):  # slot by slot: one gathered copy of the input, never k
        order = chosen[:, slot].argsort(stable=True)
        ends = torch.searchsorted(chosen[order, slot], experts, right=True)  # where each expert's group ends
        up = _through_own_experts(rows.index_select(0, order), A, B, ends, mix[order, slot])
        part = torch.empty_like(up).index_copy_(0, order, up)  # back to token order
        out = part if out is None else out + part  # a fixed order over slots: deterministic
    return out.reshape(*shape[:-1], B.shape[-1])


def _through_own_experts(rows: Tensor, A: Tensor, B: Tensor, ends: Tensor, mix: Tensor) -> Tensor:
    """Rows in consecutive groups (group ``j`` ends at ``ends[j]``), each through its own expert:
    ``(rows A_j · mix) B_j``.

    torch's grouped GEMM (``F.grouped_mm``: CPU, or bf16 on CUDA from sm80, 16-byte strides) runs
    all groups of a projection in one kernel without reading the group sizes back to the host;
    elsewhere one pair of matmuls per expert, which needs the sizes on the host (one device sync).
    """
    rank_aligned = A.shape[-1] * A.element_size() % 16 == 0  # the rows of the intermediate ``rows A_j``
    if rank_aligned and _grouped_gemm_fits(rows, A) and _grouped_gemm_fits(rows, B):
        offs = ends.to(torch.int32)
        try:
            return F.grouped_mm(F.grouped_mm(rows, A, offs=offs) * mix[:, None], B, offs=offs)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as err:  # a build whose kernel refuses this layout: the loop is exact too
            warnings.warn(f"InstructMoLE: torch's grouped GEMM failed ({err}); one matmul per expert", stacklevel=2)
    counts = torch.diff(ends, prepend=ends.new_zeros(1)).tolist()
    groups = zip(rows.split(counts), mix.split(counts), A, B, strict=True)
    return torch.cat([(part @ a * m[:, None]) @ b for part, m, a, b in groups])


def _grouped_gemm_fits(a: Tensor, b: Tensor) -> bool:
    if not hasattr(F, "grouped_mm") or a.dtype != b.dtype:
        return False
    if torch.compiler.is_compiling() and a.dtype != torch.bfloat16:  # the traced kernel takes bf16 only
        return False
    if a.device.type == "cpu":
        kernel = a.dtype in (torch.float32, torch.float16, torch.bfloat16)
    elif a.device.type == "cuda":
        kernel = a.dtype == torch.bfloat16 and torch.cuda.get_device_capability(a.device) >= (8, 0)
    else:
        kernel = False
    size = a.element_size()
    return kernel and all(s * size % 16 == 0 for s in (*a.stride()[:-1], *b.stride()[:-1]))


def token_delta_with_projections(
    x: Tensor, A: Tensor, B: Tensor, indices: Tensor, weights: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """``token_delta`` plus the projections ``P = x [A_1..A_n]`` (``[b, t, n, r]``) for the Gram loss."""
    xf, shape = _flat(x)
    n = A.shape[0]
    proj = rearrange(xf @ rearrange(A, "n i r -> i (n r)"), "b t (n r) -> b t n r", n=n)
    mix = torch.zeros(*indices.shape[:2], n, dtype=proj.dtype, device=proj.device)
    mix = mix.scatter(-1, indices, (weights * scale).to(proj.dtype))
    out = rearrange(proj * mix[..., None], "b t n r -> b t (n r)") @ rearrange(B, "n r o -> (n r) o")
    return out.reshape(*shape[:-1], B.shape[-1]), proj


class MoLELayer(nn.Module):
    """Experts and gate of one target Linear; the Linear itself stays untouched elsewhere.

    ``gate`` reads the instruction signal (instruction routing) or the layer input (token
    routing). ``B`` starts at zero, so a fresh adapter leaves the base model's output unchanged.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        num_experts: int,
        rank: int,
        gate_in: int,
        init: ExpertInit = "reference",
    ) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(num_experts, in_features, rank))
        self.B = nn.Parameter(torch.zeros(num_experts, rank, out_features))
        self.gate = nn.Linear(gate_in, num_experts, bias=False)
        self.reset_parameters(init)

    def reset_parameters(self, init: ExpertInit = "reference") -> None:
        """A uniform in ``±1/√fan_in``, B zero, the gate as torch's ``nn.Linear`` (``±1/√gate_in``).

        ``"reference"``: the reference stores each ``A`` as ``in × r`` and applies
        ``kaiming_uniform_(a=√5)``, whose fan-in is then the rank: bound ``1/√r`` (std 0.102 at
        r = 32). ``"lora"``: a LoRA's ``A`` (``r × in``, fan-in ``in``): bound ``1/√in``, ≈20× smaller
        on FLUX's routed layers, so the expert term grows ≈10× slower early in training. The gate
        is the reference's plain Linear either way (std 0.021 over 768 instruction features,
        0.0052 over a 12288-wide token-routed input).
        """
        if init not in ("reference", "lora"):
            raise ValueError(f"expert init {init!r} is not 'reference' or 'lora'")
        bound = 1.0 / math.sqrt(self.A.shape[2] if init == "reference" else self.A.shape[1])
        nn.init.uniform_(self.A, -bound, bound)
        nn.init.zeros_(self.B)
        self.gate.reset_parameters()

    @property
    def num_experts(self) -> int:
        return self.A.shape[0]

    @property
    def rank(self) -> int:
        return self.A.shape[2]
