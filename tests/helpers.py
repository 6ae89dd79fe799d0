"""Test helpers: a tiny Kontext-shaped diffusers Flux, Kontext inputs, a random adapter."""

from __future__ import annotations

import torch

import instructmole as im
from instructmole.tiny import tiny_mole_config


def randomize(adapter: im.Adapter, seed: int = 0, gate_std: float = 1.0, b_std: float = 0.1) -> im.Adapter:
    """Give a fresh adapter non-zero experts and decisive gates, so tests compare real numbers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter.model.named_layers():
            layer.B.copy_(torch.randn(layer.B.shape, generator=g) * b_std)
            layer.gate.weight.copy_(torch.randn(layer.gate.weight.shape, generator=g) * gate_std)
    return adapter


def flux_inputs(batch: int = 2, size: int = 4, text_len: int = 32, seed: int = 0) -> dict:
    """Kontext-style inputs for ``tiny_flux``: target + reference tokens, ids with a reference index of 1."""
    g = torch.Generator().manual_seed(seed)
    n = size * size
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    target = torch.stack([torch.zeros(n), rows.flatten().float(), cols.flatten().float()], -1)
    reference = target.clone()
    reference[:, 0] = 1
    return {
        "hidden_states": torch.randn(batch, 2 * n, 64, generator=g),
        "encoder_hidden_states": torch.randn(batch, text_len, 64, generator=g),
        "pooled_projections": torch.randn(batch, 32, generator=g),
        "timestep": torch.full((batch,), 0.5),
        "img_ids": torch.cat([target, reference]),
        "txt_ids": torch.zeros(text_len, 3),
        "guidance": torch.full((batch,), 3.5),
        "return_dict": False,
    }


def random_adapter(transformer=None, seed: int = 1, **config) -> im.Adapter:
    """A random adapter for ``tiny_flux`` (or the given transformer) with non-trivial experts."""
    torch.manual_seed(seed)
    return randomize(im.Adapter(im.InstructMoLE(tiny_mole_config(transformer, **config))), seed=seed)
