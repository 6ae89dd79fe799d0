"""Kontext edits from cached features: the trainer's checkpoint samples and the demo's strip.

The text encoders are gone from memory during training, so samples start from the cached T5 and
CLIP features and the references' cached latents; the loop is FLUX's: Euler steps of the
flow-matching scheduler over ``sigmas = linspace(1, 1/steps)``, shifted by μ for the image's token
count (FLUX [dev] settings), the guidance embedding, reference tokens appended after the target's
at ComfyUI's positions. Whatever adapter is attached to the transformer takes part.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from instructmole.kontext import FLUX_SCHEDULER, pack, resolution_shift, token_ids, unpack

from .recipe import LatentNorm

__all__ = ["decode", "edit_latents", "flux_scheduler"]


def flux_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)


@torch.no_grad()
def edit_latents(
    transformer: torch.nn.Module,
    text: Tensor,
    pooled: Tensor,
    references: Sequence[Tensor],
    *,
    steps: int = 28,
    guidance: float = 2.5,
    seed: int = 0,
) -> Tensor:
    """Normalised target latents ``[b, 16, h, w]`` of the size of the first reference.

    ``text [b, L, d]``, ``pooled [b, p]``: the instruction's features; ``references``: normalised
    latents ``[b, 16, h, w]`` each.
    """
    param = next(transformer.parameters())
    device, dtype = param.device, param.dtype
    b, _, h, w = references[0].shape
    g = torch.Generator().manual_seed(seed)
    x = pack(torch.randn(b, 16, h, w, generator=g)).to(device, dtype)
    refs = torch.cat([pack(r.to(device, dtype)) for r in references], dim=1)
    ids = token_ids((h, w), [tuple(r.shape[-2:]) for r in references]).to(device)
    scheduler = flux_scheduler()
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=resolution_shift(x.shape[1]), device=device)
    for t in scheduler.timesteps:
        out = transformer(
            hidden_states=torch.cat([x, refs], dim=1),
            encoder_hidden_states=text.to(device, dtype),
            pooled_projections=pooled.to(device, dtype),
            timestep=(t / 1000).expand(b).to(dtype),
            img_ids=ids,
            txt_ids=torch.zeros(text.shape[1], 3, device=device),
            guidance=torch.full((b,), guidance, device=device, dtype=dtype),
            return_dict=False,
        )[0]
        x = scheduler.step(out[:, : x.shape[1]], t, x, return_dict=False)[0]
    return unpack(x.float(), h, w)


@torch.no_grad()
def decode(vae: torch.nn.Module, latents: Tensor, norm: LatentNorm) -> Tensor:
    """Images ``[b, 3, H, W]`` in [0, 1] from normalised latents."""
    z = latents / norm.scale + norm.shift
    images = vae.decode(z.to(vae.device, vae.dtype)).sample
    return (images.float().clamp(-1, 1) + 1) / 2
