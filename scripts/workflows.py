"""The example workflows: their definitions, the UI-format files built from them, and the way back.

Each workflow is written once, here, as an API-style graph (``class_type`` + ``inputs``, links as
``[node, slot]``) plus what only the canvas has: titles, groups laid out in columns (``Workflow.layout``;
no two groups, nodes or titles overlap), node sizes the frontend keeps, a Note, and the frontend's
``models`` metadata (file names, folders, public download URLs) on the loaders.
``build`` turns a definition into the format the ComfyUI frontend saves (nodes with their sockets
and ``widgets_values``, links, groups), using the server's ``/object_info`` for each node's inputs
in order; ``to_prompt`` turns such a file back into the prompt the frontend would queue. The
headless workflow tests run exactly that prompt, and the browser tests check that the frontend's
own ``graphToPrompt`` agrees.

Rebuild the shipped files after changing a definition or a node's inputs (a server with this pack,
the oldest ComfyUI the pack supports, v0.3.64: newer ones give some core nodes more sockets)::

    python -m scripts.workflows --url http://127.0.0.1:8188      # writes workflows/*.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote"}  # canvas notes: never sent to the server
ROOT = Path(__file__).resolve().parent.parent

# ---- what every workflow loads (public files; the adapter is yours: train or convert one) -----------------

HF = "https://huggingface.co"
KONTEXT = "flux1-dev-kontext_fp8_scaled.safetensors"
CLIP_L, T5 = "clip_l.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors"
VAE = "ae.safetensors"
ADAPTER = "instructmole_kontext.safetensors"
FILL = "flux1-fill-dev.safetensors"
ICEDIT = "icedit_moe_lora.safetensors"  # ICEdit's MoE-LoRA, saved under this name in models/loras
MODELS = {
    KONTEXT: (
        f"{HF}/Comfy-Org/flux1-kontext-dev_ComfyUI/resolve/main/split_files/diffusion_models/{KONTEXT}",
        "diffusion_models",
    ),
    CLIP_L: (f"{HF}/comfyanonymous/flux_text_encoders/resolve/main/{CLIP_L}", "text_encoders"),
    T5: (f"{HF}/comfyanonymous/flux_text_encoders/resolve/main/{T5}", "text_encoders"),
    VAE: (f"{HF}/Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/vae/{VAE}", "vae"),
    FILL: (f"{HF}/black-forest-labs/FLUX.1-Fill-dev/resolve/main/{FILL}", "diffusion_models"),
}
INSTRUCTION = "Make the sky a stormy purple at dusk, keep everything else unchanged"

# ---- layout (canvas units; the frontend's LiteGraph draws a node's title bar above its pos) ----------------

NODE_WIDTH = 340
NODE_TITLE = 30  # LiteGraph.NODE_TITLE_HEIGHT: the title bar above a node's pos
GROUP_FONT = 24  # a group's title bar is 1.4 x its font size tall (LGraphGroup.titleHeight)
GROUP_TOP = 75  # from a group's top edge to its first node's pos: the group title, a gap, the node title
GROUP_PAD = 15  # a group's margin left, right and below its nodes
GAP_X, GAP_Y = 60, 40  # between node columns of a group; between a node and the next one's title bar
GROUP_GAP = 40  # between groups
NOTE = "Note"  # in a layout: where the Note goes
NOTE_WIDTH, NOTE_HEIGHT = 770, 260  # the Note's least width: its title fits (the frontend widens it otherwise)
GROUP_COLOURS = ("#3f789e", "#8A8", "#b06634", "#a1309b", "#88A", "#b58b2a")
# Room the frontend needs (the browser tests fail when it draws a node larger than the file says):
# the expert grid with a group unfolded (block rules: its table scrolls past 400 px) or folded; the
# Council Preview 700 px tall, room for the map of a FLUX.1 council after a run (57 layers: 602 px,
# preferredHeight in web/lib/council_map.mjs) and 440 wide, as the map widens it; nodes with long
# titles (the frontend widens a node to its title).
OVERRIDE_GRID_OPEN = 470
OVERRIDE_GRID_FOLDED = 200
PREVIEW_TALL = 630
PREVIEW_WIDTH = 440
LONG_TITLE_WIDTH = 380


@dataclass
class Node:
    class_type: str
    inputs: dict[str, Any]
    col: int  # column inside its group (0 = the group's left); a column stacks its nodes by id
    title: str | None = None
    group: str = ""  # every node sits in a group (the test of the layout checks it)
    models: tuple[str, ...] = ()  # file names from MODELS this node loads
    tall: int = 0  # extra height (a preview, a long text box, the expert grid)
    width: int = NODE_WIDTH


@dataclass
class Workflow:
    """One example workflow. ``layout`` places the groups: columns of groups, left to right, each
    listing its groups top to bottom (``NOTE`` places the Note there; without it the Note spans the
    bottom). Groups never share a column of nodes, so no group or node can overlap another."""

    name: str  # file stem
    title: str
    note: str
    nodes: dict[int, Node]
    layout: tuple[tuple[str, ...], ...]


# ---- the six workflows -------------------------------------------------------------------------------------


def _text_and_image(first: int, instruction: str = INSTRUCTION, image: str = "example.png") -> dict[int, Node]:
    """CLIP, VAE, the image to edit and its reference latent: ids ``first`` .. ``first + 7``, in the
    groups "Text" (two columns, the second for the reference latent and guidance) and "Image to edit"."""
    t, g = "Text", "Image to edit"
    return {
        first: Node(
            "DualCLIPLoader",
            {"clip_name1": CLIP_L, "clip_name2": T5, "type": "flux", "device": "default"},
            0,
            group=t,
            models=(CLIP_L, T5),
        ),
        first + 1: Node("InstructMoLE_TextEncode", {"clip": [first, 0], "text": instruction}, 0, group=t, tall=60),
        first + 2: Node("VAELoader", {"vae_name": VAE}, 0, group=g, models=(VAE,)),
        first + 3: Node("LoadImage", {"image": image}, 0, group=g, tall=260),
        first + 4: Node("FluxKontextImageScale", {"image": [first + 3, 0]}, 1, group=g),
        first + 5: Node("VAEEncode", {"pixels": [first + 4, 0], "vae": [first + 2, 0]}, 1, group=g),
        first + 6: Node("ReferenceLatent", {"conditioning": [first + 1, 0], "latent": [first + 5, 0]}, 1, group=t),
        first + 7: Node("FluxGuidance", {"conditioning": [first + 6, 0], "guidance": 2.5}, 1, group=t),
    }


def _sample(
    first: int, model: list, positive: list, negative: list, latent: list, vae: list, prefix: str | None, col: int = 0
) -> dict[int, Node]:
    """KSampler -> VAE Decode (-> Save Image when ``prefix``): ids ``first`` .. ``first + 2``."""
    g = "Sampling"
    out = {
        first: Node(
            "KSampler",
            {
                "model": model,
                "positive": positive,
                "negative": negative,
                "latent_image": latent,
                "seed": 0,
                "steps": 20,
                "cfg": 1.0,
                "sampler_name": "euler",
                "scheduler": "simple",
                "denoise": 1.0,
            },
            col,
            group=g,
        ),
        first + 1: Node("VAEDecode", {"samples": [first, 0], "vae": vae}, col, group=g),
    }
    if prefix:
        out[first + 2] = Node(
            "SaveImage", {"images": [first + 1, 0], "filename_prefix": prefix}, col + 1, group=g, tall=260
        )
    return out


def _negative(first: int, positive: list) -> dict[int, Node]:
    """The empty negative, under the Text Encode it zeroes."""
    return {first: Node("ConditioningZeroOut", {"conditioning": positive}, 0, title="Negative (empty)", group="Text")}


def auto_edit() -> Workflow:
    nodes = {
        1: Node(
            "InstructMoLE_LoadKontext",
            {
                "unet_name": KONTEXT,
                "weight_dtype": "default",
                "adapter": ADAPTER,
                "lora_strength": 1.0,
                "expert_strength": 1.0,
            },
            0,
            group="Model",
            models=(KONTEXT,),
        ),
        **_text_and_image(10),
        **_negative(20, [11, 0]),
        **_sample(30, [1, 0], [17, 0], [20, 0], [15, 0], [12, 0], "instructmole_auto"),
    }
    note = (
        "InstructMoLE, auto routing (the recommended way)\n\n"
        "'InstructMoLE Load Kontext + Adapter' loads FLUX.1 Kontext [dev] and the adapter in one node. Each image is "
        "routed from its own instruction: the router reads the text and picks, per layer, a council of experts.\n\n"
        "'InstructMoLE Text Encode' is CLIP Text Encode plus the exact routing signal the adapter was trained with: "
        "use it for the instruction.\n\n"
        "Put your image in 'Load Image', type the edit, press Run. Files: see the README of workflows/."
    )
    layout = (("Model", "Image to edit"), ("Text",), ("Sampling", NOTE))
    return Workflow("1_auto_edit", "Kontext edit, auto routing", note, nodes, layout)


def _model_and_adapter_file() -> dict[int, Node]:
    """Kontext (1), the adapter alone (2) applied to it (3), and the text and image parts (10-20)."""
    return {
        1: Node("UNETLoader", {"unet_name": KONTEXT, "weight_dtype": "default"}, 0, group="Model", models=(KONTEXT,)),
        2: Node("InstructMoLE_AdapterFile", {"adapter": ADAPTER}, 0, group="Model"),
        3: Node(
            "InstructMoLE_ApplyAdapter",
            {"model": [1, 0], "adapter": [2, 0], "lora_strength": 1.0, "expert_strength": 1.0},
            1,
            group="Model",
        ),
        **_text_and_image(10),
        **_negative(20, [11, 0]),
    }


def _apply_and_preview(first: int, model: list, council: list, title: str) -> dict[int, Node]:
    """Apply Council (merged) and the Council Preview of the same council, in the second column of
    the "Council" group: ids ``first`` and ``first + 1``."""
    return {
        first: Node(
            "InstructMoLE_ApplyCouncil", {"model": model, "council": council, "mode": "merged"}, 1, group="Council"
        ),
        first + 1: Node(
            "InstructMoLE_CouncilPreview",
            {"council": council},
            1,
            title=title,
            group="Council",
            tall=PREVIEW_TALL,
            width=PREVIEW_WIDTH,
        ),
    }


def creative_control() -> Workflow:
    nodes = {
        **_model_and_adapter_file(),
        40: Node(
            "InstructMoLE_Route",
            {"adapter": [2, 0], "conditioning": [11, 0], "text": ""},
            0,
            title="Route (the instruction of Text Encode)",
            group="Council",
        ),
        41: Node(
            "InstructMoLE_OverrideCouncil",
            {"council": [40, 0], "rules": "double:0-9 force 1\nsingle ban 2"},
            0,
            group="Council",
            tall=OVERRIDE_GRID_OPEN,
        ),
        **_apply_and_preview(42, [3, 0], [41, 0], "Council map"),
        **_sample(30, [42, 0], [17, 0], [20, 0], [15, 0], [12, 0], "instructmole_council"),
    }
    note = (
        "InstructMoLE, creative control\n\n"
        "'InstructMoLE Adapter File' loads the adapter alone, so routing and your rules are checked before the "
        "diffusion model loads. 'Route' reads the instruction from the Text Encode conditioning (type it once).\n\n"
        "'Override Council' edits the council: click the grid (auto -> force -> ban) or write rules, e.g. "
        "'double:0-9 force 1' or 'single ban 2'. The council map shows which experts each layer uses.\n\n"
        "'Apply Council' (merged) folds the council into the weights: sampling then costs what the base model costs."
    )
    layout = (("Model", "Image to edit", NOTE), ("Text", "Sampling"), ("Council",))
    return Workflow("2_creative_control", "Creative control: override and apply a council", note, nodes, layout)


def route_and_blend() -> Workflow:
    other = "Turn the scene into a watercolour painting"
    nodes = {
        **_model_and_adapter_file(),
        40: Node(
            "InstructMoLE_Route",
            {"adapter": [2, 0], "conditioning": [11, 0], "text": ""},
            0,
            title="Route: the edit",
            group="Council",
        ),
        41: Node(
            "InstructMoLE_Route",
            {"adapter": [2, 0], "clip": [10, 0], "text": other},
            0,
            title="Route: another instruction",
            group="Council",
            tall=60,
        ),
        42: Node(
            "InstructMoLE_BlendCouncils",
            {"council_a": [40, 0], "council_b": [41, 0], "factor": 0.5, "layers": "all"},
            0,
            group="Council",
        ),
        **_apply_and_preview(43, [3, 0], [42, 0], "Council map (blend)"),
        **_sample(30, [43, 0], [17, 0], [20, 0], [15, 0], [12, 0], "instructmole_blend"),
    }
    note = (
        "InstructMoLE, routing by another instruction\n\n"
        "The image is edited by the Text Encode instruction, but the experts can come from elsewhere: "
        "'Route: another instruction' picks the councils a different edit would use, and 'Blend Councils' mixes "
        "the two (factor 0 = the edit's own councils, 1 = the other's; 'layers' limits it, e.g. 'single').\n\n"
        "Connect 'Route: another instruction' straight to 'Apply Council' to route by it alone."
    )
    layout = (("Model", "Image to edit", NOTE), ("Text", "Sampling"), ("Council",))
    return Workflow("3_route_and_blend", "Route by another instruction, blend two councils", note, nodes, layout)


def comparison() -> Workflow:
    g = "Four ways, one seed"
    nodes = {
        1: Node("UNETLoader", {"unet_name": KONTEXT, "weight_dtype": "default"}, 0, group="Model", models=(KONTEXT,)),
        2: Node(
            "InstructMoLE_LoadAdapter",
            {"model": [1, 0], "adapter": ADAPTER, "lora_strength": 1.0, "expert_strength": 1.0},
            0,
            group="Model",
        ),
        **_text_and_image(10),
        **_negative(20, [11, 0]),
        40: Node("InstructMoLE_Route", {"adapter": [2, 1], "conditioning": [11, 0], "text": ""}, 0, group="Councils"),
        41: Node(  # Override Councils end their columns: after a run each grows downwards to show its map
            "InstructMoLE_OverrideCouncil",
            {"council": [40, 0], "rules": "all top 1"},
            0,
            title="Council A: one expert per layer",
            group="Councils",
            tall=OVERRIDE_GRID_FOLDED,
        ),
        45: Node(
            "InstructMoLE_OverrideCouncil",
            {"council": [40, 0], "rules": "all scale 2"},
            1,
            title="Council B: experts at double weight",
            group="Councils",
            tall=OVERRIDE_GRID_FOLDED,
        ),
        43: Node(
            "InstructMoLE_ApplyCouncil", {"model": [2, 0], "council": [41, 0], "mode": "merged"}, 1, group="Councils"
        ),
        44: Node(
            "InstructMoLE_ApplyCouncil", {"model": [2, 0], "council": [45, 0], "mode": "merged"}, 1, group="Councils"
        ),
    }
    # Four samplers in two columns (base, council A | auto, council B), their decoders in a third,
    # the stitches and the saved image in a fourth and fifth.
    for i, (model, title) in enumerate(
        (([1, 0], "base"), ([2, 0], "auto"), ([43, 0], "council A"), ([44, 0], "council B"))
    ):
        part = _sample(50 + 3 * i, model, [17, 0], [20, 0], [15, 0], [12, 0], None)
        part[50 + 3 * i].title = f"KSampler: {title}"
        part[50 + 3 * i].col = i % 2
        part[51 + 3 * i].col = 2
        for n in part.values():
            n.group = g
        nodes.update(part)
    stitch = {"direction": "right", "match_image_size": True, "spacing_width": 8, "spacing_color": "white"}
    for node_id, (left, right) in zip(
        (70, 71, 72), (([51, 0], [54, 0]), ([70, 0], [57, 0]), ([71, 0], [60, 0])), strict=True
    ):
        nodes[node_id] = Node("ImageStitch", {"image1": left, "image2": right, **stitch}, 3, group=g)
    nodes[73] = Node(
        "SaveImage", {"images": [72, 0], "filename_prefix": "instructmole_comparison"}, 4, group=g, tall=260
    )
    note = (
        "InstructMoLE, a comparison\n\n"
        "One image, one instruction, one seed, four models, side by side (left to right): the base Kontext, the "
        "adapter with auto routing, and two hand-made councils (A: each layer keeps only its strongest expert; "
        "B: every expert weight doubled). Change the rules of A and B to compare your own councils."
    )
    layout = (("Model", "Image to edit"), ("Text", "Councils"), (g, NOTE))
    return Workflow("4_comparison", "Comparison: base, auto and two councils", note, nodes, layout)


def two_references() -> Workflow:
    nodes = {
        1: Node("UNETLoader", {"unet_name": KONTEXT, "weight_dtype": "default"}, 0, group="Model", models=(KONTEXT,)),
        2: Node(
            "InstructMoLE_LoadAdapter",
            {"model": [1, 0], "adapter": ADAPTER, "lora_strength": 1.0, "expert_strength": 1.0},
            0,
            group="Model",
        ),
        **_text_and_image(10, "Put the cat from the second image on the sofa in the first image"),
        **_negative(20, [11, 0]),
        60: Node(
            "LoadImage",
            {"image": "example_2.png"},
            0,
            title="Load Image (second reference)",
            group="Second reference",
            tall=260,
        ),
        61: Node("FluxKontextImageScale", {"image": [60, 0]}, 1, group="Second reference"),
        62: Node("VAEEncode", {"pixels": [61, 0], "vae": [12, 0]}, 1, group="Second reference"),
        63: Node(
            "ReferenceLatent",
            {"conditioning": [17, 0], "latent": [62, 0]},
            1,
            title="ReferenceLatent (second)",
            group="Text",
        ),
        **_sample(30, [2, 0], [63, 0], [20, 0], [15, 0], [12, 0], "instructmole_two_references"),
    }
    note = (
        "InstructMoLE with two reference images\n\n"
        "Kontext takes several references: each 'ReferenceLatent' appends one image to the conditioning (ComfyUI "
        "places them side by side in the model's positions, as it does without InstructMoLE). The adapter routes "
        "from the instruction as usual (auto). The output has the size of the first image."
    )
    layout = (("Model", "Image to edit"), ("Text", "Second reference"), ("Sampling", NOTE))
    return Workflow("5_two_references", "Two reference images (multi-reference Kontext)", note, nodes, layout)


def icedit_diptych() -> Workflow:
    from instructmole.icedit import ICEDIT_PROMPT

    m, t, d, s = "Model", "Text", "Diptych", "Sampling"
    nodes = {
        1: Node("UNETLoader", {"unet_name": FILL, "weight_dtype": "default"}, 0, group=m, models=(FILL,)),
        2: Node(
            "InstructMoLE_LoadAdapter",
            {"model": [1, 0], "adapter": ICEDIT, "lora_strength": 1.0, "expert_strength": 1.0},
            0,
            title="InstructMoLE Load Adapter (ICEdit MoE-LoRA)",
            group=m,
            width=LONG_TITLE_WIDTH,
        ),
        10: Node(
            "DualCLIPLoader",
            {"clip_name1": CLIP_L, "clip_name2": T5, "type": "flux", "device": "default"},
            0,
            group=t,
            models=(CLIP_L, T5),
        ),
        11: Node(
            "CLIPTextEncode",
            {"clip": [10, 0], "text": ICEDIT_PROMPT + "make the sky a stormy purple at dusk"},
            0,
            title="Prompt (ICEdit's diptych sentence + your edit)",
            group=t,
            tall=80,
            width=LONG_TITLE_WIDTH,
        ),
        12: Node("FluxGuidance", {"conditioning": [11, 0], "guidance": 50.0}, 1, group=t),
        13: Node("ConditioningZeroOut", {"conditioning": [11, 0]}, 1, title="Negative (empty)", group=t),
        14: Node("VAELoader", {"vae_name": VAE}, 0, group=d, models=(VAE,)),
        15: Node("LoadImage", {"image": "example.png"}, 0, group=d, tall=260),
        16: Node("InstructMoLE_ICEditDiptych", {"image": [15, 0], "width": 512}, 1, group=d),
        17: Node(
            "InpaintModelConditioning",
            {
                "positive": [12, 0],
                "negative": [13, 0],
                "vae": [14, 0],
                "pixels": [16, 0],
                "mask": [16, 1],
                "noise_mask": False,
            },
            1,
            group=d,
        ),
        30: Node(
            "KSampler",
            {
                "model": [2, 0],
                "positive": [17, 0],
                "negative": [17, 1],
                "latent_image": [17, 2],
                "seed": 0,
                "steps": 28,
                "cfg": 1.0,
                "sampler_name": "euler",
                "scheduler": "simple",
                "denoise": 1.0,
            },
            0,
            group=s,
        ),
        31: Node("VAEDecode", {"samples": [30, 0], "vae": [14, 0]}, 0, group=s),
        32: Node("InstructMoLE_ICEditRightHalf", {"image": [31, 0]}, 1, group=s),
        33: Node("SaveImage", {"images": [32, 0], "filename_prefix": "icedit"}, 1, group=s, tall=260),
        40: Node(
            "InstructMoLE_TokenExpertMap",
            {"model": [2, 0], "samples": [30, 0], "layers": "single", "image": [31, 0], "opacity": 0.55},
            0,
            title="Which expert each region used",
            group="Expert map",
            tall=300,
        ),
    }
    note = (
        "ICEdit's MoE-LoRA on FLUX.1 Fill, as ICEdit runs it\n\n"
        "Files: FLUX.1 Fill [dev] in models/diffusion_models; ICEdit's MoE-LoRA (huggingface.co/sanaka87/"
        "ICEdit-MoE-LoRA) saved as models/loras/icedit_moe_lora.safetensors. 'InstructMoLE Load Adapter' reads it "
        "as it is: its experts are routed per token, each token of each routed layer picks its own expert.\n\n"
        "'ICEdit Diptych' puts your image on the left of a diptych and masks the empty right half; Fill paints "
        "that half following the prompt, which must keep ICEdit's sentence and end with your edit. Guidance 50, "
        "28 steps. 'ICEdit Right Half' cuts out the result.\n\n"
        "'Token Expert Map' shows, over the whole diptych, which expert each region used at the last step "
        "('layers': single, double, all, or e.g. single:0-18)."
    )
    layout = ((m, d), (t, s), ("Expert map", NOTE))
    return Workflow("6_icedit_diptych", "ICEdit MoE-LoRA: a diptych edit on FLUX.1 Fill", note, nodes, layout)


WORKFLOWS = (auto_edit, creative_control, route_and_blend, comparison, two_references, icedit_diptych)

# ---- API-style definition -> the frontend's format ---------------------------------------------------------


def _spec(info: dict[str, Any], class_type: str) -> list[tuple[str, Any, dict]]:
    """``(name, type, options)`` of every input, required first, as the frontend orders them."""
    if class_type not in info:
        raise KeyError(f"node type {class_type!r} is not installed on this server")
    inputs = info[class_type]["input"]
    out = []
    for section in ("required", "optional"):
        for name, spec in inputs.get(section, {}).items():
            out.append((name, spec[0], spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}))
    return out


def _is_widget(kind: Any) -> bool:
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _extra_values(kind: Any, options: dict) -> list[Any]:
    """Values the frontend saves after a widget's own: a seed's control mode, an image upload button."""
    if options.get("control_after_generate"):
        return ["fixed"]
    if options.get("image_upload"):
        return ["image"]
    return []


def _height(n_sockets: int, n_widgets: int, tall: int) -> int:
    return 46 + 24 * max(n_sockets, 1) + 26 * n_widgets + tall


def build(workflow: Workflow, info: dict[str, Any]) -> dict[str, Any]:
    """The frontend's saved format (version 0.4) of one definition."""
    nodes, links = [], []
    out_links: dict[tuple[int, int], list[int]] = {}
    order = sorted(workflow.nodes, key=lambda i: (workflow.nodes[i].col, i))
    for node_id in order:
        node = workflow.nodes[node_id]
        sockets, widgets, values = [], [], []
        for name, kind, options in _spec(info, node.class_type):
            value = node.inputs.get(name)
            linked = isinstance(value, list) and len(value) == 2 and isinstance(value[0], int)
            if _is_widget(kind):
                if linked:
                    raise ValueError(f"{workflow.name}: node {node_id} links its widget input {name!r}")
                default = options.get("default", kind[0] if isinstance(kind, list) and kind else None)
                values += [value if name in node.inputs else default, *_extra_values(kind, options)]
                widgets.append(
                    {
                        "name": name,
                        "type": "COMBO" if isinstance(kind, list) else kind,
                        "widget": {"name": name},
                        "link": None,
                    }
                )
                if options.get("image_upload"):
                    widgets.append(
                        {"name": "upload", "type": "IMAGEUPLOAD", "widget": {"name": "upload"}, "link": None}
                    )
                continue
            link_id = None
            if linked:
                link_id = len(links) + 1
                links.append([link_id, value[0], value[1], node_id, len(sockets), kind])
                out_links.setdefault((value[0], value[1]), []).append(link_id)
            sockets.append({"name": name, "type": kind, "link": link_id})
        unknown = set(node.inputs) - {name for name, _, _ in _spec(info, node.class_type)}
        if unknown:
            raise ValueError(f"{workflow.name}: node {node_id} ({node.class_type}) has no input {sorted(unknown)[0]!r}")
        entry: dict[str, Any] = {
            "id": node_id,
            "type": node.class_type,
            "pos": [0, 0],  # placed by _place
            "size": [node.width, _height(len(sockets), len(widgets), node.tall)],
            "flags": {},
            "order": len(nodes),
            "mode": 0,
            "inputs": sockets + widgets,
            "outputs": [],
            "properties": {"Node name for S&R": node.class_type},
            "widgets_values": values,
        }
        if node.title:
            entry["title"] = node.title
        if node.models:
            entry["properties"]["models"] = [
                {"name": name, "url": MODELS[name][0], "directory": MODELS[name][1]} for name in node.models
            ]
        nodes.append(entry)
    for entry in nodes:
        spec = info[entry["type"]]
        names = spec.get("output_name") or spec["output"]
        entry["outputs"] = [
            {"name": name, "type": kind, "links": out_links.get((entry["id"], slot), []), "slot_index": slot}
            for slot, (name, kind) in enumerate(zip(names, spec["output"], strict=True))
        ]
    groups, note_box = _place(workflow, nodes)
    _add_note(workflow, nodes, note_box)
    return {
        "last_node_id": max(n["id"] for n in nodes),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": groups,
        "config": {},
        "extra": {"ds": {"scale": 0.6, "offset": [40, 80]}, "instructmole": {"title": workflow.title}},
        "version": 0.4,
    }


def _stack(entries: list[dict]) -> int:
    """Height of nodes stacked in one column, from the first node's pos to the last node's bottom."""
    return sum(e["size"][1] for e in entries) + (len(entries) - 1) * (NODE_TITLE + GAP_Y)


def _place(workflow: Workflow, nodes: list[dict]) -> tuple[list[dict], list[int]]:
    """Set every node's ``pos`` from the workflow's layout; returns the groups (frontend format) and
    the Note's box ``[x, y, width, height]`` (its pos and size: the title bar sits above it).

    A group is a block of node columns (a column as wide as its widest node, its nodes stacked by
    id), its title band above them and a margin around; groups are stacked in the layout's
    columns, and a layout column is as wide as its widest group. So every box is disjoint by
    construction, which tests/test_workflow_layout.py checks on the files."""
    by_id = {n["id"]: n for n in nodes}
    members: dict[str, dict[int, list[dict]]] = {}
    for node_id, node in sorted(workflow.nodes.items()):
        if not node.group:
            raise ValueError(f"{workflow.name}: node {node_id} ({node.class_type}) is in no group")
        members.setdefault(node.group, {}).setdefault(node.col, []).append(by_id[node_id])
    placed = [name for column in workflow.layout for name in column if name != NOTE]
    if sorted(placed) != sorted(members):
        raise ValueError(f"{workflow.name}: the layout places groups {sorted(placed)}, the nodes use {sorted(members)}")

    def size(name: str) -> tuple[int, int]:
        columns = [members[name][c] for c in sorted(members[name])]
        width = sum(max(e["size"][0] for e in col) for col in columns) + GAP_X * (len(columns) - 1)
        return width + 2 * GROUP_PAD, GROUP_TOP + max(_stack(col) for col in columns) + GROUP_PAD

    groups: list[dict] = []
    note_box: list[int] | None = None
    x = 0
    for column in workflow.layout:
        column_width = max([size(name)[0] for name in column if name != NOTE] + [NOTE_WIDTH] * (NOTE in column))
        y = 0
        for name in column:
            if name == NOTE:  # the Note's title bar goes where a group's top edge would
                note_box = [x, y + NODE_TITLE, column_width, NOTE_HEIGHT]
                y += NODE_TITLE + NOTE_HEIGHT + GROUP_GAP
                continue
            width, height = size(name)
            node_x = x + GROUP_PAD
            for c in sorted(members[name]):
                node_y = y + GROUP_TOP
                for entry in members[name][c]:
                    entry["pos"] = [node_x, node_y]
                    node_y += entry["size"][1] + NODE_TITLE + GAP_Y
                node_x += max(e["size"][0] for e in members[name][c]) + GAP_X
            groups.append(
                {
                    "id": len(groups) + 1,
                    "title": name,
                    "bounding": [x, y, width, height],
                    "color": GROUP_COLOURS[len(groups) % len(GROUP_COLOURS)],
                    "font_size": GROUP_FONT,
                    "flags": {},
                }
            )
            y += height + GROUP_GAP
        x += column_width + GROUP_GAP
    if note_box is None:  # under everything, as wide as the whole graph
        bottom = max(g["bounding"][1] + g["bounding"][3] for g in groups)
        note_box = [0, bottom + GROUP_GAP + NODE_TITLE, max(x - GROUP_GAP, NOTE_WIDTH), NOTE_HEIGHT]
    return groups, note_box


def _add_note(workflow: Workflow, nodes: list[dict], box: list[int]) -> None:
    nodes.append(
        {
            "id": max(n["id"] for n in nodes) + 1,
            "type": "Note",
            "pos": box[:2],
            "size": box[2:],
            "flags": {},
            "order": len(nodes),
            "mode": 0,
            "inputs": [],
            "outputs": [],
            "properties": {},
            "widgets_values": [workflow.note],
            "title": f"About: {workflow.title}",
        }
    )


# ---- the frontend's format -> the prompt it queues ---------------------------------------------------------


def to_prompt(ui: dict[str, Any], info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The API prompt of a saved workflow, as the frontend's ``graphToPrompt`` builds it."""
    links = {link[0]: link for link in ui["links"]}
    prompt: dict[str, dict[str, Any]] = {}
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        if node.get("mode", 0) != 0:
            raise ValueError(
                f"node {node['id']} ({node['type']}) is muted or bypassed; shipped workflows run every node"
            )
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs: dict[str, Any] = {}
        for name, kind, options in _spec(info, node["type"]):
            if name in linked:
                link = linked[name]
                inputs[name] = [str(link[1]), link[2]]
                if _is_widget(kind):
                    values.pop(0)
                    values = values[len(_extra_values(kind, options)) :]
                continue
            if _is_widget(kind):
                if not values:
                    raise ValueError(f"node {node['id']} ({node['type']}) has no saved value for {name!r}")
                inputs[name] = values.pop(0)
                values = values[len(_extra_values(kind, options)) :]
        if values:
            raise ValueError(f"node {node['id']} ({node['type']}) has {len(values)} saved values no input takes")
        entry: dict[str, Any] = {"class_type": node["type"], "inputs": inputs}
        if node.get("title"):
            entry["_meta"] = {"title": node["title"]}
        prompt[str(node["id"])] = entry
    return prompt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running ComfyUI with this pack (its /object_info is read)")
    parser.add_argument("--object-info", help="or a saved /object_info JSON file")
    parser.add_argument("--out", default=str(ROOT / "workflows"))
    args = parser.parse_args(argv)
    if str(ROOT) not in sys.path:  # run as a file: the ICEdit workflow reads its prompt from instructmole
        sys.path.insert(0, str(ROOT))
    if args.url:
        import urllib.request

        with urllib.request.urlopen(f"{args.url.rstrip('/')}/object_info", timeout=60) as r:
            info = json.load(r)
    elif args.object_info:
        info = json.loads(Path(args.object_info).read_text())
    else:
        parser.error("give --url or --object-info")
    for make in WORKFLOWS:
        workflow = make()
        path = Path(args.out, f"{workflow.name}.json")
        path.write_text(json.dumps(build(workflow, info), indent=1) + "\n")
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
