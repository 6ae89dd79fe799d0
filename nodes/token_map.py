"""The token expert map: which expert each region of the image used, for per-token routed adapters.

An adapter routed per token (ICEdit's MoE-LoRA) has no council to preview: each token of each
routed layer picks its own expert from that layer's input. The runtime keeps the first choice of
every token of the latest forward (the last sampling step); this node reads it after a sampler has
run, keeps the target image's tokens of the positive rows, and colours each 16x16-pixel patch by
the expert most of the chosen layers gave it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from comfy_api.latest import io, ui
from PIL import Image

from ..instructmole import CouncilRuleError
from ..instructmole.council import describe_value
from ..instructmole.overrides import parse_selector
from ..instructmole.viz import dominant_experts, token_expert_map
from .common import ICEDIT, LOAD_ADAPTER, NodeInputError, fraction_input, image_input
from .runtime import ModelMismatchError, runtime_of

NODE = "InstructMoLE Token Expert Map"
# ComfyUI's Flux: a latent pixel is 8 image pixels, a token is 2x2 latent pixels.
PIXELS_PER_TOKEN = 16
MAX_MAP_PIXELS = 4096 * 4096  # a drawn map larger than this is refused, not allocated


class TokenExpertMap(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstructMoLE_TokenExpertMap",
            display_name="InstructMoLE Token Expert Map",
            category=ICEDIT,
            description="For adapters routed per token (ICEdit's MoE-LoRA): which expert each region of the image "
            "used at the last sampling step, for a group of layers. One colour per expert; darker where the layers "
            "disagree. The legend gives each expert's share of the image.",
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip=f"The MODEL the sampler ran with (from {LOAD_ADAPTER}, with a per-token adapter). "
                    "The map shows that model's latest sampling run.",
                ),
                io.Latent.Input(
                    "samples",
                    tooltip="The sampler's LATENT output: it makes this node run after sampling, and its size "
                    "must be the size that was sampled.",
                ),
                io.String.Input(
                    "layers",
                    default="single",
                    tooltip="Which routed layers to count, as Override Council rules name them: 'all', 'double', "
                    "'single', 'single:0-18', 'double:5'. Each region shows the expert most of them chose.",
                ),
                io.Image.Input(
                    "image",
                    optional=True,
                    tooltip="The decoded image, drawn under the map (the sampled image, e.g. the whole diptych).",
                ),
                io.Float.Input(
                    "opacity",
                    default=0.55,
                    min=0.0,
                    max=1.0,
                    step=0.05,
                    tooltip="How strongly the map covers 'image' (1 = the map alone). Without an image, unused.",
                ),
            ],
            outputs=[io.Image.Output(display_name="map", tooltip="The map (with its legend), one per image.")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, layers: str | None = None, opacity: Any = None) -> bool | str:
        try:
            if layers is not None:
                parse_selector(layers)
            if opacity is not None:
                fraction_input(NODE, "opacity", opacity)
        except CouncilRuleError as err:
            return f"{NODE}, input 'layers': {err}"
        except NodeInputError as err:
            return str(err)
        return True

    @classmethod
    def execute(cls, model, samples, layers: str, image=None, opacity: float = 0.55) -> io.NodeOutput:
        opacity = fraction_input(NODE, "opacity", opacity)
        try:
            runtime = runtime_of(model)
        except ModelMismatchError as err:
            raise NodeInputError(NODE, "model", str(err)) from None
        config = runtime.adapter.config
        token_layers = [s.name for s in config.layers if s.routing == "token"]
        if not token_layers:
            raise NodeInputError(
                NODE, "model", "this adapter routes per image, not per token; show its councils with Council Preview"
            )
        try:
            mask = parse_selector(layers).mask(token_layers)
        except CouncilRuleError as err:
            raise NodeInputError(NODE, "layers", str(err)) from None
        chosen = [name for name, keep in zip(token_layers, mask.tolist(), strict=True) if keep]
        layout, recorded = runtime.map_record or (None, {})
        if layout is None or not all(name in recorded for name in chosen):
            raise NodeInputError(
                NODE, "samples", "this MODEL has not sampled yet; connect the LATENT output of the sampler that uses it"
            )
        latent = samples.get("samples") if isinstance(samples, dict) else None
        if not isinstance(latent, torch.Tensor) or latent.ndim != 4:
            raise NodeInputError(NODE, "samples", f"got {describe_value(samples)}; connect a sampler's LATENT output")
        grid = ((latent.shape[-2] + 1) // 2, (latent.shape[-1] + 1) // 2)
        if grid != layout.grid:
            raise NodeInputError(
                NODE,
                "samples",
                f"this latent is {latent.shape[-1] * 8}x{latent.shape[-2] * 8} pixels, but the latest sampling with "
                f"this MODEL was {layout.grid[1] * PIXELS_PER_TOKEN}x{layout.grid[0] * PIXELS_PER_TOKEN}; connect "
                "the LATENT of the sampler that ran last with it",
            )
        per_layer = torch.stack([layout.image_tokens(name, recorded[name].cpu()) for name in chosen])  # [L, rows, t]
        if per_layer.shape[-1] != grid[0] * grid[1]:  # not FLUX's [text; image] layout
            raise NodeInputError(
                NODE, "model", "its layers saw the image tokens in a layout the map cannot place; use a FLUX model"
            )
        rows = min(per_layer.shape[1], latent.shape[0])
        size = _map_size(grid, image)
        title = f"{layers.strip()} ({len(chosen)} layer{'s' * (len(chosen) != 1)}), last step"
        pictures = []
        for row in range(rows):
            dominant, agreement = dominant_experts(per_layer[:, row], config.num_experts)
            under = _pil(image[min(row, image.shape[0] - 1)]) if image is not None else None
            picture = token_expert_map(
                dominant.reshape(grid),
                agreement.reshape(grid),
                config.num_experts,
                size,
                under=under,
                opacity=opacity,
                title=title,
            )
            pictures.append(torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0))
        maps = torch.stack(pictures)
        return io.NodeOutput(maps, ui=ui.PreviewImage(maps, cls=cls))


def _map_size(grid: tuple[int, int], image: Any) -> tuple[int, int]:
    """(width, height): the image's when one is given, else 16 pixels per token."""
    if image is not None:
        image_input(NODE, "image", image)
        width, height = int(image.shape[2]), int(image.shape[1])
    else:
        width, height = grid[1] * PIXELS_PER_TOKEN, grid[0] * PIXELS_PER_TOKEN
    if width * height > MAX_MAP_PIXELS:
        raise NodeInputError(NODE, "image", f"{width}x{height} is too large to draw a map over; scale it down first")
    return width, height


def _pil(image: torch.Tensor) -> Image.Image:
    pixels = (image[..., :3].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(pixels, "RGB")
