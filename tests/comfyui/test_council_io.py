"""InstructMoLE Load Council: a shared council back from its JSON (pasted or a file), checked early."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from .comfy_tiny import run_comfy
from .test_nodes import error_of, route
from .test_patched_model import inputs, load


def preview_json(setup: dict[str, Any], council: Any) -> str:
    return setup["nodes"].council_nodes.CouncilPreview.execute(council).result[1]


def test_round_trip_pasted_and_file_gives_the_same_model(setup):
    import folder_paths

    io_nodes, council_nodes = setup["nodes"].council_io, setup["nodes"].council_nodes
    council = council_nodes.OverrideCouncil.execute(route(setup, 5), "single force 1; double ban 0").result[0]
    text = preview_json(setup, council)
    LoadCouncil = io_nodes.LoadCouncil
    assert LoadCouncil.validate_inputs(file=io_nodes.NO_FILE, council_json=text) is True
    pasted = LoadCouncil.execute(io_nodes.NO_FILE, text).result[0]
    folder = os.path.join(folder_paths.get_output_directory(), "councils")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "liked.json"), "w") as f:
        f.write(text)
    assert "councils/liked.json" in io_nodes.council_files()
    assert "councils/liked.json" in LoadCouncil.define_schema().inputs[0].options
    from_file = LoadCouncil.execute("councils/liked.json", "").result[0]
    for loaded in (pasted, from_file):
        assert loaded.layers == council.layers and loaded.adapter_id == council.adapter_id
        assert torch.equal(loaded.weights, council.weights) and torch.equal(loaded.banned, council.banned)
    model, _ = load(setup)
    x = inputs(1)
    outs = [
        run_comfy(council_nodes.ApplyCouncil.execute(model, c, "fixed").result[0], **x)
        for c in (council, pasted, from_file)
    ]
    assert (outs[0] - run_comfy(model, **x)).abs().max() > 1e-4  # the council changes the output
    torch.testing.assert_close(outs[1], outs[0], atol=0, rtol=0)
    torch.testing.assert_close(outs[2], outs[0], atol=0, rtol=0)


def test_bad_council_json_is_caught_at_validation_and_named_at_run(setup):
    io_nodes = setup["nodes"].council_io
    LoadCouncil, none = io_nodes.LoadCouncil, io_nodes.NO_FILE
    good = json.loads(preview_json(setup, route(setup, 6)))
    cases = {
        "": "no council JSON given",
        "{not json": "the council JSON is not valid JSON",
        "[" * 100_000: "nested too deeply",
        json.dumps({**good, "top_k": 99}): "top_k",
        json.dumps({**good, "weights": [[[float("nan")] * 4] * 4]}): "weights",
        json.dumps({**good, "adapter_id": ""}): "adapter_id",
    }
    for text, want in cases.items():
        msg = LoadCouncil.validate_inputs(file=none, council_json=text)
        assert isinstance(msg, str) and msg.startswith("InstructMoLE Load Council: ") and want in msg, (want, msg)
        run = error_of(LoadCouncil.execute, none, text)
        assert run.startswith("InstructMoLE Load Council, input 'council_json': ") and want in run, (want, run)
    msg = error_of(LoadCouncil.execute, "../../etc/passwd", "")
    assert msg == (
        "InstructMoLE Load Council, input 'file': '../../etc/passwd' is not a file in ComfyUI's output folder; "
        "pick one from the list"
    )


def test_a_council_of_another_adapter_is_refused_at_apply(setup):
    io_nodes, council_nodes = setup["nodes"].council_io, setup["nodes"].council_nodes
    text = preview_json(setup, route(setup, 7))
    loaded = io_nodes.LoadCouncil.execute(io_nodes.NO_FILE, text).result[0]
    second, _ = load(setup, "second.safetensors")
    assert "input 'council': this council was routed by a different adapter file" in error_of(
        council_nodes.ApplyCouncil.execute, second, loaded, "merged"
    )
