"""Council nodes: override by rule text, blend two councils, apply one to the model, preview it.

Every mistake on an input surfaces as that input's one-line message (``NodeInputError``); rule
text and layer selectors typed into a widget are checked before the graph runs
(``validate_inputs``). ComfyUI's own min/max check lets NaN through and is skipped for inputs that
``validate_inputs`` takes, so numbers are checked again here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from comfy_api.latest import io, ui
from PIL import Image, ImageDraw

from ..instructmole import Council, CouncilMismatchError, CouncilRuleError, apply_rules, blend, parse_rules
from ..instructmole.council import describe_value
from ..instructmole.layers import rule_names
from ..instructmole.overrides import parse_selector
from ..instructmole.viz import council_heatmap, weight_text
from .common import COUNCIL, COUNCILS, LOAD_ADAPTER, NodeInputError, fraction_input
from .runtime import ModelMismatchError, apply_council

MODES = ("merged", "fixed")
# The preview draws at most this many instances and cells (instances × layers × experts) and prints
# at most this many summary lines: a batch of thousands of instructions must not make a gigapixel
# picture (the JSON output always holds the whole council).
PREVIEW_INSTANCES = 16
PREVIEW_CELLS = 20_000
PREVIEW_LINES = 2_000
# The ui key the frontend's council map (web/council_map.js) reads; see ``council_ui``.
UI_KEY = "instructmole_council"

_RULES_HELP = (
    "Rules, one per line or separated by ';': '<layers> <action> <args>'. Layers: all, double, single, "
    "double:0-5, single:*, or a layer name. Actions: force 1,5 (or 1:0.5), only 2,3, ban 2, scale 1.5, top 2. "
    "Example: 'single:0-37 force 1,5; double:* ban 2; all scale 1.5'. '#' starts a comment. 'ban 2': the expert "
    "that fills in takes over 2's weight, so the layer keeps its strength; 'ban 2 routed': it keeps its own routed "
    "weight. Weights and scale factors: 0 to 100; at most 1000 rules."
)


def _syntax(parse: Callable[[str], Any], text: str | None) -> bool | str:
    """For ``validate_inputs``: True, or the parse error's message. ``None``: linked from another node,
    known (and checked) only at execution."""
    if text is None:
        return True
    try:
        parse(text)
    except CouncilRuleError as err:
        return str(err)
    return True


def _council_input(node: str, name: str, value: Any) -> Council:
    if not isinstance(value, Council):
        raise NodeInputError(
            node, name, f"got {describe_value(value)}, not a council; connect the COUNCIL output of a Route node"
        )
    return value


class OverrideCouncil(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstructMoLE_OverrideCouncil",
            display_name="InstructMoLE Override Council",
            category=COUNCILS,
            description="Edits a council by hand: force, ban or reweight experts on chosen layers. A banned "
            "expert's weight goes to the expert that fills in (write 'ban 2 routed' to keep the newcomer's own "
            "routed weight).",
            inputs=[
                COUNCIL.Input("council", tooltip="The council to edit (from Route, Blend or another Override)."),
                io.String.Input("rules", multiline=True, default="all scale 1.0", tooltip=_RULES_HELP),
            ],
            outputs=[COUNCIL.Output(display_name="council", tooltip="The edited council.")],
        )

    @classmethod
    def validate_inputs(cls, rules: str | None = None) -> bool | str:
        """The rule text alone (no council yet): syntax, numbers and limits; experts are checked at run."""
        return _syntax(parse_rules, rules)

    @classmethod
    def execute(cls, council, rules: str) -> io.NodeOutput:
        node = "InstructMoLE Override Council"
        council = _council_input(node, "council", council)
        try:
            edited = apply_rules(council, rules)
        except CouncilRuleError as err:
            raise NodeInputError(node, "rules", str(err)) from None
        except CouncilMismatchError as err:
            raise NodeInputError(node, "council", str(err)) from None
        # The edited council's layout for the frontend (the council map, the expert grid).
        return io.NodeOutput(edited, ui={UI_KEY: [council_ui(edited)]})


class BlendCouncils(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstructMoLE_BlendCouncils",
            display_name="InstructMoLE Blend Councils",
            category=COUNCILS,
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
    def validate_inputs(cls, layers: str | None = None) -> bool | str:
        """The layer selector's syntax (whether it picks a layer of the adapter is known at run)."""
        return _syntax(parse_selector, layers)

    @classmethod
    def execute(cls, council_a, council_b, factor: float, layers: str) -> io.NodeOutput:
        node = "InstructMoLE Blend Councils"
        council_a = _council_input(node, "council_a", council_a)
        council_b = _council_input(node, "council_b", council_b)
        factor = fraction_input(node, "factor", factor)
        try:
            where = parse_selector(layers)
        except CouncilRuleError as err:
            raise NodeInputError(node, "layers", str(err)) from None
        try:
            return io.NodeOutput(blend(council_a, council_b, factor, where=where))
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
            category=COUNCILS,
            description="Uses one council for every image instead of routing each from its conditioning.",
            inputs=[
                io.Model.Input("model", tooltip=f"The MODEL output of {LOAD_ADAPTER}."),
                COUNCIL.Input("council", tooltip="The council to apply (one instruction)."),
                io.Combo.Input(
                    "mode",
                    options=list(MODES),
                    default="merged",
                    tooltip="merged: folded into ComfyUI weight patches once; then it costs exactly the "
                    "base model and stacks with other LoRAs. fixed: applied on the fly to every row. On fp8 "
                    "weights merged is rounded to fp8 with the weight, so fixed is the exact mode there.",
                ),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The model with this council on every image.")],
        )

    @classmethod
    def execute(cls, model, council, mode: str) -> io.NodeOutput:
        node = "InstructMoLE Apply Council"
        if mode not in MODES:
            raise NodeInputError(node, "mode", f"{describe_value(mode)} is not a mode; choose merged or fixed")
        council = _council_input(node, "council", council)
        try:
            return io.NodeOutput(apply_council(model, council, mode))
        except ModelMismatchError as err:
            raise NodeInputError(node, "model", str(err)) from None
        except (CouncilMismatchError, ValueError) as err:
            raise NodeInputError(node, "council", str(err)) from None


def _shown_part(council: Council) -> tuple[Council, str]:
    """The first instances and layers of ``council`` that fit the preview, and a note when some are left out."""
    b, num_layers, n = council.shape
    layers = num_layers if num_layers * n <= PREVIEW_CELLS else max(1, PREVIEW_CELLS // n)
    instances = min(b, PREVIEW_INSTANCES, max(1, PREVIEW_CELLS // max(layers * n, 1)))
    if (instances, layers) == (b, num_layers):
        return council, ""
    part = replace(
        council,
        layers=council.layers[:layers],
        probs=council.probs[:instances, :layers],
        weights=council.weights[:instances, :layers],
        label=council.label[:instances],
        banned=council.banned[:instances, :layers] if council.banned is not None else None,
    )
    return part, f"(showing {instances} of {b} instances and {layers} of {num_layers} layers)"


def _finite(t: torch.Tensor, high: float) -> torch.Tensor:
    return torch.nan_to_num(t.detach().float().cpu(), nan=0.0, posinf=high, neginf=0.0)


def council_ui(council: Council) -> dict[str, Any]:
    """The council as the frontend's council map reads it (ui key ``instructmole_council``).

    Instance 0 only (``instances`` says how many the council holds) and at most the layers the
    preview shows; numbers rounded to 4 decimals (but never a nonzero one to 0) and made finite (the
    browser's JSON has no NaN). ``chosen`` marks the members from the unrounded weights, as the
    summary lists them, so the map's count and frames never depend on rounding.
    ``names`` are the rule-form names people read (``double:3``), ``layers`` the canonical ones.
    """
    part, _ = _shown_part(council)
    layers = list(part.layers)
    b = council.batch_size
    label = (council.label[0] if len(council.label) else "") if b else ""

    def rows(t: torch.Tensor, high: float, members: bool = False) -> list[list[float]]:
        # A member's weight that would round to 0 is sent as it is: it never reads 0.
        keep = (lambda v: round(v, 4) or v) if members else (lambda v: round(v, 4))
        return [[keep(float(v)) for v in row] for row in _finite(t[0], high).tolist()] if b else []

    chosen = (part.weights[0].detach().cpu() != 0).tolist() if b else []  # as Council.members decides

    return {
        "layers": layers,
        "names": rule_names(layers),
        "num_experts": council.num_experts,
        "top_k": council.top_k,
        "adapter_id": council.adapter_id,
        "label": label,
        "probs": rows(part.probs, 1.0),
        "weights": rows(part.weights, 0.0, members=True),
        "chosen": chosen,
        "banned": part.banned[0].tolist() if part.banned is not None and b else None,
        "instances": b,
    }


def _summary(council: Council, note: str = "") -> str:
    """One line per layer, named the way rules name it (``double:3``): ``expert:weight`` heaviest first."""
    lines = [note] if note else []
    names = rule_names(council.layers)
    width = max((len(n) for n in names), default=0)
    for b in range(council.batch_size):
        lines.append(council.label[b] if council.label else f"instance {b}")
        for row, name in enumerate(names):
            members = ", ".join(f"{e}:{weight_text(w)}" for e, w in council.members(b, row)) or "(off)"
            lines.append(f"  {name:<{width}}  {members}")
            if len(lines) >= PREVIEW_LINES:
                return "\n".join([*lines, "  …"])
    return "\n".join(lines)


def _picture(council: Council) -> Image.Image:
    """The heat map, sized so that a large council stays a picture of a few megapixels."""
    if council.weights.numel() == 0:
        picture = Image.new("RGB", (420, 40), (24, 24, 28))
        ImageDraw.Draw(picture).text((8, 12), "this council has no instruction-routed layer", fill=(235, 235, 235))
        return picture
    cells = council.weights.numel()
    cell = 40 if cells <= 2_500 else max(12, int(40 * (2_500 / cells) ** 0.5))
    # Drawn values only: a non-finite number (from a hand-made council) must not break the picture.
    shown = replace(
        council,
        probs=torch.nan_to_num(council.probs.detach().float(), nan=0.0, posinf=1.0, neginf=0.0),
        weights=torch.nan_to_num(council.weights.detach().float(), nan=0.0, posinf=0.0, neginf=0.0),
    )
    return council_heatmap(shown, cell=cell, title="InstructMoLE council")


class CouncilPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstructMoLE_CouncilPreview",
            display_name="InstructMoLE Council Preview",
            category=COUNCILS,
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
        council = _council_input("InstructMoLE Council Preview", "council", council)
        part, note = _shown_part(council)
        image = torch.from_numpy(np.asarray(_picture(part), dtype=np.float32) / 255.0)[None]
        text = json.dumps(council.to_dict())
        shown = ui.PreviewImage(image, cls=cls).as_dict()
        summary = _summary(part, note)
        return io.NodeOutput(image, text, ui={**shown, "text": [summary], UI_KEY: [council_ui(council)]})
