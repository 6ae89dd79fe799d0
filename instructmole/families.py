"""Which base model an adapter fits, told from the shapes a loaded transformer already has.

An adapter records the model family it was trained on (``config.base_model``). The layer shapes
alone cannot tell FLUX.1 Kontext from FLUX.1 Fill (same blocks, same widths), but the image
input can: Kontext and dev take 64 packed latent channels, Fill 384 (latents + masked image +
mask), Canny and Depth 128. The text widths must equal what the router reads, or the first
forward fails deep inside. Checking these where the model is known (``attach`` and the ComfyUI
loaders) turns a late shape error or a silently wrong image into one sentence at load time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import MoLEConfig
from .errors import InstructMoLEError

__all__ = ["BFL_INPUTS", "DIFFUSERS_INPUTS", "FAMILIES", "Family", "check_model_fits"]

# The Linears that read the image latents, the T5 features and the CLIP pooled vector.
DIFFUSERS_INPUTS = ("x_embedder", "context_embedder", "time_text_embed.text_embedder.linear_1")
BFL_INPUTS = ("img_in", "txt_in", "vector_in.in_layer")  # ComfyUI's Flux


@dataclass(frozen=True)
class Family:
    title: str  # as people call it
    image_channels: int  # packed 2x2 latent channels into the transformer's image input


FAMILIES: dict[str, Family] = {
    "flux.1-kontext-dev": Family("FLUX.1 Kontext [dev]", 64),
    "flux.1-dev": Family("FLUX.1 [dev]", 64),
    "flux.1-fill-dev": Family("FLUX.1 Fill [dev]", 384),
    "flux.1-canny-dev": Family("FLUX.1 Canny [dev]", 128),
    "flux.1-depth-dev": Family("FLUX.1 Depth [dev]", 128),
}


def _width(transformer: Any, path: str) -> int | None:
    try:
        return transformer.get_submodule(path).in_features
    except AttributeError:  # no such module (or not a Linear): that check is skipped
        return None


def check_model_fits(
    config: MoLEConfig,
    transformer: Any,
    inputs: tuple[str, str, str],
    error: type[InstructMoLEError] = InstructMoLEError,
) -> None:
    """Refuse a transformer of another family, or with text widths the router cannot read.

    ``inputs``: the module paths of the image, T5 and pooled input Linears in this host's naming.
    """
    image_channels, text_dim, pooled_dim = (_width(transformer, path) for path in inputs)
    family = FAMILIES.get(config.base_model)
    if family is None:
        raise error(
            f"the adapter was made for {config.base_model!r}, a base model this InstructMoLE does not know "
            f"(known: {', '.join(FAMILIES)}); update the pack or use an adapter for FLUX.1 Kontext"
        )
    if image_channels is not None and image_channels != family.image_channels:
        alike = [f.title for f in FAMILIES.values() if f.image_channels == image_channels]
        looks = f" (like {' or '.join(alike)})" if alike else ""
        raise error(
            f"the model takes {image_channels} image input channels{looks}, but the adapter was made for "
            f"{family.title} ({family.image_channels}); load {family.title} or an adapter made for this model"
        )
    instruction_routed = bool(config.instruction_layers)
    for what, have, need in (
        ("T5 text features", text_dim, config.text_dim),
        ("CLIP pooled vectors", pooled_dim, config.router_dim),
    ):
        if instruction_routed and have is not None and have != need:
            raise error(
                f"the model reads {what} of width {have}, but the adapter's router reads width {need}; "
                "use an adapter made for this model"
            )
