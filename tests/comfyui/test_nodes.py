"""Each node's ``execute`` (and validation) with valid and invalid inputs, inside a real ComfyUI."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from .test_patched_model import load


def route(setup: dict[str, Any], seed: int) -> Any:
    g = torch.Generator().manual_seed(seed)
    cond = [[torch.randn(1, 20, 64, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]]
    _, adapter = load(setup)
    return setup["nodes"].routing_nodes.Route.execute(adapter, conditioning=cond).result[0]


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(ValueError) as err:
        fn(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_every_node_is_registered_with_tooltips(setup):
    for node in setup["nodes"].NODES:
        schema = node.define_schema()
        assert schema.node_id.startswith("InstructMoLE_") and schema.category.startswith("InstructMoLE/")
        assert schema.description
        for item in [*schema.inputs, *schema.outputs]:
            assert item.tooltip, f"{schema.node_id}: {item.id} has no tooltip"


def test_load_adapter_errors_name_the_input(setup, tmp_path):
    import folder_paths

    loaders = setup["nodes"].loaders
    folder = folder_paths.get_folder_paths("instructmole")[0]
    assert "tiny.safetensors" in loaders.LoadAdapter.define_schema().inputs[1].options
    msg = error_of(loaders.LoadAdapter.execute, setup["base"], "nope.safetensors", 1.0, 1.0)
    want = "'nope.safetensors' was not found in models/instructmole or models/loras"
    assert msg == f"InstructMoLE Load Adapter, input 'adapter': {want}"
    save_file({"lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, os.path.join(folder, "plain_lora.safetensors"))
    assert "is a safetensors file but not an InstructMoLE adapter" in error_of(
        loaders.LoadAdapter.execute, setup["base"], "plain_lora.safetensors", 1.0, 1.0
    )
    with open(os.path.join(folder, "tiny.safetensors"), "rb") as f:
        good = f.read()
    with open(os.path.join(folder, "truncated.safetensors"), "wb") as f:
        f.write(good[: len(good) // 3])
    assert "truncated or corrupt" in error_of(loaders.LoadAdapter.execute, setup["base"], "truncated.safetensors", 1, 1)
    from instructmole.tiny import tiny_flux

    from .comfy_tiny import comfy_flux_from_diffusers

    wider = comfy_flux_from_diffusers(tiny_flux(0, num_attention_heads=4))
    msg = error_of(loaders.LoadAdapter.execute, wider, "tiny.safetensors", 1.0, 1.0)
    assert msg.startswith(
        "InstructMoLE Load Adapter, input 'model': the adapter's layer 'transformer_blocks.0.ff.net.2'"
    )
    model, _ = load(setup)
    assert "already carries an InstructMoLE adapter" in error_of(
        loaders.LoadAdapter.execute, model, "tiny.safetensors", 1, 1
    )


def test_override_validates_and_applies_rules(setup):
    nodes = setup["nodes"].council_nodes
    council = route(setup, 1)
    assert nodes.OverrideCouncil.validate_inputs(rules="single force 1; double ban 0") is True
    assert nodes.OverrideCouncil.validate_inputs(rules=None) is True
    bad = nodes.OverrideCouncil.validate_inputs(rules="double bam 2")
    assert "unknown action 'bam'; valid actions: force, only, ban, scale, top" in bad
    out = nodes.OverrideCouncil.execute(council, "single force 1; double ban 0").result[0]
    assert all(1 in dict(out.members(0, r)) for r in (2, 3))
    assert all(0 not in dict(out.members(0, r)) for r in (0, 1))
    msg = error_of(nodes.OverrideCouncil.execute, council, "single force 9")
    assert msg.startswith(
        "InstructMoLE Override Council, input 'rules': rule 1 ('single force 9'): expert 9 does not exist"
    )


def test_blend_and_errors(setup):
    nodes = setup["nodes"].council_nodes
    a, b = route(setup, 1), route(setup, 2)
    half = nodes.BlendCouncils.execute(a, b, 0.5, "all").result[0]
    assert torch.allclose(half.probs, (a.probs + b.probs) / 2)
    taken = nodes.BlendCouncils.execute(a, b, 1.0, "single").result[0]
    assert torch.equal(taken.weights[:, 2:], b.weights[:, 2:]) and torch.equal(taken.weights[:, :2], a.weights[:, :2])
    assert "input 'layers': selector 'single:9' picks no layer" in error_of(
        nodes.BlendCouncils.execute, a, b, 0.5, "single:9"
    )
    _, second = load(setup, "second.safetensors")
    other = (
        setup["nodes"]
        .routing_nodes.Route.execute(
            second, conditioning=[[torch.randn(1, 20, 64), {"pooled_output": torch.randn(1, 32)}]]
        )
        .result[0]
    )
    other = type(other)(other.layers[:2], other.probs[:, :2], other.weights[:, :2], other.top_k)
    assert "input 'council_b': councils come from different adapters" in error_of(
        nodes.BlendCouncils.execute, a, other, 0.5, "all"
    )


def test_apply_council_errors(setup):
    nodes = setup["nodes"].council_nodes
    council = route(setup, 1)
    msg = error_of(nodes.ApplyCouncil.execute, setup["base"], council, "merged")
    assert msg == (
        "InstructMoLE Apply Council, input 'model': this MODEL carries no InstructMoLE adapter; "
        "connect the MODEL output of 'InstructMoLE Load Adapter'"
    )
    second, _ = load(setup, "second.safetensors")
    assert "input 'council': this council was routed by a different adapter file" in error_of(
        nodes.ApplyCouncil.execute, second, council, "fixed"
    )
    model, _ = load(setup)
    two = type(council).cat([council, route(setup, 2)])
    assert "holds 2 instructions" in error_of(nodes.ApplyCouncil.execute, model, two, "merged")


def test_route_needs_an_instruction(setup):
    _, adapter = load(setup)
    msg = error_of(setup["nodes"].routing_nodes.Route.execute, adapter)
    assert msg == "InstructMoLE Route, input 'text': connect a CLIP and type the instruction, or connect a CONDITIONING"
    wrong = [[torch.randn(1, 20, 48), {"pooled_output": torch.randn(1, 32)}]]
    assert "the text features are 48/32-wide" in error_of(
        setup["nodes"].routing_nodes.Route.execute, adapter, conditioning=wrong
    )


def test_preview_gives_image_json_and_ui(setup):
    council = setup["nodes"].council_nodes.OverrideCouncil.execute(route(setup, 3), "double ban 1").result[0]
    out = setup["nodes"].council_nodes.CouncilPreview.execute(council)
    image, text = out.result
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[-1] == 3 and image.min() >= 0 and image.max() <= 1
    assert image.std() > 0.05  # a picture, not a blank
    data = json.loads(text)
    assert data["format"] == "instructmole-council" and len(data["layers"]) == 4
    ui = out.ui if isinstance(out.ui, dict) else out.ui.as_dict()
    assert ui["images"] and ui["images"][0]["type"] == "temp"
    assert "\n  double:0  " in ui["text"][0] and "transformer_blocks.0.ff.net.2" not in ui["text"][0]
    (mapped,) = ui["instructmole_council"]
    assert json.loads(json.dumps(mapped)) == mapped  # JSON-able as it is
    assert mapped["layers"] == data["layers"] and mapped["names"] == ["double:0", "double:1", "single:0", "single:1"]
    assert (mapped["num_experts"], mapped["top_k"], mapped["instances"]) == (data["num_experts"], data["top_k"], 1)
    assert mapped["adapter_id"] == data["adapter_id"] and mapped["label"] == data["label"][0]
    assert mapped["weights"] == [[round(w, 4) for w in row] for row in data["weights"][0]]
    assert mapped["probs"] == [[round(p, 4) for p in row] for row in data["probs"][0]]
    assert mapped["banned"] == data["banned"][0] and any(mapped["banned"][0]) and not any(mapped["banned"][2])
    override = setup["nodes"].council_nodes.OverrideCouncil.execute(council, "all scale 1.0")
    edited = override.ui if isinstance(override.ui, dict) else override.ui.as_dict()
    assert edited["instructmole_council"][0]["weights"] == mapped["weights"]


def test_example_workflows_use_existing_nodes_and_inputs(setup):
    from pathlib import Path

    schemas = {n.define_schema().node_id: n.define_schema() for n in setup["nodes"].NODES}
    files = sorted(Path(__file__).resolve().parents[2].joinpath("workflows").glob("*.json"))
    assert files
    for path in files:
        graph = json.loads(path.read_text())
        ours = [n for n in graph["nodes"] if n["type"].startswith("InstructMoLE_")]
        assert ours, path.name
        for node in ours:
            schema = schemas[node["type"]]
            names = {i.id for i in schema.inputs}
            assert {i["name"] for i in node.get("inputs", [])} <= names, (path.name, node["type"])
