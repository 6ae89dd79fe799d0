"""The example workflows, as data: eight graphs and their layouts, built from shared parts.

Each workflow is written once, here, as an API-style graph (``class_type`` + ``inputs``, links as
``[node, slot]``) plus what only the canvas has: titles, node sizes the frontend keeps, a Note, and a
``layout`` (the canvas as columns of groups, each group as columns of node ids). What several
workflows share is written once too: the nodes every workflow uses the same way (loaders, text
encode, sampler, decode, save, the council nodes), the parts they form (the model and adapter
chain, the text and the image to edit, sampling) and those parts' groups. The loaders' ``models``
metadata (file names, folders, public download URLs) follows from the files they load (``MODELS``).
No coordinates are written here: ``workflow_format.place`` computes them from the layout, and
``workflow_format.build`` writes the frontend's format (``to_prompt`` reads it back).

Rebuild the shipped files after changing a definition or a node's inputs, each against the oldest
ComfyUI that has every node it uses (newer ones give some core nodes more sockets or widgets): the six
FLUX.1 workflows against v0.3.64, the Qwen-Image-Edit and FLUX.2 [klein] ones (``FAMILY_WORKFLOWS``)
against v0.33 (v0.3.64 has no FLUX.2 nodes; before v0.33, CFGNorm has no ``pre_cfg``). A server with
this pack (``tests.comfyui.server.start_server(comfy_path, base, {"instructmole": repo})``), then::

    python -m scripts.workflows --url http://127.0.0.1:8188 --only flux1      # v0.3.64: 1_... to 6_...
    python -m scripts.workflows --url http://127.0.0.1:8189 --only families   # v0.33: 7_... and 8_...

``--only`` also takes workflow names, comma-separated (``--only 7_qwen_image_edit``); without it every
workflow is written from the one server.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if not __package__:  # run as a file (python scripts/workflows.py): import as ``python -m scripts.workflows`` does
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.workflow_format import (  # after the path fix above
    FRONTEND_ONLY,
    GROUP_FONT,
    NODE_TITLE,
    NODE_WIDTH,
    NOTE,
    Group,
    ModelFile,
    Node,
    Workflow,
    build,
    to_prompt,
)

__all__ = [
    "FAMILY_WORKFLOWS",
    "FLUX1_WORKFLOWS",
    "FRONTEND_ONLY",
    "GROUP_FONT",
    "NODE_TITLE",
    "WORKFLOWS",
    "Workflow",
    "build",
    "main",
    "to_prompt",
]

ROOT = Path(__file__).resolve().parent.parent

# ---- what the workflows load (public files; the adapter is yours: train or convert one) -------------------

HF = "https://huggingface.co"
KONTEXT = "flux1-dev-kontext_fp8_scaled.safetensors"
CLIP_L, T5 = "clip_l.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors"
VAE = "ae.safetensors"
ADAPTER = "instructmole_kontext.safetensors"
FILL = "flux1-fill-dev.safetensors"
ICEDIT = "icedit_moe_lora.safetensors"  # ICEdit's MoE-LoRA, saved under this name in models/loras
# Qwen-Image-Edit-2511 and FLUX.2 [klein] 4B: the files ComfyUI's own templates load (image_qwen_image_edit_2511,
# image_flux2_klein_image_edit_4b_distilled in comfyui-workflow-templates), and the adapters trained for them.
QWEN_EDIT = "qwen_image_edit_2511_fp8mixed.safetensors"
QWEN_VL = "qwen_2.5_vl_7b_fp8_scaled.safetensors"
QWEN_VAE = "qwen_image_vae.safetensors"
QWEN_ADAPTER = "instructmole_qwen_image_edit.safetensors"
KLEIN = "flux-2-klein-4b-fp8.safetensors"
QWEN3 = "qwen_3_4b.safetensors"
FLUX2_VAE = "flux2-vae.safetensors"
KLEIN_ADAPTER = "instructmole_flux2_klein.safetensors"
ADAPTERS = (ADAPTER, QWEN_ADAPTER, KLEIN_ADAPTER)  # yours to train: no download
MODELS = {
    m.name: m
    for m in (
        ModelFile(
            KONTEXT,
            f"{HF}/Comfy-Org/flux1-kontext-dev_ComfyUI/resolve/main/split_files/diffusion_models/{KONTEXT}",
            "diffusion_models",
        ),
        ModelFile(CLIP_L, f"{HF}/comfyanonymous/flux_text_encoders/resolve/main/{CLIP_L}", "text_encoders"),
        ModelFile(T5, f"{HF}/comfyanonymous/flux_text_encoders/resolve/main/{T5}", "text_encoders"),
        ModelFile(VAE, f"{HF}/Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/vae/{VAE}", "vae"),
        ModelFile(FILL, f"{HF}/black-forest-labs/FLUX.1-Fill-dev/resolve/main/{FILL}", "diffusion_models"),
        ModelFile(
            QWEN_EDIT,
            f"{HF}/Comfy-Org/Qwen-Image-Edit_ComfyUI/resolve/main/split_files/diffusion_models/{QWEN_EDIT}",
            "diffusion_models",
        ),
        ModelFile(
            QWEN_VL,
            f"{HF}/Comfy-Org/HunyuanVideo_1.5_repackaged/resolve/main/split_files/text_encoders/{QWEN_VL}",
            "text_encoders",
        ),
        ModelFile(QWEN_VAE, f"{HF}/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files/vae/{QWEN_VAE}", "vae"),
        ModelFile(KLEIN, f"{HF}/black-forest-labs/FLUX.2-klein-4b-fp8/resolve/main/{KLEIN}", "diffusion_models"),
        ModelFile(
            QWEN3, f"{HF}/Comfy-Org/z_image_turbo/resolve/main/split_files/text_encoders/{QWEN3}", "text_encoders"
        ),
        ModelFile(FLUX2_VAE, f"{HF}/Comfy-Org/flux2-dev/resolve/main/split_files/vae/{FLUX2_VAE}", "vae"),
    )
}
INSTRUCTION = "Make the sky a stormy purple at dusk, keep everything else unchanged"

# Room the frontend needs (the browser tests fail when it draws a node larger than the file says):
# the expert grid with a group unfolded (block rules: its table scrolls past 400 px) or folded; the
# Council Preview 700 px tall, room for the map of a FLUX.1 council after a run (57 layers: 602 px,
# preferredHeight in web/lib/council_map.mjs) and 440 wide, as the map widens it; nodes with long
# titles (the frontend widens a node to its title); an image preview; a text box of a few lines.
OVERRIDE_GRID_OPEN = 470
OVERRIDE_GRID_FOLDED = 200
PREVIEW_TALL = 630
PREVIEW_WIDTH = 440
LONG_TITLE_WIDTH = 380
IMAGE_TALL = 260
TEXT_TALL = 60

# ---- the nodes the workflows share, each written once ------------------------------------------------------


def node(
    class_type: str, inputs: dict[str, Any], title: str | None = None, tall: int = 0, width: int = NODE_WIDTH
) -> Node:
    """A node; the public files among its inputs (``MODELS``) give it the frontend's ``models`` metadata."""
    files = tuple(MODELS[v] for v in inputs.values() if isinstance(v, str) and v in MODELS)
    return Node(class_type, inputs, title=title, tall=tall, width=width, models=files)


def unet(file: str = KONTEXT) -> Node:
    return node("UNETLoader", {"unet_name": file, "weight_dtype": "default"})


def load_adapter(model: list, adapter: str = ADAPTER, title: str | None = None, width: int = NODE_WIDTH) -> Node:
    inputs = {"model": model, "adapter": adapter, "lora_strength": 1.0, "expert_strength": 1.0}
    return node("InstructMoLE_LoadAdapter", inputs, title=title, width=width)


def dual_clip() -> Node:
    return node("DualCLIPLoader", {"clip_name1": CLIP_L, "clip_name2": T5, "type": "flux", "device": "default"})


def vae_loader() -> Node:
    return node("VAELoader", {"vae_name": VAE})


def load_image(image: str, title: str | None = None) -> Node:
    return node("LoadImage", {"image": image}, title=title, tall=IMAGE_TALL)


def guidance(conditioning: list, value: float) -> Node:
    return node("FluxGuidance", {"conditioning": conditioning, "guidance": value})


def empty_negative(positive: list) -> Node:
    """The empty negative (cfg 1.0: Flux is guidance-distilled)."""
    return node("ConditioningZeroOut", {"conditioning": positive}, title="Negative (empty)")


def ksampler(
    model: list,
    positive: list,
    negative: list,
    latent: list,
    steps: int,
    title: str | None = None,
    cfg: float = 1.0,
) -> Node:
    """Euler / simple and a fixed seed (0); cfg 1.0 (FLUX.1 is guidance-distilled) unless told."""
    inputs = {
        "model": model,
        "positive": positive,
        "negative": negative,
        "latent_image": latent,
        "seed": 0,
        "steps": steps,
        "cfg": cfg,
        "sampler_name": "euler",
        "scheduler": "simple",
        "denoise": 1.0,
    }
    return node("KSampler", inputs, title=title)


def save_image(images: list, prefix: str) -> Node:
    return node("SaveImage", {"images": images, "filename_prefix": prefix}, tall=IMAGE_TALL)


def route(
    adapter: list,
    title: str | None = None,
    *,
    conditioning: list | None = None,
    clip: list | None = None,
    text: str = "",
) -> Node:
    """Route by the Text Encode ``conditioning`` (its instruction, typed once), or by ``clip`` and a
    ``text`` of its own (its text box gets room for a few lines)."""
    inputs = {"adapter": adapter, "conditioning": conditioning, "clip": clip, "text": text}
    inputs = {k: v for k, v in inputs.items() if v is not None}
    return node("InstructMoLE_Route", inputs, title=title, tall=TEXT_TALL if text else 0)


def override_council(council: list, rules: str, tall: int, title: str | None = None) -> Node:
    return node("InstructMoLE_OverrideCouncil", {"council": council, "rules": rules}, title=title, tall=tall)


def apply_council(model: list, council: list) -> Node:
    """Merged: the council folded into the weights, so sampling costs what the base model costs."""
    return node("InstructMoLE_ApplyCouncil", {"model": model, "council": council, "mode": "merged"})


def council_preview(council: list, title: str) -> Node:
    inputs = {"council": council}
    return node("InstructMoLE_CouncilPreview", inputs, title=title, tall=PREVIEW_TALL, width=PREVIEW_WIDTH)


# ---- the parts the workflows share, with their groups ------------------------------------------------------
# A part's node ids are fixed, so its group (columns of ids) is written beside it.


def model_and_adapter(
    file: str = KONTEXT, adapter: str = ADAPTER, title: str | None = None, width: int = NODE_WIDTH
) -> dict[int, Node]:
    """A diffusion model (1) and the adapter loaded onto it (2)."""
    return {1: unet(file), 2: load_adapter([1, 0], adapter, title, width)}


MODEL_AND_ADAPTER = Group("Model", ((1, 2),))


def model_and_adapter_file() -> dict[int, Node]:
    """Kontext (1), the adapter alone (2) (routing and rules are checked before the model loads),
    and the adapter applied to the model (3)."""
    apply = {"model": [1, 0], "adapter": [2, 0], "lora_strength": 1.0, "expert_strength": 1.0}
    return {
        1: unet(),
        2: node("InstructMoLE_AdapterFile", {"adapter": ADAPTER}),
        3: node("InstructMoLE_ApplyAdapter", apply),
    }


MODEL_AND_ADAPTER_FILE = Group("Model", ((1, 2), (3,)))


def text_and_image(adapter: list, instruction: str = INSTRUCTION, image: str = "example.png") -> dict[int, Node]:
    """CLIP (10), the instruction (11) encoded for ``adapter`` (its training text length), its empty
    negative (20); the VAE (12), the image to edit (13), scaled (14) and encoded (15); the image
    appended to the instruction as a reference latent (16) and the guidance (17). Positive: [17, 0];
    negative: [20, 0]; latent: [15, 0]; VAE: [12, 0]."""
    text = {"clip": [10, 0], "text": instruction, "adapter": adapter}
    return {
        10: dual_clip(),
        11: node("InstructMoLE_TextEncode", text, tall=TEXT_TALL),
        12: vae_loader(),
        13: load_image(image),
        14: node("FluxKontextImageScale", {"image": [13, 0]}),
        15: node("VAEEncode", {"pixels": [14, 0], "vae": [12, 0]}),
        16: node("ReferenceLatent", {"conditioning": [11, 0], "latent": [15, 0]}),
        17: guidance([16, 0], 2.5),
        20: empty_negative([11, 0]),
    }


TEXT = Group("Text", ((10, 11, 20), (16, 17)))  # the second column: the reference latent and guidance
IMAGE = Group("Image to edit", ((12, 13), (14, 15)))


def sample(
    first: int,
    model: list,
    positive: list,
    negative: list,
    latent: list,
    vae: list,
    *,
    steps: int = 20,
    prefix: str | None = None,
    title: str | None = None,
) -> dict[int, Node]:
    """KSampler (``first``) -> VAE Decode (``first + 1``) -> Save Image when ``prefix`` (``first + 2``)."""
    out = {
        first: ksampler(model, positive, negative, latent, steps, title),
        first + 1: node("VAEDecode", {"samples": [first, 0], "vae": vae}),
    }
    if prefix:
        out[first + 2] = save_image([first + 1, 0], prefix)
    return out


def kontext_sample(first: int, model: list, prefix: str | None = None, title: str | None = None) -> dict[int, Node]:
    """``sample`` of the parts of ``text_and_image``: its guidance, negative, latent and VAE."""
    return sample(first, model, [17, 0], [20, 0], [15, 0], [12, 0], prefix=prefix, title=title)


SAMPLING = Group("Sampling", ((30, 31), (32,)))  # kontext_sample(30, ...) with a prefix


def apply_and_preview(first: int, model: list, council: list, title: str) -> dict[int, Node]:
    """Apply Council (``first``) and the Council Preview (``first + 1``) of the same council."""
    return {first: apply_council(model, council), first + 1: council_preview(council, title)}


# ---- the six FLUX.1 workflows -------------------------------------------------------------------------------


def auto_edit() -> Workflow:
    load = {
        "unet_name": KONTEXT,
        "weight_dtype": "default",
        "adapter": ADAPTER,
        "lora_strength": 1.0,
        "expert_strength": 1.0,
    }
    nodes = {
        1: node("InstructMoLE_LoadKontext", load),
        **text_and_image([1, 1]),
        **kontext_sample(30, [1, 0], prefix="instructmole_auto"),
    }
    note = (
        "InstructMoLE, auto routing (the recommended way)\n\n"
        "'InstructMoLE Load Kontext + Adapter' loads FLUX.1 Kontext [dev] and the adapter in one node. Each image is "
        "routed from its own instruction: the router reads the text and picks, per layer, a council of experts.\n\n"
        "'InstructMoLE Text Encode' is CLIP Text Encode plus the exact routing signal the adapter was trained with: "
        "use it for the instruction.\n\n"
        "Put your image in 'Load Image', type the edit, press Run. Files: see the README of workflows/."
    )
    layout = ((Group("Model", ((1,),)), IMAGE), (TEXT,), (SAMPLING, NOTE))
    return Workflow("1_auto_edit", "Kontext edit, auto routing", note, nodes, layout)


def creative_control() -> Workflow:
    nodes = {
        **model_and_adapter_file(),
        **text_and_image([2, 0]),
        40: route([2, 0], "Route (the instruction of Text Encode)", conditioning=[11, 0]),
        41: override_council([40, 0], "double:0-9 force 1\nsingle ban 2", OVERRIDE_GRID_OPEN),
        **apply_and_preview(42, [3, 0], [41, 0], "Council map"),
        **kontext_sample(30, [42, 0], prefix="instructmole_council"),
    }
    note = (
        "InstructMoLE, creative control\n\n"
        "'InstructMoLE Adapter File' loads the adapter alone, so routing and your rules are checked before the "
        "diffusion model loads. 'Route' reads the instruction from the Text Encode conditioning (type it once).\n\n"
        "'Override Council' edits the council: click the grid (auto -> force -> ban) or write rules, e.g. "
        "'double:0-9 force 1' or 'single ban 2'. The council map shows which experts each layer uses.\n\n"
        "'Apply Council' (merged) folds the council into the weights: sampling then costs what the base model costs."
    )
    council = Group("Council", ((40, 41), (42, 43)))
    layout = ((MODEL_AND_ADAPTER_FILE, IMAGE, NOTE), (TEXT, SAMPLING), (council,))
    return Workflow("2_creative_control", "Creative control: override and apply a council", note, nodes, layout)


def route_and_blend() -> Workflow:
    other = "Turn the scene into a watercolour painting"
    blend = {"council_a": [40, 0], "council_b": [41, 0], "factor": 0.5, "layers": "all"}
    nodes = {
        **model_and_adapter_file(),
        **text_and_image([2, 0]),
        40: route([2, 0], "Route: the edit", conditioning=[11, 0]),
        41: route([2, 0], "Route: another instruction", clip=[10, 0], text=other),
        42: node("InstructMoLE_BlendCouncils", blend),
        **apply_and_preview(43, [3, 0], [42, 0], "Council map (blend)"),
        **kontext_sample(30, [43, 0], prefix="instructmole_blend"),
    }
    note = (
        "InstructMoLE, routing by another instruction\n\n"
        "The image is edited by the Text Encode instruction, but the experts can come from elsewhere: "
        "'Route: another instruction' picks the councils a different edit would use, and 'Blend Councils' mixes "
        "the two (factor 0 = the edit's own councils, 1 = the other's; 'layers' limits it, e.g. 'single').\n\n"
        "Connect 'Route: another instruction' straight to 'Apply Council' to route by it alone."
    )
    council = Group("Council", ((40, 41, 42), (43, 44)))
    layout = ((MODEL_AND_ADAPTER_FILE, IMAGE, NOTE), (TEXT, SAMPLING), (council,))
    return Workflow("3_route_and_blend", "Route by another instruction, blend two councils", note, nodes, layout)


def comparison() -> Workflow:
    nodes = {
        **model_and_adapter(),
        **text_and_image([2, 1]),
        40: route([2, 1], conditioning=[11, 0]),
        41: override_council([40, 0], "all top 1", OVERRIDE_GRID_FOLDED, "Council A: one expert per layer"),
        45: override_council([40, 0], "all scale 2", OVERRIDE_GRID_FOLDED, "Council B: experts at double weight"),
        43: apply_council([2, 0], [41, 0]),
        44: apply_council([2, 0], [45, 0]),
    }
    models = (([1, 0], "base"), ([2, 0], "auto"), ([43, 0], "council A"), ([44, 0], "council B"))
    for i, (model, title) in enumerate(models):  # samplers 50, 53, 56, 59; decoders 51, 54, 57, 60
        nodes.update(kontext_sample(50 + 3 * i, model, title=f"KSampler: {title}"))
    stitch = {"direction": "right", "match_image_size": True, "spacing_width": 8, "spacing_color": "white"}
    pairs = (([51, 0], [54, 0]), ([70, 0], [57, 0]), ([71, 0], [60, 0]))
    for node_id, (left, right) in zip((70, 71, 72), pairs, strict=True):
        nodes[node_id] = node("ImageStitch", {"image1": left, "image2": right, **stitch})
    nodes[73] = save_image([72, 0], "instructmole_comparison")
    note = (
        "InstructMoLE, a comparison\n\n"
        "One image, one instruction, one seed, four models, side by side (left to right): the base Kontext, the "
        "adapter with auto routing, and two hand-made councils (A: each layer keeps only its strongest expert; "
        "B: every expert weight doubled). Change the rules of A and B to compare your own councils."
    )
    # Override Councils end their columns: after a run each grows downwards to show its map. The four
    # samplers in two columns (base, council A | auto, council B), their decoders in a third, the
    # stitches and the saved image in a fourth and fifth.
    councils = Group("Councils", ((40, 41), (43, 44, 45)))
    four_ways = Group("Four ways, one seed", ((50, 56), (53, 59), (51, 54, 57, 60), (70, 71, 72), (73,)))
    layout = ((MODEL_AND_ADAPTER, IMAGE), (TEXT, councils), (four_ways, NOTE))
    return Workflow("4_comparison", "Comparison: base, auto and two councils", note, nodes, layout)


def two_references() -> Workflow:
    nodes = {
        **model_and_adapter(),
        **text_and_image([2, 1], "Put the cat from the second image on the sofa in the first image"),
        60: load_image("example_2.png", "Load Image (second reference)"),
        61: node("FluxKontextImageScale", {"image": [60, 0]}),
        62: node("VAEEncode", {"pixels": [61, 0], "vae": [12, 0]}),
        63: node("ReferenceLatent", {"conditioning": [17, 0], "latent": [62, 0]}, title="ReferenceLatent (second)"),
        **sample(30, [2, 0], [63, 0], [20, 0], [15, 0], [12, 0], prefix="instructmole_two_references"),
    }
    note = (
        "InstructMoLE with two reference images\n\n"
        "Kontext takes several references: each 'ReferenceLatent' appends one image to the conditioning (ComfyUI "
        "places them side by side in the model's positions, as it does without InstructMoLE). The adapter routes "
        "from the instruction as usual (auto). The output has the size of the first image."
    )
    text = Group("Text", (TEXT.columns[0], (*TEXT.columns[1], 63)))  # the second reference latent under the first
    second = Group("Second reference", ((60,), (61, 62)))
    layout = ((MODEL_AND_ADAPTER, IMAGE), (text, second), (SAMPLING, NOTE))
    return Workflow("5_two_references", "Two reference images (multi-reference Kontext)", note, nodes, layout)


def icedit_diptych() -> Workflow:
    from instructmole.icedit import ICEDIT_PROMPT

    prompt = ICEDIT_PROMPT + "make the sky a stormy purple at dusk"
    diptych = {"positive": [12, 0], "negative": [13, 0], "vae": [14, 0], "pixels": [16, 0], "mask": [16, 1]}
    nodes = {
        **model_and_adapter(FILL, ICEDIT, title="InstructMoLE Load Adapter (ICEdit MoE-LoRA)", width=LONG_TITLE_WIDTH),
        10: dual_clip(),
        11: node(
            "CLIPTextEncode",
            {"clip": [10, 0], "text": prompt},
            title="Prompt (ICEdit's diptych sentence + your edit)",
            tall=80,
            width=LONG_TITLE_WIDTH,
        ),
        12: guidance([11, 0], 50.0),
        13: empty_negative([11, 0]),
        14: vae_loader(),
        15: load_image("example.png"),
        16: node("InstructMoLE_ICEditDiptych", {"image": [15, 0], "width": 512}),
        17: node("InpaintModelConditioning", {**diptych, "noise_mask": False}),
        **sample(30, [2, 0], [17, 0], [17, 1], [17, 2], [14, 0], steps=28),
        32: node("InstructMoLE_ICEditRightHalf", {"image": [31, 0]}),
        33: save_image([32, 0], "icedit"),
        40: node(
            "InstructMoLE_TokenExpertMap",
            {"model": [2, 0], "samples": [30, 0], "layers": "single", "image": [31, 0], "opacity": 0.55},
            title="Which expert each region used",
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
    layout = (
        (MODEL_AND_ADAPTER, Group("Diptych", ((14, 15), (16, 17)))),
        (Group("Text", ((10, 11), (12, 13))), Group("Sampling", ((30, 31), (32, 33)))),
        (Group("Expert map", ((40,),)), NOTE),
    )
    return Workflow("6_icedit_diptych", "ICEdit MoE-LoRA: a diptych edit on FLUX.1 Fill", note, nodes, layout)


# ---- the other model families: Qwen-Image-Edit-2511 and FLUX.2 [klein] --------------------------------------


def qwen_edit_encode(adapter: list, text: str, title: str | None = None) -> Node:
    """The instruction with the picture to edit (scaled, 14) for Qwen2.5-VL and as a reference latent (VAE 12)."""
    inputs = {"clip": [10, 0], "text": text, "vae": [12, 0], "image1": [14, 0], "adapter": adapter}
    return node(
        "InstructMoLE_TextEncodeQwenImageEdit",
        inputs,
        title=title,
        tall=TEXT_TALL if text else 0,
        width=LONG_TITLE_WIDTH,
    )


def route_and_preview(adapter: list, conditioning: list) -> dict[int, Node]:
    """Route (40) the Text Encode instruction and the Council Preview (41) of its council."""
    return {
        40: route(adapter, "Route (the instruction of Text Encode)", conditioning=conditioning),
        41: council_preview([40, 0], "Council map (auto routing picks it per image)"),
    }


def qwen_image_edit() -> Workflow:
    nodes = {
        1: unet(QWEN_EDIT),
        2: load_adapter([1, 0], QWEN_ADAPTER),
        3: node("ModelSamplingAuraFlow", {"model": [2, 0], "shift": 3.1}),
        4: node("CFGNorm", {"model": [3, 0], "strength": 1.0}),
        10: node("CLIPLoader", {"clip_name": QWEN_VL, "type": "qwen_image", "device": "default"}),
        11: qwen_edit_encode([2, 1], INSTRUCTION),
        20: qwen_edit_encode([2, 1], "", "Negative (empty instruction, same picture)"),
        12: node("VAELoader", {"vae_name": QWEN_VAE}),
        13: load_image("example.png"),
        14: node("FluxKontextImageScale", {"image": [13, 0]}),
        15: node("VAEEncode", {"pixels": [14, 0], "vae": [12, 0]}),
        30: ksampler([4, 0], [11, 0], [20, 0], [15, 0], 20, cfg=4.0),
        31: node("VAEDecode", {"samples": [30, 0], "vae": [12, 0]}),
        32: save_image([31, 0], "instructmole_qwen_edit"),
        **route_and_preview([2, 1], [11, 0]),
    }
    note = (
        "InstructMoLE on Qwen-Image-Edit-2511\n\n"
        "'InstructMoLE Load Adapter' puts an adapter trained for Qwen-Image-Edit-2511 on the model. 'InstructMoLE "
        "Text Encode (Qwen-Image-Edit)' is ComfyUI's Qwen Edit Plus encode (the picture for Qwen2.5-VL, and as a "
        "reference latent) plus the exact routing signal: the router reads the instruction alone, as in training. "
        "The negative is the same node with an empty instruction and the same picture, as in ComfyUI's template: "
        "with CFG 4 it runs, routed from that empty instruction.\n\n"
        "Sampling as ComfyUI's Qwen-Image-Edit-2511 template: AuraFlow shift 3.1, CFGNorm, CFG 4, 20 steps (Qwen's "
        "own setting: 40). The council map shows the experts the instruction picks. Files: see the README of "
        "workflows/."
    )
    model = Group("Model", ((1, 2), (3, 4)))
    text = Group("Text and picture", ((10, 11, 20),))
    sampling = Group("Sampling", ((30, 31), (32,)))
    council = Group("Council", ((40, 41),))
    layout = ((model, IMAGE), (text, sampling), (council, NOTE))
    return Workflow("7_qwen_image_edit", "Qwen-Image-Edit-2511 edit, auto routing", note, nodes, layout)


def flux2_klein_edit() -> Workflow:
    size = {"width": [17, 0], "height": [17, 1]}  # of the scaled picture (Get Image Size)
    guider = {"model": [2, 0], "positive": [16, 0], "negative": [21, 0], "cfg": 1.0}
    sampler = {"noise": [32, 0], "guider": [34, 0], "sampler": [33, 0], "sigmas": [31, 0], "latent_image": [30, 0]}
    nodes = {
        1: unet(KLEIN),
        2: load_adapter([1, 0], KLEIN_ADAPTER),
        10: node("CLIPLoader", {"clip_name": QWEN3, "type": "flux2", "device": "default"}),
        11: node("InstructMoLE_TextEncode", {"clip": [10, 0], "text": INSTRUCTION, "adapter": [2, 1]}, tall=TEXT_TALL),
        20: empty_negative([11, 0]),
        16: node("ReferenceLatent", {"conditioning": [11, 0], "latent": [15, 0]}),
        21: node("ReferenceLatent", {"conditioning": [20, 0], "latent": [15, 0]}, title="ReferenceLatent (negative)"),
        12: node("VAELoader", {"vae_name": FLUX2_VAE}),
        13: load_image("example.png"),
        14: node(
            "ImageScaleToTotalPixels",
            {"image": [13, 0], "upscale_method": "nearest-exact", "megapixels": 1.0, "resolution_steps": 1},
        ),
        15: node("VAEEncode", {"pixels": [14, 0], "vae": [12, 0]}),
        17: node("GetImageSize", {"image": [14, 0]}),
        30: node("EmptyFlux2LatentImage", {**size, "batch_size": 1}),
        31: node("Flux2Scheduler", {"steps": 4, **size}),
        32: node("RandomNoise", {"noise_seed": 0}),
        33: node("KSamplerSelect", {"sampler_name": "euler"}),
        34: node("CFGGuider", guider),
        35: node("SamplerCustomAdvanced", sampler),
        36: node("VAEDecode", {"samples": [35, 0], "vae": [12, 0]}),
        37: save_image([36, 0], "instructmole_klein_edit"),
        **route_and_preview([2, 1], [11, 0]),
    }
    note = (
        "InstructMoLE on FLUX.2 [klein] 4B\n\n"
        "'InstructMoLE Load Adapter' puts an adapter trained for FLUX.2 [klein] 4B on the model. 'InstructMoLE Text "
        "Encode' knows FLUX.2 by its text encoder (Qwen3 4B): the conditioning is ComfyUI's own encode in Klein's "
        "chat template, and the router reads the instruction's own tokens, as in training. 'ReferenceLatent' "
        "appends the picture to the instruction and to the empty negative.\n\n"
        "Sampling as ComfyUI's Klein 4B edit template: the picture scaled to 1 megapixel, an empty latent of its "
        "size, Flux2Scheduler, 4 steps, CFG 1 (the distilled model: the negative never runs). With Klein Base 4B "
        "(flux-2-klein-base-4b-fp8) use 20 steps and CFG 5. The council map shows the experts the instruction "
        "picks. Files: see the README of workflows/."
    )
    text = Group("Text", ((10, 11, 20), (16, 21)))
    image = Group("Image to edit", ((12, 13), (14, 15)))
    sampling = Group("Sampling", ((17, 30, 31), (32, 33, 34), (35, 36, 37)))
    council = Group("Council", ((40, 41),))
    layout = ((MODEL_AND_ADAPTER, image), (text, sampling), (council, NOTE))
    return Workflow("8_flux2_klein_edit", "FLUX.2 [klein] 4B edit, auto routing", note, nodes, layout)


FLUX1_WORKFLOWS = (auto_edit, creative_control, route_and_blend, comparison, two_references, icedit_diptych)
FAMILY_WORKFLOWS = (qwen_image_edit, flux2_klein_edit)  # built against v0.33 (see the module's docstring)
WORKFLOWS = FLUX1_WORKFLOWS + FAMILY_WORKFLOWS
SELECTIONS = {"flux1": FLUX1_WORKFLOWS, "families": FAMILY_WORKFLOWS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running ComfyUI with this pack (its /object_info is read)")
    parser.add_argument("--object-info", help="or a saved /object_info JSON file")
    parser.add_argument("--out", default=str(ROOT / "workflows"))
    parser.add_argument(
        "--only",
        help="write only these: 'flux1', 'families', or workflow names, comma-separated (e.g. 7_qwen_image_edit)",
    )
    args = parser.parse_args(argv)
    chosen = WORKFLOWS
    if args.only:
        names = {make().name: make for make in WORKFLOWS}
        chosen = ()
        for item in (i.strip() for i in args.only.split(",") if i.strip()):
            if item not in SELECTIONS and item not in names:
                parser.error(f"--only: no workflow {item!r} (choose from flux1, families, {', '.join(names)})")
            chosen += tuple(m for m in SELECTIONS.get(item, (names.get(item),)) if m not in chosen)
    if args.url:
        import urllib.request

        with urllib.request.urlopen(f"{args.url.rstrip('/')}/object_info", timeout=60) as r:
            info = json.load(r)
    elif args.object_info:
        info = json.loads(Path(args.object_info).read_text())
    else:
        parser.error("give --url or --object-info")
    for make in chosen:
        workflow = make()
        path = Path(args.out, f"{workflow.name}.json")
        path.write_text(json.dumps(build(workflow, info), indent=1) + "\n")
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
