"""The trainer places reference tokens exactly where ComfyUI's Kontext forward places them."""

from __future__ import annotations

import pytest
import torch

from instructmole.kontext import token_ids

from .comfy_tiny import comfy_flux_from_diffusers


@pytest.mark.parametrize(
    "target, references",
    [((8, 6), [(8, 6)]), ((8, 8), [(8, 8), (8, 8)]), ((6, 10), [(6, 10), (10, 4)]), ((8, 8), [(12, 4), (4, 4)])],
)
def test_token_ids_equal_comfyui_reference_latent_positions(target, references) -> None:
    from instructmole.tiny import tiny_flux

    flux = comfy_flux_from_diffusers(tiny_flux(0)).model.diffusion_model
    seen = {}

    def forward_orig(img, img_ids, *args, **kwargs):  # ComfyUI hands the finished ids to forward_orig
        seen["ids"] = img_ids
        return torch.zeros(img.shape[0], img.shape[1], 64)

    flux.forward_orig = forward_orig
    try:
        x = torch.zeros(1, 16, *target)
        refs = [torch.zeros(1, 16, *size) for size in references]
        flux._forward(x, torch.tensor([0.5]), torch.zeros(1, 4, 64), torch.zeros(1, 32), torch.tensor([1.0]), refs)
    finally:
        del flux.forward_orig
    assert torch.equal(seen["ids"][0].float(), token_ids(target, references))
