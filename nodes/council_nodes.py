"""Council nodes: override by rule text, blend two councils, apply one to the model, preview it."""

from __future__ import annotations

import json

import numpy as np
import torch
from comfy_api.latest import io, ui

from ..instructmole import CouncilMismatchError, CouncilRuleError, apply_rules, blend, parse_rules
from ..instructmole.viz import council_heatmap
from .common import CATEGORY, COUNCIL, NodeInputError
from .runtime import ModelMismatchError, apply_council

_RULES_HELP = (
    "Rules, one per line or separated by ';': '<layers> <action> <args>'. Layers: all, double, single, "
    "double:0-5, single:*, or a layer name. Actions: force 1,5 (or 1:0.5), only 2,3, ban 2, scale 1.5, top 2. "
    "Example: 'single:0-37 force 1,5; double:* ban 2; all scale 1.5'. '#' starts a comment."
)


class OverrideCouncil(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstructMoLE_OverrideCouncil",
            display_name="InstructMoLE Override Council",
            category=CATEGORY,
            description="Edits a council by hand: force, ban or reweight experts on chosen layers.",
            inputs=[
                COUNCIL.Input("council", tooltip="The council to edit (from Route, Blend or another Override)."),
                io.String.Input("rules", multiline=True, default="all scale 1.0", tooltip=_RULES_HELP),
            ],
            outputs=[COUNCIL.Output(display_name="council", tooltip="The edited council.")],
        )

    @classmethod
    def validate_inputs(cls, rules: str | None = None) -> bool | str:
        if rules is None:  # linked from another node: checked at execution
            return True
        try:
            parse_rules(rules)
        except CouncilRuleError as err:
            return str(err)
        return True

    @classmethod
    def execute(cls, council, rules: str) -> io.NodeOutput:
        try:
            return io.NodeOutput(apply_rules(council, rules))
        except CouncilRuleError as err:
            raise NodeInputError("InstructMoLE Override Council", "rules", str(err)) from None


class BlendCouncils(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstructMoLE_BlendCouncils",
            display_name="InstructMoLE Blend Councils",
            category=CATEGORY,
            description="Mixes the router probabilities of two councils, then picks the top-k experts of the mix. "
            "Factor 1 on some layers takes the second council there.",
            inputs=[
                COUNCIL.Input("council_a", tooltip="The first council (kept where 'layers' does not select)."),
                COUNCIL.Input("council_b", tooltip="The second council, from the same adapter."),
                io.Float.Input(
                    "factor",
                    default=0.5,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="0 = council_a, 1 = council_b, in between = a mix of their probabilities.",
                ),
                io.String.Input(
                    "layers",
                    default="all",
                    tooltip="Which layers to blend: all, double, single, double:0-5, single:*, or a "
                    "layer name. Other layers keep council_a.",
                ),
            ],
            outputs=[COUNCIL.Output(display_name="council", tooltip="The blended council.")],
        )

    @classmethod
    def execute(cls, council_a, council_b, factor: float, layers: str) -> io.NodeOutput:
        node = "InstructMoLE Blend Councils"
        try:
            return io.NodeOutput(blend(council_a, council_b, factor, where=layers))
        except CouncilMismatchError as err:
            raise NodeInputError(node, "council_b", str(err)) from None
        except CouncilRuleError as err:
            raise NodeInputError(node, "layers", str(err)) from None


class ApplyCouncil(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstructMoLE_ApplyCouncil",
            display_name="InstructMoLE Apply Council",
            category=CATEGORY,
            description="Uses one council for every image instead of routing each from its conditioning.",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL output of Load InstructMoLE Adapter."),
                COUNCIL.Input("council", tooltip="The council to apply (one instruction)."),
                io.Combo.Input(
                    "mode",
                    options=["merged", "fixed"],
                    default="merged",
                    tooltip="merged: folded into ComfyUI weight patches once; then it costs exactly the "
                    "base model and stacks with other LoRAs. fixed: applied on the fly to every row.",
                ),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The model with this council on every image.")],
        )

    @classmethod
    def execute(cls, model, council, mode: str) -> io.NodeOutput:
        node = "InstructMoLE Apply Council"
        try:
            return io.NodeOutput(apply_council(model, council, mode))
        except ModelMismatchError as err:
            raise NodeInputError(node, "model", str(err)) from None
        except (CouncilMismatchError, ValueError) as err:
            raise NodeInputError(node, "council", str(err)) from None


def _summary(council) -> str:
    lines = []
    for b in range(council.batch_size):
        lines.append(council.label[b] if council.label else f"instance {b}")
        for row, name in enumerate(council.layers):
            members = ", ".join(f"{e}:{w:.2f}" for e, w in council.members(b, row)) or "(off)"
            lines.append(f"  {name}: {members}")
    return "\n".join(lines)


class CouncilPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstructMoLE_CouncilPreview",
            display_name="InstructMoLE Council Preview",
            category=CATEGORY,
            description="Shows a council as a heat map (layers down, experts across; colour = router probability, "
            "framed = chosen, number = weight, red stroke = banned) and as JSON to share.",
            inputs=[COUNCIL.Input("council", tooltip="The council to show.")],
            outputs=[
                io.Image.Output(display_name="heat map", tooltip="The heat map as an image."),
                io.String.Output(display_name="json", tooltip="The council as JSON, to save or share."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, council) -> io.NodeOutput:
        picture = council_heatmap(council, title="InstructMoLE council")
        image = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)[None]
        text = json.dumps(council.to_dict())
        shown = ui.PreviewImage(image, cls=cls).as_dict()
        return io.NodeOutput(image, text, ui={**shown, "text": [_summary(council)]})
