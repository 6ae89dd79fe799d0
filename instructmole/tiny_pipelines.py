"""Tiny random pipeline folders of Qwen-Image-Edit-2511 and FLUX.2 [klein] in diffusers' layout.

Why: the trainer loads a family from a diffusers pipeline folder (``transformer/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``, ``model_index.json``), and its tests and the
tiny recipe need such a folder without any download. ``save_tiny_family`` writes one of tiny random
parts: the family's tiny transformer (``tiny_families``), a tiny VAE of the family's own class
(``AutoencoderKLQwenImage``, ``AutoencoderKLFlux2``) whose latents are calibrated like
``tiny.tiny_vae``'s, and the tiny chat encoder of ``tiny_llm`` with its tokenizer (the same weights
and ids as ``tiny_chat_encoder(family, width, seed=seed, corpus=corpus)``, so a test can rebuild the
encoder a host would use).

The VAE calibration, per family: the encoder's log-variance output is pinned at -12 (a posterior
sample differs from its mean by noise of std exp(-6)), and its mean output is rescaled so that the
latents normalised the family's way have mean 0 and std 1 per channel on smooth random images, as a
trained VAE's do (a random encoder's are far smaller, and a flow target would then be almost all
noise). Qwen-Image normalises with the config's ``latents_mean``/``latents_std`` (kept at the
released values: the encoder is fitted to them); FLUX.2 with the batch-norm statistics of its 2x2
patchified latents (``bn.running_mean``/``running_var``), which are set from the calibration images.
diffusers and transformers are imported lazily.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .families import FAMILIES
from .tiny_families import TINY_FLUX2, TINY_QWEN_IMAGE, tiny_flux2, tiny_qwen_image
from .tiny_llm import tiny_chat_encoder

__all__ = [
    "TINY_FAMILIES",
    "TINY_FLUX2_VAE",
    "TINY_QWEN_VAE",
    "save_tiny_family",
    "tiny_family_vae",
]

# Qwen-Image's VAE (a causal 3D VAE run on single frames) in small: 16 latent channels, 8x down.
TINY_QWEN_VAE: dict[str, Any] = {
    "base_dim": 8,
    "z_dim": 16,
    "dim_mult": [1, 1, 2, 2],
    "num_res_blocks": 1,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
}
# FLUX.2's VAE in small: 32 latent channels, 8x down, batch norm over the 2x2-patchified 128 channels.
TINY_FLUX2_VAE: dict[str, Any] = {
    "block_out_channels": (8, 8, 16, 16),
    "layers_per_block": 1,
    "latent_channels": 32,
    "norm_num_groups": 4,
    "sample_size": 32,
}
# The families save_tiny_family writes: the pipeline class its model_index.json names, the tiny
# transformer's text width (the chat encoder's feature width).
TINY_FAMILIES: dict[str, tuple[str, int]] = {
    "qwen-image-edit-2511": ("QwenImageEditPlusPipeline", TINY_QWEN_IMAGE["joint_attention_dim"]),
    "flux.2-klein-4b": ("Flux2KleinPipeline", TINY_FLUX2["joint_attention_dim"]),
}
_SCHEDULER = {  # the released pipelines' flow-matching scheduler settings (resolution-dependent shift)
    "qwen-image-edit-2511": {
        "base_image_seq_len": 256,
        "base_shift": 0.5,
        "max_image_seq_len": 8192,
        "max_shift": 0.9,
        "shift": 1.0,
        "shift_terminal": 0.02,
        "use_dynamic_shifting": True,
        "time_shift_type": "exponential",
    },
    "flux.2-klein-4b": {"shift": 3.0, "use_dynamic_shifting": False},
}


def _calibration_images(size: int, count: int = 16) -> torch.Tensor:
    """Smooth random images in [-1, 1]: 4x4 noise, bilinearly upsampled."""
    return torch.nn.functional.interpolate(torch.rand(count, 3, 4, 4) * 2 - 1, size=size, mode="bilinear")


def _patchify(z: torch.Tensor) -> torch.Tensor:
    """``[b, c, h, w]`` -> ``[b, 4c, h/2, w/2]``, FLUX.2's 2x2 patchify (channel = c·4 + dy·2 + dx)."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


@torch.no_grad()
def _tiny_qwen_vae(seed: int) -> Any:
    from diffusers import AutoencoderKLQwenImage

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLQwenImage(**TINY_QWEN_VAE).eval()
        images = _calibration_images(32)
    z_dim = TINY_QWEN_VAE["z_dim"]
    conv = vae.quant_conv  # 1x1x1: its first z_dim outputs are the mean, the rest the log-variance
    conv.weight[z_dim:].zero_()
    conv.bias[z_dim:].fill_(-12.0)
    z = vae.encode(images[:, :, None]).latent_dist.mean[:, :, 0]  # [b, 16, h, w]
    mean, std = torch.tensor(vae.config.latents_mean), torch.tensor(vae.config.latents_std)
    have_mean, have_std = z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3))
    a = std / have_std  # z_c -> a_c·z_c + b_c: (z_c - mean_c) / std_c then has mean 0 and std 1
    b = mean - a * have_mean
    conv.weight[:z_dim].mul_(a.view(-1, 1, 1, 1, 1))
    conv.bias[:z_dim].mul_(a).add_(b)
    return vae


@torch.no_grad()
def _tiny_flux2_vae(seed: int) -> Any:
    from diffusers import AutoencoderKLFlux2

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLFlux2(**TINY_FLUX2_VAE).eval()
        images = _calibration_images(TINY_FLUX2_VAE["sample_size"])
    latent = TINY_FLUX2_VAE["latent_channels"]
    conv = vae.quant_conv  # 1x1: mean channels first, log-variance after
    conv.weight[latent:].zero_()
    conv.bias[latent:].fill_(-12.0)
    z = _patchify(vae.encode(images).latent_dist.mean)  # [b, 128, h/2, w/2]
    vae.bn.running_mean.copy_(z.mean(dim=(0, 2, 3)))
    vae.bn.running_var.copy_((z.var(dim=(0, 2, 3)) - vae.config.batch_norm_eps).clamp_min(1e-6))
    return vae


def tiny_family_vae(family: str, seed: int = 0) -> Any:
    """The tiny calibrated VAE of ``family`` (a ``TINY_FAMILIES`` key)."""
    arch = _family(family).architecture
    return _tiny_qwen_vae(seed) if arch == "qwen_image" else _tiny_flux2_vae(seed)


def _family(family: str):
    if family not in TINY_FAMILIES:
        raise ValueError(f"no tiny pipeline of {family!r}; choose one of {', '.join(TINY_FAMILIES)}")
    return FAMILIES[family]


def save_tiny_family(folder: Any, family: str, seed: int = 0, corpus: Sequence[str] = ()) -> Path:
    """Write a diffusers-layout pipeline folder of ``family`` (``"qwen-image-edit-2511"`` or
    ``"flux.2-klein-4b"``) made of tiny random parts; returns the folder.

    ``transformer/``: ``tiny_qwen_image(seed)`` or ``tiny_flux2(seed)``; ``vae/``: ``tiny_family_vae``;
    ``text_encoder/`` + ``tokenizer/``: ``tiny_chat_encoder(family, width, seed=seed, corpus=corpus)``
    (a Qwen3 LLM; ``corpus``: texts whose words the tokenizer must know); ``scheduler/``: the
    family's flow-matching scheduler; ``model_index.json`` names the family's diffusers pipeline
    and each part's class (the text encoder is the tiny LLM's own class, and Qwen-Image-Edit has no
    processor: the tiny LLM reads no images)."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    fam = _family(family)
    pipeline, width = TINY_FAMILIES[family]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    transformer = tiny_qwen_image(seed) if fam.architecture == "qwen_image" else tiny_flux2(seed)
    vae = tiny_family_vae(family, seed)
    encoder = tiny_chat_encoder(family, width, seed=seed, corpus=corpus)
    scheduler = FlowMatchEulerDiscreteScheduler(**_SCHEDULER[family])
    transformer.save_pretrained(str(folder / "transformer"))
    vae.save_pretrained(str(folder / "vae"))
    encoder.model.save_pretrained(str(folder / "text_encoder"))
    encoder.tokenizer.save_pretrained(str(folder / "tokenizer"))
    scheduler.save_pretrained(str(folder / "scheduler"))
    index: dict[str, Any] = {
        "_class_name": pipeline,
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", type(scheduler).__name__],
        "text_encoder": ["transformers", type(encoder.model).__name__],
        "tokenizer": ["transformers", type(encoder.tokenizer).__name__],
        "transformer": ["diffusers", type(transformer).__name__],
        "vae": ["diffusers", type(vae).__name__],
    }
    if fam.architecture == "qwen_image":
        index["processor"] = [None, None]
    else:
        index["is_distilled"] = False
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder
