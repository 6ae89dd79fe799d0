"""Test helpers: a tiny Kontext-shaped diffusers Flux, Kontext inputs, a random adapter."""

from __future__ import annotations

import torch

import instructmole as im
from instructmole.tiny import kontext_inputs, tiny_mole_config


def randomize(adapter: im.Adapter, seed: int = 0, gate_std: float = 1.0, b_std: float = 0.1) -> im.Adapter:
    """Give a fresh adapter non-zero experts and decisive gates, so tests compare real numbers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter.model.named_layers():
            layer.B.copy_(torch.randn(layer.B.shape, generator=g) * b_std)
            layer.gate.weight.copy_(torch.randn(layer.gate.weight.shape, generator=g) * gate_std)
    return adapter


def flux_inputs(batch: int = 2, size: int = 4, text_len: int = 32, seed: int = 0) -> dict:
    """Kontext-style inputs for ``tiny_flux`` with random text features: target + reference tokens."""
    g = torch.Generator().manual_seed(seed)
    text, pooled = torch.randn(batch, text_len, 64, generator=g), torch.randn(batch, 32, generator=g)
    return kontext_inputs(text, pooled, size=size, seed=seed, guidance=3.5)


def random_adapter(transformer=None, seed: int = 1, **config) -> im.Adapter:
    """A random adapter for ``tiny_flux`` (or the given transformer) with non-trivial experts.

    Its ``A`` starts LoRA-style (``±1/√in``), not as the trainer's reference init (``±1/√r``, several
    times larger at the tiny widths): with ``randomize``'s B the expert terms then stay a perturbation
    of the tiny model, as the tolerances of the tests (fp8 requantization steps above all) assume."""
    torch.manual_seed(seed)
    return randomize(im.Adapter(im.InstructMoLE(tiny_mole_config(transformer, **config), init="lora")), seed=seed)
