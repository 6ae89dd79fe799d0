"""Tiny synthetic models: the embedded default for the demo, the tests and the CPU benchmarks.

No weights can be downloaded, so everything here is built from random numbers with a seed: a
Kontext-shaped diffusers Flux transformer with small dims, text encoders with tiny tokenizers
trained in-process, and a matching MoLE config. diffusers/transformers are imported lazily.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .config import MoLEConfig
from .kontext import FLUX_SCHEDULER

__all__ = [
    "TINY_FLUX",
    "TINY_VAE",
    "TinyTextEncoders",
    "kontext_inputs",
    "random_model",
    "save_tiny_kontext",
    "tiny_flux",
    "tiny_mole_config",
    "tiny_text_encoders",
    "tiny_vae",
    "word_tokenizer",
]

# A Flux with 2 double + 2 single blocks, 2 heads of 16 (hidden 32), T5 width 64, CLIP pooled 32.
TINY_FLUX: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 32,
    "guidance_embeds": True,
    "axes_dims_rope": (4, 6, 6),
}


def random_model(cls: Any, cfg: dict[str, Any], seed: int, dtype: torch.dtype = torch.float32) -> Any:
    """``cls(**cfg)`` with seeded random weights, in eval mode. Zero-initialised parameters (output
    projections, modulation) get small random values, so equivalence tests compare real numbers."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(**cfg)
        for p in model.parameters():
            if p.ndim >= 1 and torch.count_nonzero(p) == 0:
                torch.nn.init.normal_(p, std=0.02)
    if dtype != torch.float32:
        model = model.to(dtype)
    return model.eval()


def tiny_flux(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any):
    """A random diffusers ``FluxTransformer2DModel`` with Kontext-compatible tiny dims."""
    from diffusers import FluxTransformer2DModel

    return random_model(FluxTransformer2DModel, {**TINY_FLUX, **overrides}, seed, dtype)


def tiny_mole_config(transformer=None, **overrides: Any) -> MoLEConfig:
    """A MoLE config for ``tiny_flux`` (or any diffusers Flux given): reference layers, small router."""
    cfg = dict(TINY_FLUX)
    if transformer is not None:
        cfg.update(transformer.config)
    hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    defaults: dict[str, Any] = {
        "num_experts": 4,
        "top_k": 2,
        "rank": 4,
        "alpha": 8.0,
        "text_dim": cfg["joint_attention_dim"],
        "router_dim": cfg["pooled_projection_dim"],
        "router_heads": 2,
        "router_head_dim": 8,
        "text_length": 512,
        "base_model": "flux.1-kontext-dev",
    }
    defaults.update(overrides)
    return MoLEConfig.for_flux(
        num_double=cfg["num_layers"], num_single=cfg["num_single_layers"], hidden_size=hidden, **defaults
    )


def kontext_inputs(
    text: torch.Tensor, pooled: torch.Tensor, size: int = 4, seed: int = 0, guidance: float = 2.5
) -> dict:
    """Packed target + reference latents with Kontext ids (reference index 1), as diffusers passes them."""
    g = torch.Generator().manual_seed(seed)
    n, b = size * size, text.shape[0]
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    target = torch.stack([torch.zeros(n), rows.flatten().float(), cols.flatten().float()], -1)
    reference = target.clone()
    reference[:, 0] = 1
    return {
        "hidden_states": torch.randn(b, 2 * n, 64, generator=g),
        "encoder_hidden_states": text,
        "pooled_projections": pooled,
        "timestep": torch.full((b,), 0.5),
        "img_ids": torch.cat([target, reference]),
        "txt_ids": torch.zeros(text.shape[1], 3),
        "guidance": torch.full((b,), guidance),
        "return_dict": False,
    }


@dataclass
class TinyTextEncoders:
    """A T5-like encoder and a CLIP-like pooled encoder with tokenizers trained in-process."""

    t5: Any
    t5_tokenizer: Any
    clip: Any
    clip_tokenizer: Any
    text_length: int

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 features [B, text_length, d], CLIP pooled [B, p]) padded as in training, no mask."""
        t5_ids = self.t5_tokenizer(
            prompts, padding="max_length", max_length=self.text_length, truncation=True, return_tensors="pt"
        ).input_ids
        clip_ids = self.clip_tokenizer(
            prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt"
        ).input_ids
        t5 = self.t5(input_ids=t5_ids).last_hidden_state
        pooled = self.clip(input_ids=clip_ids).pooler_output
        return t5, pooled


_CORPUS = [
    "make the sky a stormy purple",
    "turn the cat into a watercolor painting",
    "remove the person on the left",
    "add a red hat to the dog",
    "convert the photo to a pencil sketch",
    "replace the background with a beach at sunset",
    "make it look like a pixel art game",
    "change the season to winter with snow",
    "extract the canny edges",
    "render the pose skeleton",
]


def word_tokenizer(vocab: int, specials: list[str], pad: str, eos: str | None, corpus: Sequence[str] = _CORPUS):
    """A word-level tokenizer trained in-process on ``corpus`` (whitespace split, ``specials`` kept whole)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(list(corpus), trainers.WordLevelTrainer(vocab_size=vocab, special_tokens=specials))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, unk_token="<unk>", eos_token=eos)


def tiny_text_encoders(
    text_dim: int = 64, pooled_dim: int = 32, text_length: int = 512, seed: int = 0, corpus: Sequence[str] = ()
) -> TinyTextEncoders:
    """Random tiny T5 + CLIP text encoders whose widths match ``tiny_flux``.

    ``corpus``: texts whose words the word-level tokenizers must know (default: a few instructions;
    a word outside the corpus becomes ``<unk>``, so a demo passes its own phrasings).
    """
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    words = list(corpus) or _CORPUS
    vocab = 128 if not corpus else 1024
    t5_tok = word_tokenizer(vocab, ["<pad>", "</s>", "<unk>"], "<pad>", "</s>", words)
    clip_tok = word_tokenizer(vocab, ["<|endoftext|>", "<unk>"], "<|endoftext|>", "<|endoftext|>", words)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=len(t5_tok),
                d_model=text_dim,
                d_kv=16,
                d_ff=2 * text_dim,
                num_layers=2,
                num_heads=4,
                pad_token_id=t5_tok.pad_token_id,
            )
        ).eval()
        clip = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(clip_tok),
                hidden_size=pooled_dim,
                intermediate_size=2 * pooled_dim,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=16,
                bos_token_id=clip_tok.eos_token_id,
                eos_token_id=clip_tok.eos_token_id,
                pad_token_id=clip_tok.pad_token_id,
            )
        ).eval()
    return TinyTextEncoders(t5, t5_tok, clip, clip_tok, text_length)


# A FLUX-like VAE: 16 latent channels, 8x down (4 blocks), no quant convs, FLUX scale/shift; tiny widths.
TINY_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (8, 8, 16, 16),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 4,
    "sample_size": 32,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}


def tiny_vae(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random diffusers ``AutoencoderKL`` shaped like the FLUX VAE, with a near-deterministic encoder.

    The encoder's log-variance channels (the second half of ``conv_out``) have zero weights and a
    bias of -12, so ``latent_dist.sample()`` differs from the mean by noise of std exp(-6) ~ 0.0025.
    Its mean channels are rescaled so that, on smooth random images, the latents normalised with
    FLUX's constants (``(z - 0.1159) · 0.3611``) have mean 0 and std 1, as a trained FLUX VAE's do:
    a random encoder's latents are ~10x smaller, and a flow-matching target would then be almost
    all noise, with the image (and an edit) a rounding error of the loss.
    """
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**TINY_VAE)
        size = TINY_VAE["sample_size"]
        calibration = torch.nn.functional.interpolate(torch.rand(16, 3, 4, 4) * 2 - 1, size=size, mode="bilinear")
    latent = TINY_VAE["latent_channels"]
    with torch.no_grad():
        conv = vae.encoder.conv_out
        conv.weight[latent:].zero_()
        conv.bias[latent:].fill_(-12.0)
        z = vae.encode(calibration).latent_dist.mean
        a = 1.0 / (TINY_VAE["scaling_factor"] * float(z.std()))  # z -> a·z + b: normalised std 1, mean 0
        b = TINY_VAE["shift_factor"] - a * float(z.mean())
        conv.weight[:latent].mul_(a)
        conv.bias[:latent].mul_(a).add_(b)
    if dtype != torch.float32:
        vae = vae.to(dtype)
    return vae.eval()


def save_tiny_kontext(folder: Any, seed: int = 0, text_length: int = 512, corpus: Sequence[str] = ()):
    """Write a complete diffusers-layout FLUX.1 Kontext pipeline folder of tiny random parts.

    ``model_index.json`` names ``FluxKontextPipeline``; the parts are ``tiny_flux(seed)``,
    ``tiny_vae(seed)``, the tiny CLIP / T5 of ``tiny_text_encoders(seed=seed)`` with their tokenizers
    (the CLIP tokenizer's ``model_max_length`` set to its 16 positions, the T5 one's to
    ``text_length``; ``corpus`` as in ``tiny_text_encoders``) and a FLUX [dev] flow-matching
    scheduler. Loads offline with ``FluxKontextPipeline.from_pretrained(folder)``. Returns the folder.
    """
    from pathlib import Path

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = tiny_text_encoders(text_length=text_length, seed=seed, corpus=corpus)
    text.clip_tokenizer.model_max_length = text.clip.config.max_position_embeddings
    text.t5_tokenizer.model_max_length = text_length
    pipe = FluxKontextPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=tiny_vae(seed),
        text_encoder=text.clip,
        tokenizer=text.clip_tokenizer,
        text_encoder_2=text.t5,
        tokenizer_2=text.t5_tokenizer,
        transformer=tiny_flux(seed),
    )
    pipe.save_pretrained(str(folder))
    return folder
