"""Instruction-Guided Routing: from an instruction's text features to one council per instance.

Axis legend: b = instances, t = text tokens, l = latent queries (one), d = router width,
h = heads, n = experts, L = instruction-routed layers.

    X~  = H W_in                                       (text_dim -> d)
    L_s = L_{s-1} + Attn(q = L_{s-1}, kv = [X~ ; L_{s-1}]);  L_s += FF(L_s)      (s = 1..depth)
    Z   = LayerNorm(L_S W_out) (+ dropout in training) + P                       (d)
    p_l = softmax(G_l Z (+ noise of std 1/N in training)),  council_l = top-k(p_l)

FLUX.1 (``pool="clip"``): H are the T5 token features, P the CLIP-L pooled vector, and every token
is attended (the reference trained on T5 padded to 512 without a mask). Models without a pooled
vector (``pool="text"``: FLUX.2, Qwen-Image) route from the instruction alone: a mask ``m`` marks
its tokens (the chat template and the padding are 0), the attention reads only those (and the
latent), and the text adapter stands in for CLIP:

    P = W_p · LayerNorm-mean + b_p,   LayerNorm-mean = Σ_t m_t LN(h_t) / max(1, Σ_t m_t)

(LN per token first: LLM hidden states carry a few huge activations that would swamp a mean.)

Module names follow the reference layout (``latents``, ``proj_in``, ``layers.{s}.0.{norm1,norm2,
to_q,to_kv,to_out}``, ``layers.{s}.1.{0,1,3}``, ``proj_out``, ``norm_out``) so importing a reference
checkpoint is a key-for-key copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

__all__ = ["PerceiverAttention", "PerceiverResampler", "route_instances"]


class PerceiverAttention(nn.Module):
    """Latent queries attend to the text tokens and to themselves (flamingo-style)."""

    def __init__(self, *, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)  # text side
        self.norm2 = nn.LayerNorm(dim)  # latent side
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, text: Tensor, latents: Tensor, mask: Tensor | None = None) -> Tensor:
        """``mask [b, t]`` (bool): the text tokens to read; the latents are always read."""
        text, latents = self.norm1(text), self.norm2(latents)
        q = rearrange(self.to_q(latents), "b l (h e) -> b h l e", h=self.heads)
        k, v = rearrange(
            self.to_kv(torch.cat([text, latents], dim=1)), "b t (two h e) -> two b h t e", two=2, h=self.heads
        )
        attend = None
        if mask is not None:
            attend = torch.cat([mask.bool(), mask.new_ones(mask.shape[0], latents.shape[1], dtype=torch.bool)], 1)
            attend = rearrange(attend, "b t -> b 1 1 t")
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend)
        return self.to_out(rearrange(out, "b h l e -> b l (h e)"))


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(), nn.Linear(dim * mult, dim, bias=False)
    )


class PerceiverResampler(nn.Module):
    """Distils the text tokens into one instruction vector, then adds the pooled vector (``pool``:
    CLIP's, given; or the text adapter's, computed from the masked tokens)."""

    def __init__(
        self,
        *,
        text_dim: int,
        dim: int,
        depth: int,
        heads: int,
        head_dim: int,
        ff_mult: int,
        dropout: float = 0.0,
        pool: str = "clip",
    ) -> None:
        super().__init__()
        self.pool = pool
        self.latents = nn.Parameter(torch.randn(1, 1, dim) / dim**0.5)
        self.proj_in = nn.Linear(text_dim, dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim=dim, heads=heads, head_dim=head_dim), _feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(dim, dim)
        self.norm_out = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        if pool == "text":
            self.pool_norm = nn.LayerNorm(text_dim)
            self.pool_proj = nn.Linear(text_dim, dim)

    def text_pooled(self, text: Tensor, mask: Tensor | None) -> Tensor:
        """The text adapter: the projected mean of the LayerNorm'd instruction tokens (0 for none)."""
        normed = self.pool_norm(text)
        if mask is None:
            mean = normed.mean(1)
        else:
            weight = mask.to(normed.dtype).unsqueeze(-1)
            mean = (normed * weight).sum(1) / weight.sum(1).clamp(min=1)
        return self.pool_proj(mean)

    def forward(
        self, text: Tensor, pooled: Tensor | None, keep: Tensor | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """``text [b, t, text_dim]`` (the text features), ``pooled [b, d]`` (CLIP-L pooled; None for
        ``pool="text"``) -> ``Z [b, d]``. ``mask [b, t]`` (bool): the instruction's tokens (None: all).

        ``keep [b, d]`` (0/1), in training only: the dropout mask to use instead of drawing one, so
        that a trainer can make every random draw a function of the sample (exact resume, and
        the same result on one process or many).
        """
        if self.pool == "text":
            pooled = self.text_pooled(text, mask)
        x = self.proj_in(text)
        latents = repeat(self.latents, "1 l d -> b l d", b=x.shape[0])
        for attn, ff in self.layers:
            latents = latents + attn(x, latents, mask)
            latents = latents + ff(latents)
        z = self.norm_out(self.proj_out(latents))[:, 0]
        if keep is not None and self.training and self.dropout.p > 0:
            z = z * keep.to(z.dtype) / (1 - self.dropout.p)
        else:
            z = self.dropout(z)
        return z + pooled.to(z.dtype)


def route_instances(
    signal: Tensor, gates: Tensor, top_k: int, noise_std: float = 0.0, noise: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """All layers' councils at once: ``(probs [b, L, n], indices [b, L, k], weights [b, L, k])``.

    ``gates``: the stacked per-layer gate weights ``[L, n, d]``. Weights are the top-k
    probabilities themselves, not renormalised (as trained). ``noise`` (standard normal,
    ``[b, L, n]``): the draw to scale by ``noise_std`` instead of drawing one.
    """
    logits = torch.einsum("bd,lnd->bln", signal.float(), gates.float())
    if noise_std > 0:
        draw = torch.randn_like(logits) if noise is None else noise.to(logits)
        logits = logits + draw * noise_std
    probs = logits.softmax(-1)
    weights, indices = probs.topk(top_k, dim=-1)
    return probs, indices, weights
