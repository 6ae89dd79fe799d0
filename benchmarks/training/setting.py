"""The setting every variant trains in, built once: sizes, the trainer's config, the model, the inputs.

Why one module: the comparison is only fair if every variant runs on the same frozen transformer,
set up by the trainer's own code (``training.config.load_config``, ``setup_transformer``), on the
same micro-batch and the same flow loss. Everything the variants share is here; what makes each
variant different is in ``variants.py`` and ``reference_way.py``.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from instructmole.tiny import TINY_FLUX
from training.config import TrainConfig, load_config
from training.recipe import flow_loss as recipe_flow_loss

from ..common import random_flux

VARIANTS = ("ours", "plain LoRA", "reference way")
FP8_NAME = "ours, fp8 base"  # MemoryOption("fp8").variant_name
FULL_HIDDEN = 3072
REFERENCE_LORA_RANK = 256


@dataclass(frozen=True)
class TrainShape:
    """Transformer shape, token counts and adapter sizes of one benchmark setting."""

    name: str
    num_double: int
    num_single: int
    heads: int
    head_dim: int
    axes_dims_rope: tuple[int, int, int]
    text_dim: int  # T5 width (joint_attention_dim); also the router's text width
    pooled_dim: int  # CLIP pooled width; also the router's width
    text_tokens: int
    sides: tuple[int, ...]  # packed latent tokens per side of the target (and of the reference)
    in_channels: int = 64
    num_experts: int = 8
    top_k: int = 4
    rank: int = 32
    alpha: float = 32.0
    router_heads: int = 12
    router_head_dim: int = 64
    lora_rank: int = REFERENCE_LORA_RANK

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim


SIZES: dict[str, TrainShape] = {
    # FLUX.1 Kontext [dev]; 512² and 1024² targets are 32² and 64² packed tokens, each doubled by
    # the reference; T5 at the training length 512.
    "full": TrainShape(
        "full", 19, 38, 24, 128, (16, 56, 56), text_dim=4096, pooled_dim=768, text_tokens=512, sides=(32, 64)
    ),
    # benchmarks/inference.py's "scaled": 4 + 8 blocks, hidden 1024 (8 × 128), T5 4096 × 256, the
    # LoRA rank keeping the reference's rank / hidden (256 / 3072); experts and router as full.
    "scaled": TrainShape(
        "scaled",
        4,
        8,
        8,
        128,
        (16, 56, 56),
        text_dim=4096,
        pooled_dim=768,
        text_tokens=256,
        sides=(16, 24),
        lora_rank=max(4, round(REFERENCE_LORA_RANK * 1024 / FULL_HIDDEN)),
    ),
    # instructmole.tiny's Flux (2 + 2 blocks, hidden 32) with a tiny adapter: the smoke test.
    "tiny": TrainShape(
        "tiny",
        TINY_FLUX["num_layers"],
        TINY_FLUX["num_single_layers"],
        TINY_FLUX["num_attention_heads"],
        TINY_FLUX["attention_head_dim"],
        tuple(TINY_FLUX["axes_dims_rope"]),
        text_dim=TINY_FLUX["joint_attention_dim"],
        pooled_dim=TINY_FLUX["pooled_projection_dim"],
        text_tokens=8,
        sides=(4,),
        num_experts=4,
        top_k=2,
        rank=4,
        alpha=8.0,
        router_heads=2,
        router_head_dim=8,
        lora_rank=8,
    ),
}


def size_label(side: int) -> str:
    """``"1024² + ref (4096+4096 tok)"``: a packed token is 16 × 16 pixels (VAE 8×, 2×2 packing)."""
    return f"{side * 16}² + ref ({side * side}+{side * side} tok)"


# ---- the shared model and inputs ----------------------------------------------------------------


def build_transformer(shape: TrainShape, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """A random Kontext-shaped diffusers Flux transformer, built directly on ``device`` in ``dtype``."""
    return random_flux(shape, device, dtype, seed)


@contextlib.contextmanager
def _dummy_paths() -> Iterator[tuple[Path, Path]]:
    """A manifest file and a model folder that exist, for the config's path checks (nothing is read)."""
    with tempfile.TemporaryDirectory(prefix="instructmole-bench-") as tmp:
        manifest, folder = Path(tmp) / "manifest.jsonl", Path(tmp) / "model"
        manifest.write_text("")
        folder.mkdir()
        yield manifest, folder


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def trainer_config(shape: TrainShape, dtype: torch.dtype, memory: Sequence[str] = ()) -> TrainConfig:
    """The trainer's own config (``training.config.load_config``) for this shape; ``memory``: the memory
    option's keys (``MemoryOption.overrides``: ``model.quantize_base``, ``model.block_swap``, ...)."""
    with _dummy_paths() as (manifest, folder):
        return load_config(
            None,
            [
                f"data.manifest={manifest}",
                f"model.pretrained={folder}",
                f"model.dtype={dtype_name(dtype)}",
                *memory,
                "model.gradient_checkpointing=true",
                "adapter.targets=[reference]",
                f"adapter.num_experts={shape.num_experts}",
                f"adapter.top_k={shape.top_k}",
                f"adapter.rank={shape.rank}",
                f"adapter.alpha={shape.alpha}",
                f"adapter.router_heads={shape.router_heads}",
                f"adapter.router_head_dim={shape.router_head_dim}",
                f"adapter.text_length={shape.text_tokens}",
                f"adapter.lora.rank={shape.lora_rank}",
                f"adapter.lora.alpha={shape.lora_rank}",
            ],
        )


@dataclass
class StepInputs:
    """One micro-batch as ``TrainingModel.forward`` takes it (a fixed draw: timings do not depend on it)."""

    hidden_states: Tensor  # [b, 2n, 64]: noisy target tokens, then the reference's
    text: Tensor
    pooled: Tensor
    sigma: Tensor
    img_ids: Tensor
    txt_ids: Tensor
    guidance: Tensor
    target: Tensor  # [b, n, 64]: eps - x0 on the target tokens
    seeds: Tensor

    def as_kwargs(self) -> dict[str, Tensor]:
        return dict(vars(self))


def make_inputs(shape: TrainShape, side: int, device: torch.device, dtype: torch.dtype, seed: int) -> StepInputs:
    """Flow-matching inputs of one Kontext sample: x_t = (1 − σ)·x0 + σ·ε at σ = 0.5, target ε − x0."""
    g = torch.Generator().manual_seed(seed)
    n = side * side
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    ids = torch.stack([torch.zeros(n), rows.flatten().float(), cols.flatten().float()], -1)
    ref_ids = ids.clone()
    ref_ids[:, 0] = 1  # Kontext: the reference's first position coordinate is its index

    def rand(*s: int) -> Tensor:
        return torch.randn(*s, generator=g)

    x0, eps, reference = rand(1, n, shape.in_channels), rand(1, n, shape.in_channels), rand(1, n, shape.in_channels)
    sigma = 0.5
    return StepInputs(
        hidden_states=torch.cat([(1 - sigma) * x0 + sigma * eps, reference], 1).to(device, dtype),
        text=rand(1, shape.text_tokens, shape.text_dim).to(device, dtype),
        pooled=rand(1, shape.pooled_dim).to(device, dtype),
        sigma=torch.full((1,), sigma, device=device, dtype=dtype),
        img_ids=torch.cat([ids, ref_ids]).to(device),
        txt_ids=torch.zeros(shape.text_tokens, 3, device=device),
        guidance=torch.full((1,), 1.0, device=device, dtype=dtype),  # the recipe trains at guidance 1
        target=(eps - x0).to(device),
        seeds=torch.tensor([seed]),
    )


def flow_loss(transformer: nn.Module, x: StepInputs) -> Tensor:
    """Per-sample flow MSE on the target tokens, by the trainer's own ``flow_loss``."""
    out = transformer(
        hidden_states=x.hidden_states,
        encoder_hidden_states=x.text,
        pooled_projections=x.pooled,
        timestep=x.sigma,
        img_ids=x.img_ids,
        txt_ids=x.txt_ids,
        guidance=x.guidance,
        return_dict=False,
    )[0]
    return recipe_flow_loss(out, x.target)


def tensor_bytes(tensors: Iterator[Tensor] | Sequence[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
