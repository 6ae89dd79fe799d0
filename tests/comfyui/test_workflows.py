"""Every shipped workflow (workflows/*.json) runs end to end in a real headless ComfyUI.

Only the file loaders are swapped, for test-only tiny ones (the tiny Flux, the tiny CLIP, a random
TAESD, a random adapter, generated input images); every other node runs exactly as shipped. A
workflow that gains a node type this test does not know, loses its Note or models metadata, or
drifts from its definition in scripts/workflows.py fails here.

The files are compared with what their definitions build on the running ComfyUI, on what the pack
owns: every node, link, widget value, title, size, position and group. The sockets of core nodes
that a workflow leaves unconnected are the core's: a ComfyUI that gives a core node a new output
(v0.33's SaveImage gained an IMAGE output) changes the built file there, not the workflow.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from scripts import workflows as wf

from .conftest import REPO_ROOT, SERVER_ADAPTER, SERVER_ICEDIT, SERVER_VAE
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
}
LOADER_FOLDERS = {"UNETLoader": "diffusion_models", "InstructMoLE_LoadKontext": "diffusion_models",
                  "DualCLIPLoader": "text_encoders", "VAELoader": "vae"}  # fmt: skip


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
        if kind == "UNETLoader":
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
        elif kind == "VAELoader":
            inputs["vae_name"] = SERVER_VAE
        elif kind in ("InstructMoLE_LoadAdapter", "InstructMoLE_AdapterFile"):
            inputs["adapter"] = {wf.ADAPTER: SERVER_ADAPTER, wf.ICEDIT: SERVER_ICEDIT}[inputs["adapter"]]
        elif kind == "LoadImage":
            assert inputs["image"] in IMAGES, inputs
        else:
            continue
        swapped[kind] += 1
    return out, swapped


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
        files = [f for f in files if f != wf.ADAPTER]  # no adapter is published: the README says how to make one
        listed = {m["name"]: m for m in node["properties"]["models"]}
        assert set(files) == set(listed), node
        for model in listed.values():
            assert model["url"].startswith("https://huggingface.co/") and model["url"].endswith("/" + model["name"])
            assert model["directory"] == LOADER_FOLDERS[node["type"]]


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_workflow_runs_end_to_end(server: Any, path: Path) -> None:
    info = server.object_info()
    shipped = wf.to_prompt(json.loads(path.read_text()), info)
    prompt, swapped = swap_loaders(shipped)
    loaders = {"UNETLoader", "InstructMoLE_LoadKontext", "DualCLIPLoader", "VAELoader", "LoadImage",
               "InstructMoLE_LoadAdapter", "InstructMoLE_AdapterFile"}  # fmt: skip
    assert swapped == Counter({k: v for k, v in EXPECTED[path.stem].items() if k in loaders})
    for node_id, node in shipped.items():  # everything else exactly as shipped
        if node["class_type"] not in loaders:
            assert prompt[node_id] == node
    # Kontext scales every input to about one megapixel: 4096 target + 4096 tokens per reference,
    # 20 steps. On 2 CPU cores the tiny model takes 20-60 s per sampler.
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
    assert not crashes(log), log[-4000:]
