"""FLUX.1 Kontext token layout: 2×2 packing of latents and the positions of reference tokens.

A Kontext forward sees the noisy target's tokens first and each reference image's tokens after
them. Positions (RoPE ids ``(index, row, col)`` in 2×2-patch units) must be the ones inference
uses, or an adapter trained here would see references where ComfyUI never puts them. ComfyUI's
default multi-reference method (``offset``, in ``comfy/ldm/flux/model.py``) gives every reference
index 1 and lays several references out side by side: a reference goes to the right of the
references so far when the accumulated canvas is taller than wide, and below them otherwise.
With one reference this is diffusers' Kontext layout (index 1, no offset).

Axis legend: b = batch, c = latent channels (16), h/w = latent height/width (pixels / 8).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from torch import Tensor

__all__ = ["FLUX_SCHEDULER", "pack", "reference_offsets", "resolution_shift", "token_ids", "unpack"]

# FLUX.1 [dev] / Kontext sampling schedule (diffusers' FlowMatchEulerDiscreteScheduler settings): the
# timestep shift mu grows linearly with the image's token count, 0.5 at 256 tokens to 1.15 at 4096.
FLUX_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def resolution_shift(tokens: int) -> float:
    """The schedule's shift mu for an image of ``tokens`` target tokens (FLUX's linear rule)."""
    c = FLUX_SCHEDULER
    slope = (c["max_shift"] - c["base_shift"]) / (c["max_image_seq_len"] - c["base_image_seq_len"])
    return tokens * slope + c["base_shift"] - slope * c["base_image_seq_len"]


def pack(latents: Tensor) -> Tensor:
    """``[b, c, h, w]`` latents -> ``[b, (h/2)·(w/2), c·4]`` tokens (h and w must be even)."""
    return rearrange(latents, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of ``pack`` for latents of ``height × width`` (latent pixels)."""
    return rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=height // 2, w=width // 2, ph=2, pw=2)


def reference_offsets(sizes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """``(row, col)`` offsets in latent pixels of each reference of latent size ``(h, w)``.

    ComfyUI's ``offset`` method: track the canvas ``(H, W)`` covered so far; a reference of
    size ``(h, w)`` goes right of it (col offset ``W``) when ``h + H > w + W``, else below it
    (row offset ``H``); the canvas then grows to cover it.
    """
    canvas_h = canvas_w = 0
    out = []
    for h, w in sizes:
        row = col = 0
        if h + canvas_h > w + canvas_w:
            col = canvas_w
        else:
            row = canvas_h
        canvas_h, canvas_w = max(canvas_h, h + row), max(canvas_w, w + col)
        out.append((row, col))
    return out


def _grid(index: float, height: int, width: int, row: int, col: int) -> Tensor:
    """Ids of one image of latent size ``height × width`` placed at latent offset ``(row, col)``."""
    h, w = (height + 1) // 2, (width + 1) // 2
    r0, c0 = (row + 1) // 2, (col + 1) // 2  # latent pixels -> patch units, rounded as ComfyUI does
    ids = torch.zeros(h, w, 3)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(r0, r0 + h, dtype=torch.float32)[:, None]
    ids[..., 2] = torch.arange(c0, c0 + w, dtype=torch.float32)[None, :]
    return ids.reshape(h * w, 3)


def token_ids(target: tuple[int, int], references: Sequence[tuple[int, int]] = ()) -> Tensor:
    """``[tokens, 3]`` position ids of the target (index 0) followed by every reference (index 1).

    ``target`` and ``references`` are latent sizes ``(h, w)``.
    """
    parts = [_grid(0, *target, 0, 0)]
    for (h, w), (row, col) in zip(references, reference_offsets(references), strict=True):
        parts.append(_grid(1, h, w, row, col))
    return torch.cat(parts)
