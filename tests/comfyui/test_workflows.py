"""Every shipped workflow (workflows/*.json) runs end to end in a real headless ComfyUI.

Only the file loaders are swapped, for test-only tiny ones (the tiny Flux, the tiny CLIP, a random
TAESD, a random adapter, generated input images); every other node runs exactly as shipped. A
workflow that gains a node type this test does not know, loses its Note or models metadata, or
drifts from its definition in scripts/workflows.py fails here.

The files are compared with what their definitions build on the running ComfyUI, on what the pack
owns: every node, link, widget value, title, size, position and group. The sockets of core nodes
that a workflow leaves unconnected are the core's: a ComfyUI that gives a core node a new output
(v0.33's SaveImage gained an IMAGE output) changes the built file there, not the workflow.

The Qwen-Image-Edit-2511 and FLUX.2 [klein] workflows are built against v0.33: on a ComfyUI that
lacks one of their node types, or whose core node takes other widgets than the file saves (before
v0.33 CFGNorm has no ``pre_cfg``), both tests skip them with the reason; the run also skips where
ComfyUI cannot run the family's tiny twin (``comfy_tiny_families.family_missing``). Their loaders
are swapped for the test pack's tiny family model, chat CLIP and VAE (built in memory, detected by
ComfyUI as the family's) and the random family adapters of the conftest.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from scripts import workflow_format as fmt
from scripts import workflows as wf

from .comfy_tiny_families import family_missing
from .conftest import REPO_ROOT, SERVER_ADAPTER, SERVER_ICEDIT, SERVER_KLEIN_ADAPTER, SERVER_QWEN_ADAPTER, SERVER_VAE
from .test_server_workflow import crashes, run_ok

SHIPPED = sorted((REPO_ROOT / "workflows").glob("*.json"))
IMAGES = {"example.png": 0, "example_2.png": 1}

# The node types each workflow holds (besides its Note), so that a change to a shipped workflow
# is a change to this test too.
EXPECTED: dict[str, Counter] = {
    "1_auto_edit": Counter(
        InstructMoLE_LoadKontext=1,
        DualCLIPLoader=1,
        InstructMoLE_TextEncode=1,
        VAELoader=1,
        LoadImage=1,
        FluxKontextImageScale=1,
        VAEEncode=1,
        ReferenceLatent=1,
        FluxGuidance=1,
        ConditioningZeroOut=1,
        KSampler=1,
        VAEDecode=1,
        SaveImage=1,
    ),
    "2_creative_control": Counter(
        UNETLoader=1,
        InstructMoLE_AdapterFile=1,
        InstructMoLE_ApplyAdapter=1,
        DualCLIPLoader=1,
        InstructMoLE_TextEncode=1,
        VAELoader=1,
        LoadImage=1,
        FluxKontextImageScale=1,
        VAEEncode=1,
        ReferenceLatent=1,
        FluxGuidance=1,
        ConditioningZeroOut=1,
        InstructMoLE_Route=1,
        InstructMoLE_OverrideCouncil=1,
        InstructMoLE_CouncilPreview=1,
        InstructMoLE_ApplyCouncil=1,
        KSampler=1,
        VAEDecode=1,
        SaveImage=1,
    ),
    "3_route_and_blend": Counter(
        UNETLoader=1,
        InstructMoLE_AdapterFile=1,
        InstructMoLE_ApplyAdapter=1,
        DualCLIPLoader=1,
        InstructMoLE_TextEncode=1,
        VAELoader=1,
        LoadImage=1,
        FluxKontextImageScale=1,
        VAEEncode=1,
        ReferenceLatent=1,
        FluxGuidance=1,
        ConditioningZeroOut=1,
        InstructMoLE_Route=2,
        InstructMoLE_BlendCouncils=1,
        InstructMoLE_CouncilPreview=1,
        InstructMoLE_ApplyCouncil=1,
        KSampler=1,
        VAEDecode=1,
        SaveImage=1,
    ),
    "4_comparison": Counter(
        UNETLoader=1,
        InstructMoLE_LoadAdapter=1,
        DualCLIPLoader=1,
        InstructMoLE_TextEncode=1,
        VAELoader=1,
        LoadImage=1,
        FluxKontextImageScale=1,
        VAEEncode=1,
        ReferenceLatent=1,
        FluxGuidance=1,
        ConditioningZeroOut=1,
        InstructMoLE_Route=1,
        InstructMoLE_OverrideCouncil=2,
        InstructMoLE_ApplyCouncil=2,
        KSampler=4,
        VAEDecode=4,
        ImageStitch=3,
        SaveImage=1,
    ),
    "5_two_references": Counter(
        UNETLoader=1,
        InstructMoLE_LoadAdapter=1,
        DualCLIPLoader=1,
        InstructMoLE_TextEncode=1,
        VAELoader=1,
        LoadImage=2,
        FluxKontextImageScale=2,
        VAEEncode=2,
        ReferenceLatent=2,
        FluxGuidance=1,
        ConditioningZeroOut=1,
        KSampler=1,
        VAEDecode=1,
        SaveImage=1,
    ),
    "6_icedit_diptych": Counter(
        UNETLoader=1,
        InstructMoLE_LoadAdapter=1,
        DualCLIPLoader=1,
        CLIPTextEncode=1,
        FluxGuidance=1,
        ConditioningZeroOut=1,
        VAELoader=1,
        LoadImage=1,
        InstructMoLE_ICEditDiptych=1,
        InpaintModelConditioning=1,
        KSampler=1,
        VAEDecode=1,
        InstructMoLE_ICEditRightHalf=1,
        SaveImage=1,
        InstructMoLE_TokenExpertMap=1,
    ),
    "7_qwen_image_edit": Counter(
        UNETLoader=1,
        InstructMoLE_LoadAdapter=1,
        ModelSamplingAuraFlow=1,
        CFGNorm=1,
        CLIPLoader=1,
        InstructMoLE_TextEncodeQwenImageEdit=2,
        VAELoader=1,
        LoadImage=1,
        FluxKontextImageScale=1,
        VAEEncode=1,
        KSampler=1,
        VAEDecode=1,
        SaveImage=1,
        InstructMoLE_Route=1,
        InstructMoLE_CouncilPreview=1,
    ),
    "8_flux2_klein_edit": Counter(
        UNETLoader=1,
        InstructMoLE_LoadAdapter=1,
        CLIPLoader=1,
        InstructMoLE_TextEncode=1,
        ConditioningZeroOut=1,
        VAELoader=1,
        LoadImage=1,
        ImageScaleToTotalPixels=1,
        VAEEncode=1,
        ReferenceLatent=2,
        GetImageSize=1,
        EmptyFlux2LatentImage=1,
        Flux2Scheduler=1,
        RandomNoise=1,
        KSamplerSelect=1,
        CFGGuider=1,
        SamplerCustomAdvanced=1,
        VAEDecode=1,
        SaveImage=1,
        InstructMoLE_Route=1,
        InstructMoLE_CouncilPreview=1,
    ),
}
LOADER_FOLDERS = {"UNETLoader": "diffusion_models", "InstructMoLE_LoadKontext": "diffusion_models",
                  "DualCLIPLoader": "text_encoders", "CLIPLoader": "text_encoders", "VAELoader": "vae"}  # fmt: skip
# The other families' files -> the test pack's family key (comfy_tiny_families), and their adapters.
FAMILY_FILES = {wf.QWEN_EDIT: "qwen_image", wf.KLEIN: "flux2", wf.QWEN_VAE: "qwen_image", wf.FLUX2_VAE: "flux2"}
CLIP_TYPES = {"qwen_image": "qwen_image", "flux2": "flux2"}  # CLIPLoader's type -> the family's chat CLIP
ADAPTER_FILES = {wf.ADAPTER: SERVER_ADAPTER, wf.ICEDIT: SERVER_ICEDIT, wf.QWEN_ADAPTER: SERVER_QWEN_ADAPTER,
                 wf.KLEIN_ADAPTER: SERVER_KLEIN_ADAPTER}  # fmt: skip


@pytest.fixture(scope="module")
def server(comfy_server: Any) -> Any:
    """The session's server with the two input images the workflows name."""
    rng = np.random.default_rng(0)
    for name, seed in IMAGES.items():
        pixels = (rng.random((48 + 16 * seed, 64, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(Path(comfy_server.base_directory, "input", name))
    return comfy_server


def swap_loaders(prompt: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], Counter]:
    """The prompt with file loaders swapped for tiny ones; the swaps made, by node type."""
    out = json.loads(json.dumps(prompt))
    swapped: Counter = Counter()
    for node_id, node in list(out.items()):
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "UNETLoader" and inputs["unet_name"] in FAMILY_FILES:
            family = FAMILY_FILES[inputs["unet_name"]]
            out[node_id] = {"class_type": "InstructMoLETest_TinyFamilyModel", "inputs": {"family": family, "seed": 0}}
        elif kind == "UNETLoader":
            family = "fill" if inputs["unet_name"] == wf.FILL else "kontext"
            out[node_id] = {"class_type": "InstructMoLETest_TinyFlux", "inputs": {"seed": 0, "family": family}}
        elif kind == "InstructMoLE_LoadKontext":  # = Load Diffusion Model + InstructMoLE Load Adapter
            out[f"{node_id}_model"] = {"class_type": "InstructMoLETest_TinyFlux", "inputs": {"seed": 0}}
            kept = {k: inputs[k] for k in ("lora_strength", "expert_strength")}
            out[node_id] = {
                "class_type": "InstructMoLE_LoadAdapter",
                "inputs": {"model": [f"{node_id}_model", 0], "adapter": SERVER_ADAPTER, **kept},
            }
        elif kind == "DualCLIPLoader":
            out[node_id] = {"class_type": "InstructMoLETest_TinyCLIP", "inputs": {"seed": 0}}
        elif kind == "CLIPLoader":
            family = CLIP_TYPES[inputs["type"]]
            out[node_id] = {"class_type": "InstructMoLETest_TinyChatCLIP", "inputs": {"family": family, "seed": 0}}
        elif kind == "VAELoader" and inputs["vae_name"] in FAMILY_FILES:
            family = FAMILY_FILES[inputs["vae_name"]]
            out[node_id] = {"class_type": "InstructMoLETest_TinyVAE", "inputs": {"family": family, "seed": 0}}
        elif kind == "VAELoader":
            inputs["vae_name"] = SERVER_VAE
        elif kind in ("InstructMoLE_LoadAdapter", "InstructMoLE_AdapterFile"):
            inputs["adapter"] = ADAPTER_FILES[inputs["adapter"]]
        elif kind == "LoadImage":
            assert inputs["image"] in IMAGES, inputs
        else:
            continue
        swapped[kind] += 1
    return out, swapped


def family_of(ui: dict[str, Any]) -> str | None:
    """The family (comfy_tiny_families' key) of the diffusion model a workflow loads, None for FLUX.1."""
    files = {v for n in ui["nodes"] if n["type"] == "UNETLoader" for v in n["widgets_values"]}
    return next((FAMILY_FILES[f] for f in files if f in FAMILY_FILES), None)


def test_a_linked_widget_is_saved_as_the_frontend_saves_it() -> None:
    """A widget fed by a link (Klein's latent size from Get Image Size): a widget input with the link
    at its place among all the node's inputs, its default value kept; ``to_prompt`` reads the link."""
    info = {
        "Size": {"input": {"required": {}}, "output": ["INT", "X"], "output_name": ["width", "x"]},
        "Empty": {
            "input": {"required": {"x": ["X"], "width": ["INT", {"default": 1024}], "batch": ["INT", {"default": 1}]}},
            "output": ["X"],
            "output_name": ["X"],
        },
    }
    nodes = {1: fmt.Node("Size", {}), 2: fmt.Node("Empty", {"x": [1, 1], "width": [1, 0]})}  # a socket first
    layout = ((fmt.Group("G", ((1,), (2,))), fmt.NOTE),)
    ui = fmt.build(fmt.Workflow("t", "t", "note", nodes, layout), info)
    empty = next(n for n in ui["nodes"] if n["type"] == "Empty")
    assert [(i["name"], i["link"]) for i in empty["inputs"]] == [("x", 1), ("width", 2), ("batch", None)]
    assert empty["widgets_values"] == [1024, 1]
    assert ui["links"][1] == [2, 1, 0, 2, 1, "INT"]
    assert fmt.to_prompt(ui, info)["2"]["inputs"] == {"x": ["1", 1], "width": ["1", 0], "batch": 1}
    assert fmt.unavailable(ui, info) is None


def test_unavailable_names_a_missing_node_type_or_other_widgets() -> None:
    info = {"A": {"input": {"required": {"x": ["INT", {}]}}}}
    node = {"id": 1, "type": "A", "inputs": [{"name": "x", "type": "INT", "widget": {"name": "x"}, "link": None}]}
    assert fmt.unavailable({"nodes": [node]}, info) is None
    assert "no B" in fmt.unavailable({"nodes": [node, {**node, "type": "B"}]}, info)
    extra = {"name": "y", "type": "BOOLEAN", "widget": {"name": "y"}, "link": None}
    newer = {**node, "inputs": [*node["inputs"], extra]}  # a widget a newer ComfyUI added (CFGNorm's pre_cfg)
    assert "the file saves ['x', 'y']" in fmt.unavailable({"nodes": [newer]}, info)
    ours = {**node, "type": "InstructMoLE_A", "inputs": []}  # the pack's own nodes are compared in full instead
    assert fmt.unavailable({"nodes": [ours]}, {"InstructMoLE_A": info["A"]}) is None


def owned(ui: dict[str, Any]) -> dict[str, Any]:
    """A saved workflow without the unconnected sockets of core (not ``InstructMoLE_``) nodes."""
    out = json.loads(json.dumps(ui))
    for node in out["nodes"]:
        if node["type"].startswith("InstructMoLE_"):
            continue
        node["inputs"] = [i for i in node.get("inputs", []) if i.get("link") is not None or "widget" in i]
        node["outputs"] = [o for o in node.get("outputs", []) if o.get("links")]
    return out


def test_owned_ignores_only_unconnected_core_sockets() -> None:
    image_out = {"name": "IMAGE", "type": "IMAGE", "links": [], "slot_index": 0}
    save = {"id": 1, "type": "SaveImage", "inputs": [{"name": "images", "type": "IMAGE", "link": 4}], "outputs": []}
    newer = {**save, "outputs": [image_out]}
    assert owned({"nodes": [save]}) == owned({"nodes": [newer]})
    linked = {**save, "outputs": [{**image_out, "links": [5]}]}
    assert owned({"nodes": [save]}) != owned({"nodes": [linked]})
    ours = {**newer, "type": "InstructMoLE_X"}  # the pack's own sockets always count
    assert owned({"nodes": [{**save, "type": "InstructMoLE_X"}]}) != owned({"nodes": [ours]})
    moved = {**save, "pos": [10, 0]}
    assert owned({"nodes": [save]}) != owned({"nodes": [moved]})


def test_every_workflow_is_shipped_and_known() -> None:
    assert [p.stem for p in SHIPPED] == sorted(EXPECTED) == sorted(make().name for make in wf.WORKFLOWS)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_workflow_file_is_its_definition_with_notes_and_models(server: Any, path: Path) -> None:
    info = server.object_info()
    ui = json.loads(path.read_text())
    if reason := fmt.unavailable(ui, info):
        pytest.skip(reason)
    definition = next(make() for make in wf.WORKFLOWS if make().name == path.stem)
    assert owned(ui) == owned(wf.build(definition, info)), (
        f"{path.name} is not what scripts/workflows.py builds now: run it against a server to rebuild"
    )
    types = Counter(n["type"] for n in ui["nodes"] if n["type"] not in wf.FRONTEND_ONLY)
    assert types == EXPECTED[path.stem]
    notes = [n for n in ui["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1 and len(notes[0]["widgets_values"][0]) > 200
    assert ui["groups"] and all(g["title"] for g in ui["groups"])
    for node in ui["nodes"]:
        if node["type"] not in LOADER_FOLDERS:
            continue
        files = [v for v in node["widgets_values"] if isinstance(v, str) and v.endswith(".safetensors")]
        files = [f for f in files if f not in wf.ADAPTERS]  # none is published: the README says how to make one
        listed = {m["name"]: m for m in node["properties"]["models"]}
        assert set(files) == set(listed), node
        for model in listed.values():
            assert model["url"].startswith("https://huggingface.co/") and model["url"].endswith("/" + model["name"])
            assert model["directory"] == LOADER_FOLDERS[node["type"]]


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_workflow_runs_end_to_end(server: Any, path: Path) -> None:
    info = server.object_info()
    ui = json.loads(path.read_text())
    family = family_of(ui)
    if reason := fmt.unavailable(ui, info) or (family and family_missing(family)):
        pytest.skip(reason)
    shipped = wf.to_prompt(ui, info)
    prompt, swapped = swap_loaders(shipped)
    loaders = {"UNETLoader", "InstructMoLE_LoadKontext", "DualCLIPLoader", "CLIPLoader", "VAELoader", "LoadImage",
               "InstructMoLE_LoadAdapter", "InstructMoLE_AdapterFile"}  # fmt: skip
    assert swapped == Counter({k: v for k, v in EXPECTED[path.stem].items() if k in loaders})
    for node_id, node in shipped.items():  # everything else exactly as shipped
        if node["class_type"] not in loaders:
            assert prompt[node_id] == node
    # Kontext scales every input to about one megapixel: 4096 target + 4096 tokens per reference,
    # 20 steps. On 2 CPU cores the tiny model takes 20-60 s per sampler. Qwen-Image-Edit (20 steps,
    # CFG 4) and FLUX.2 [klein] (4 steps) sample as many tokens; FLUX.2's VAE encoder is 128 wide
    # whatever its weights (ComfyUI fixes it): 1-2 min for the one-megapixel picture.
    entry, log = run_ok(server, prompt, timeout=900)
    outputs = entry["outputs"]
    saves = [node_id for node_id, node in prompt.items() if node["class_type"] == "SaveImage"]
    assert len(saves) == 1
    saved = outputs[saves[0]]["images"]
    assert len(saved) == 1, saved
    with Image.open(Path(server.base_directory, "output", saved[0]["subfolder"], saved[0]["filename"])) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 0
    if path.stem == "4_comparison":  # four results side by side, 8 px apart
        assert pixels.shape[1] > 4 * pixels.shape[0] - 1
    if path.stem == "6_icedit_diptych":  # the right half of a 2 x 512 px diptych, and the expert map
        assert pixels.shape[1] == 512
        (map_node,) = [i for i, n in prompt.items() if n["class_type"] == "InstructMoLE_TokenExpertMap"]
        assert len(outputs[map_node]["images"]) == 1
    for node_id, node in prompt.items():
        if node["class_type"] == "InstructMoLE_CouncilPreview":
            assert outputs[node_id].get("images") and outputs[node_id].get("text"), outputs[node_id]
            if family:  # the instruction's council, routed exactly (from Text Encode's signal), top-k per layer
                (council,) = outputs[node_id]["instructmole_council"]
                assert council["label"] == "conditioning", council["label"]  # not "conditioning (approximate)"
                assert council["layers"] and all(sum(row) == council["top_k"] for row in council["chosen"]), council
    assert "invalid value encountered" not in log, log[-4000:]  # NaN or inf pixels (SaveImage casts them)
    assert not crashes(log), log[-4000:]
