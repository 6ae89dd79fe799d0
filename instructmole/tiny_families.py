"""Tiny random transformers of the families beyond FLUX.1: Qwen-Image-Edit-2511 and FLUX.2 Klein.

Why: no weights can be downloaded, and the exactness claims (dynamic = fixed = merged, the same
routing in diffusers, ComfyUI and the trainer) must hold for each family's own module tree, fused
layers and token layout. These are the released architectures with small widths (hidden 32, two
heads of 16) and few blocks; the text widths are small too, so an adapter trained on them records
the family but not its real widths (``families.family_of`` lists no released model for them).
diffusers is imported lazily.
"""

from __future__ import annotations

from typing import Any

import torch

from .config import LayerSpec, MoLEConfig
from .families import architecture_of, reference_layers
from .tiny import random_model

__all__ = [
    "TINY_FLUX2",
    "TINY_QWEN_IMAGE",
    "flux2_edit_inputs",
    "qwen_edit_inputs",
    "tiny_family_config",
    "tiny_flux2",
    "tiny_qwen_image",
]

# Qwen-Image-Edit-2511 in small: 2 dual-stream blocks, hidden 32, text width 48, reference tokens
# modulated with t = 0 (``zero_cond_t``, 2511's switch).
TINY_QWEN_IMAGE: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 48,
    "axes_dims_rope": (4, 6, 6),
    "zero_cond_t": True,
}

# FLUX.2 [klein] in small: 2 double + 2 single blocks, hidden 32, text width 96 (Klein stacks three
# LLM layers: 3 x 32), the released timestep embedding width, no guidance embedder (Klein is sampled
# with CFG), 4 rope axes.
TINY_FLUX2: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 128,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 96,
    "timestep_guidance_channels": 256,  # as released; ComfyUI's Flux embeds the timestep in 256 channels
    "mlp_ratio": 3.0,
    "axes_dims_rope": (4, 4, 4, 4),
    "guidance_embeds": False,
}

_BASE_MODEL = {"qwen_image": "qwen-image-edit-2511", "flux2": "flux.2-klein-4b"}


def tiny_qwen_image(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    """A random diffusers ``QwenImageTransformer2DModel`` shaped like Qwen-Image-Edit-2511, tiny."""
    from diffusers import QwenImageTransformer2DModel

    return random_model(QwenImageTransformer2DModel, {**TINY_QWEN_IMAGE, **overrides}, seed, dtype)


def tiny_flux2(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    """A random diffusers ``Flux2Transformer2DModel`` shaped like FLUX.2 [klein], tiny."""
    from diffusers import Flux2Transformer2DModel

    return random_model(Flux2Transformer2DModel, {**TINY_FLUX2, **overrides}, seed, dtype)


def tiny_family_config(transformer: Any, **overrides: Any) -> MoLEConfig:
    """A MoLE config for a tiny transformer of any family: the reference layers (widths read from
    the model), a small router that routes from the text alone where the family has no pooled
    vector, and the family recorded (``base_model``; override it to test refusals)."""
    arch = architecture_of(transformer)
    if arch is None:
        raise ValueError(f"{type(transformer).__name__} is not a transformer of a family InstructMoLE knows")
    layers = []
    for name in reference_layers(transformer):
        linear = transformer.get_submodule(name)
        layers.append(LayerSpec(name, linear.in_features, linear.out_features))
    text = transformer.get_submodule(arch.inputs["diffusers"].text).in_features
    settings: dict[str, Any] = {
        "num_experts": 4,
        "top_k": 2,
        "rank": 4,
        "alpha": 8.0,
        "text_dim": text,
        "router_dim": 32,
        "router_heads": 2,
        "router_head_dim": 8,
        "router_pool": arch.router_pool,
        "base_model": _BASE_MODEL.get(arch.key, "flux.1-kontext-dev"),
    }
    return MoLEConfig(layers=tuple(layers), **{**settings, **overrides})


def qwen_edit_inputs(
    text: torch.Tensor,
    mask: torch.Tensor | None,
    size: int = 4,
    seed: int = 0,
    channels: int = TINY_QWEN_IMAGE["in_channels"],
) -> dict:
    """The forward kwargs of ``QwenImageTransformer2DModel`` as Qwen-Image-Edit-2511's pipeline
    (``QwenImageEditPlusPipeline``) gives them with one reference image.

    Why this layout: the edit pipeline appends the packed reference latents to the packed target in
    ``hidden_states`` and lists, per row, the target's and then each reference's ``(frame, height,
    width)`` token grid in ``img_shapes``; the model reads that list for RoPE (each image its own
    frame index) and, with ``zero_cond_t`` (2511), to modulate every token after the first grid with
    t = 0. So the layout decides which tokens an expert term touches at which timestep, and a test of
    another layout would test another model. ``text [b, t, joint_attention_dim]``: the VL encoder's
    features after the pipeline dropped the system prompt (they still hold the image placeholder
    and the chat template around the instruction); ``mask [b, t]``: their padding mask, passed on
    as the pipeline passes it (0/1 integers, or None where no row has padding). ``size``: target
    and reference are ``size x size`` packed tokens (2x2 latent patches of ``channels / 4`` VAE
    channels); ``timestep`` is the pipeline's ``t / 1000`` (0.5).
    """
    g = torch.Generator().manual_seed(seed)
    b, n = text.shape[0], size * size
    if mask is not None:
        mask = None if bool(mask.bool().all()) else mask.long()
    return {
        "hidden_states": torch.randn(b, 2 * n, channels, generator=g),
        "encoder_hidden_states": text,
        "encoder_hidden_states_mask": mask,
        "timestep": torch.full((b,), 0.5),
        "img_shapes": [[(1, size, size), (1, size, size)] for _ in range(b)],
        "return_dict": False,
    }


def _flux2_ids(t: int, size: int) -> torch.Tensor:
    """(T, H, W, L) ids of a ``size x size`` grid at time coordinate ``t``, row-major like the packing."""
    return torch.cartesian_prod(torch.tensor([t]), torch.arange(size), torch.arange(size), torch.arange(1))


def flux2_edit_inputs(
    text: torch.Tensor, size: int = 4, seed: int = 0, channels: int = TINY_FLUX2["in_channels"]
) -> dict:
    """The forward kwargs of ``Flux2Transformer2DModel`` as FLUX.2 [klein]'s pipeline
    (``Flux2KleinPipeline``) gives them with one reference image.

    Why this layout: FLUX.2 tells images apart by the first of its four RoPE axes (T, H, W, L), not
    by a modulation switch. The target's tokens have T = 0; reference image i (from 0) has
    T = 10 + 10·i (``_prepare_image_ids``' ``scale + scale * i``, scale 10), so one reference sits at
    T = 10 over the same H, W grid; every text token has T = H = W = 0 and L = its position. The
    reference tokens follow the target's in ``hidden_states`` and ``img_ids``; ids carry a batch
    axis (the model reads row 0's). Klein is sampled with CFG, not guidance distillation, so
    ``guidance`` is None; ``timestep`` is the pipeline's ``t / 1000`` (0.5). ``text [b, t, d]``: the
    stacked LLM layers' features of the whole chat-templated prompt, padded (the pipeline passes no
    mask: padding and template reach the model). ``size``: target and reference are ``size x size``
    tokens of ``channels`` (FLUX.2's latents are 2x2-patchified before packing, 128 channels).
    """
    g = torch.Generator().manual_seed(seed)
    b, n, length = text.shape[0], size * size, text.shape[1]
    img_ids = torch.cat([_flux2_ids(0, size), _flux2_ids(10, size)])
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length))
    return {
        "hidden_states": torch.randn(b, 2 * n, channels, generator=g),
        "encoder_hidden_states": text,
        "timestep": torch.full((b,), 0.5),
        "img_ids": img_ids.unsqueeze(0).expand(b, -1, -1),
        "txt_ids": txt_ids.unsqueeze(0).expand(b, -1, -1),
        "guidance": None,
        "return_dict": False,
    }
