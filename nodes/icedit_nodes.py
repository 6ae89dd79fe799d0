"""ICEdit's diptych: the image to edit on the left, an empty right half masked for inpainting.

ICEdit edits with FLUX.1 Fill: the source image (scaled to 512 pixels wide, its height rounded
down to a multiple of 16, the patch size ComfyUI's Flux pads to) on the left half of a diptych, a
black right half under the mask, and a prompt asking for a diptych whose right side is the left one
"but" edited (``ICEDIT_PROMPT``). The result is the right half of the sampled image. These two
nodes build the diptych and cut the result out; the rest is ComfyUI's own inpainting
(InpaintModelConditioning, FluxGuidance 50, 28 steps).
"""

from __future__ import annotations

from typing import Any

import torch
from comfy_api.latest import io

from ..instructmole.council import describe_value
from ..instructmole.icedit import ICEDIT_PROMPT
from .common import ICEDIT, NodeInputError, image_input

DIPTYCH = "InstructMoLE ICEdit Diptych"
RIGHT_HALF = "InstructMoLE ICEdit Right Half"
MAX_HEIGHT = 4096  # a very tall image at 512 wide would be a diptych of gigapixel size


class ICEditDiptych(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstructMoLE_ICEditDiptych",
            display_name=DIPTYCH,
            category=ICEDIT,
            description="ICEdit's input: the image scaled to 'width' (height a multiple of 16) on the left, an "
            "empty right half, and a mask over the right half. Feed both to InpaintModelConditioning with FLUX.1 "
            f"Fill. The prompt must read: '{ICEDIT_PROMPT}<your edit>'.",
            inputs=[
                io.Image.Input("image", tooltip="The image to edit."),
                io.Int.Input(
                    "width",
                    default=512,
                    min=64,
                    max=2048,
                    step=16,
                    tooltip="Width of each half in pixels (a multiple of 16). ICEdit was trained at 512.",
                ),
            ],
            outputs=[
                io.Image.Output(display_name="diptych", tooltip="The scaled image on the left, black on the right."),
                io.Mask.Output(display_name="mask", tooltip="1 over the right half (to inpaint), 0 over the left."),
            ],
        )

    @classmethod
    def validate_inputs(cls, width: Any = None) -> bool | str:
        if width is not None and not _is_width(width):
            return f"{DIPTYCH}, input 'width': {describe_value(width)} is not possible; choose a multiple of 16"
        return True

    @classmethod
    def execute(cls, image, width: int) -> io.NodeOutput:
        import comfy.utils

        image = image_input(DIPTYCH, "image", image)
        if not _is_width(width):
            raise NodeInputError(DIPTYCH, "width", f"{describe_value(width)} is not possible; choose a multiple of 16")
        height = max(16, int(image.shape[1] * width / image.shape[2]) // 16 * 16)
        if height > MAX_HEIGHT:
            raise NodeInputError(
                DIPTYCH,
                "image",
                f"at {width} pixels wide it would be {height} pixels tall (at most {MAX_HEIGHT}); crop it or lower "
                "'width'",
            )
        scaled = comfy.utils.common_upscale(image[..., :3].movedim(-1, 1), width, height, "bicubic", "disabled")
        scaled = scaled.movedim(1, -1).clamp(0, 1)
        diptych = torch.cat([scaled, torch.zeros_like(scaled)], dim=2)
        mask = torch.zeros(diptych.shape[:3], dtype=torch.float32)
        mask[:, :, width:] = 1.0
        return io.NodeOutput(diptych, mask)


class ICEditRightHalf(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstructMoLE_ICEditRightHalf",
            display_name=RIGHT_HALF,
            category=ICEDIT,
            description="The edited image: the right half of the decoded diptych.",
            inputs=[io.Image.Input("image", tooltip="The decoded diptych (VAE Decode of the sampled latent).")],
            outputs=[io.Image.Output(display_name="image", tooltip="The right half: ICEdit's result.")],
        )

    @classmethod
    def execute(cls, image) -> io.NodeOutput:
        image = image_input(RIGHT_HALF, "image", image)
        if image.shape[2] < 2:
            raise NodeInputError(RIGHT_HALF, "image", "is 1 pixel wide; connect the decoded diptych")
        return io.NodeOutput(image[:, :, image.shape[2] // 2 :].contiguous())


def _is_width(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 64 <= value <= 2048 and value % 16 == 0
