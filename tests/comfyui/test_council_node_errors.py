"""Bad input at the council nodes, inside a real ComfyUI: each is the node's one-line message.

Rule text and layer selectors typed into a widget are refused by ``validate_inputs`` before the
graph runs (in bounded time and memory: a 25-byte rule with a huge block range once allocated
until memory ran out during prompt validation; ComfyUI passes the text to ``validate_inputs`` as
``test_server_workflow`` shows); NaN floats, which ComfyUI's min/max check lets
through, and councils of another adapter are refused when the node runs, naming the input. The
preview draws odd councils (no layers, thousands of instances, NaN) without failing.
"""

from __future__ import annotations

import json
import math
import time
import tracemalloc
from typing import Any

import pytest
import torch

from .test_nodes import error_of, route
from .test_patched_model import load

OVERRIDE = "InstructMoLE Override Council"
BLEND = "InstructMoLE Blend Councils"
APPLY = "InstructMoLE Apply Council"
HUGE_RANGE = "double:0-99999999999 ban 1"  # 26 bytes


def nodes(setup: dict[str, Any]) -> Any:
    return setup["nodes"].council_nodes


def route_with(setup: dict[str, Any], name: str, seed: int) -> Any:
    g = torch.Generator().manual_seed(seed)
    cond = [[torch.randn(1, 20, 64, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]]
    _, adapter = load(setup, name)
    return setup["nodes"].routing_nodes.Route.execute(adapter, conditioning=cond).result[0]


# ---- Override Council --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        (HUGE_RANGE, "block numbers are whole numbers from 0 to 10000"),
        ("force 99999999999999999999999", "does not exist; experts are numbered 0 to 255 at most"),
        ("all scale nan", "scale needs a number, got 'nan'"),
        ("all scale 1e308", "scale factor 1e+308 is not possible; choose a number from 0 to 100"),
        ("force 1:-2", "a forced weight is a number above 0 and at most 100"),
        ("top 0", "top 0 is not possible"),
        ("x" * 1_000_000, "the limit is 65536 characters"),
        ("ban 1\n" * 1001, "more than 1000 rules"),
    ],
)
def test_rule_text_is_refused_before_the_graph_runs(setup, rules, message):
    tracemalloc.start()
    start = time.perf_counter()
    try:
        result = nodes(setup).OverrideCouncil.validate_inputs(rules=rules)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert isinstance(result, str) and message in result and "\n" not in result, result
    assert time.perf_counter() - start < 1.0 and peak < 4_000_000, peak


def test_rule_errors_at_run_name_the_input(setup):
    council = route(setup, 1)
    override = nodes(setup).OverrideCouncil
    msg = error_of(override.execute, council, HUGE_RANGE)
    assert msg.startswith(f"{OVERRIDE}, input 'rules': rule 1 ('{HUGE_RANGE}'): block range")
    msg = error_of(override.execute, council, "all scale 0; single force 1")
    assert msg.startswith(f"{OVERRIDE}, input 'rules': rule 2 ('single force 1'): expert 1 has no mean weight")
    assert error_of(override.execute, None, "ban 1").startswith(f"{OVERRIDE}, input 'council': got None, not a council")


# ---- Blend Councils ----------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [math.nan, math.inf, -math.inf, -0.1, 1.5, 10**400])
def test_blend_factor_must_be_a_number_from_0_to_1(setup, factor):
    a, b = route(setup, 1), route(setup, 2)
    msg = error_of(nodes(setup).BlendCouncils.execute, a, b, factor, "all")
    assert msg.startswith(f"{BLEND}, input 'factor': ") and msg.endswith("choose a number from 0 to 1"), msg


def test_blend_layers_are_checked_before_and_at_run(setup):
    blend = nodes(setup).BlendCouncils
    assert blend.validate_inputs(layers="double:0-5") is True
    assert blend.validate_inputs(layers=None) is True
    refused = blend.validate_inputs(layers="double:0-99999999999")
    assert isinstance(refused, str) and "block numbers are whole numbers from 0 to 10000" in refused
    a, b = route(setup, 1), route(setup, 2)
    assert error_of(blend.execute, a, b, 0.5, "triple").startswith(
        f"{BLEND}, input 'layers': selector 'triple' is not valid"
    )
    assert "input 'layers': selector 'single:9' picks no layer" in error_of(blend.execute, a, b, 0.5, "single:9")


def test_blend_refuses_councils_of_two_adapters_with_one_layout(setup):
    """Two adapter files of the same shape: mixing their councils would silently mix two routers."""
    a, other = route(setup, 1), route_with(setup, "second.safetensors", 2)
    assert a.layers == other.layers and a.adapter_id != other.adapter_id
    msg = error_of(nodes(setup).BlendCouncils.execute, a, other, 0.5, "all")
    assert msg.startswith(f"{BLEND}, input 'council_b': these councils were routed by different adapters")
    assert msg.endswith("route both instructions with the same adapter")
    assert "input 'council_a': got 'x', not a council" in error_of(
        nodes(setup).BlendCouncils.execute, "x", a, 0.5, "all"
    )


# ---- Apply Council -----------------------------------------------------------------------------


def test_apply_council_names_mode_and_council(setup):
    apply = nodes(setup).ApplyCouncil
    model, _ = load(setup)
    council = route(setup, 1)
    assert error_of(apply.execute, model, council, "blended") == (
        f"{APPLY}, input 'mode': 'blended' is not a mode; choose merged or fixed"
    )
    assert error_of(apply.execute, model, None, "fixed").startswith(f"{APPLY}, input 'council': got None")
    hand_made = type(council)(council.layers, council.probs, council.weights, council.top_k)  # no adapter id
    assert error_of(apply.execute, model, hand_made, "merged").startswith(
        f"{APPLY}, input 'council': this council carries no adapter id"
    )


# ---- Council Preview ---------------------------------------------------------------------------


def preview(setup: dict[str, Any], council: Any) -> tuple[torch.Tensor, dict, str]:
    out = nodes(setup).CouncilPreview.execute(council)
    image, text = out.result
    ui = out.ui if isinstance(out.ui, dict) else out.ui.as_dict()
    assert image.ndim == 4 and torch.isfinite(image).all()
    return image, json.loads(text), ui["text"][0]


def test_preview_of_odd_councils(setup):
    council = route(setup, 1)
    cls = type(council)
    empty = cls((), torch.zeros(1, 0, 6), torch.zeros(1, 0, 6), 2, council.adapter_id)
    image, data, _ = preview(setup, empty)
    assert data["layers"] == [] and image.shape[1] * image.shape[2] < 100_000

    many = cls(
        council.layers, council.probs.expand(1500, -1, -1), council.weights.expand(1500, -1, -1), 2, council.adapter_id
    )
    start = time.perf_counter()
    image, data, summary = preview(setup, many)
    assert time.perf_counter() - start < 10 and image.shape[1] * image.shape[2] < 4_000_000
    assert len(data["probs"]) == 1500 and summary.startswith("(showing 16 of 1500 instances and 4 of 4 layers)")

    poisoned = cls(council.layers, torch.full_like(council.probs, math.nan), council.weights, 2, council.adapter_id)
    preview(setup, poisoned)
    labelled = cls(council.layers, council.probs, council.weights, 2, council.adapter_id, ("line one\nline two",))
    assert "line one" in preview(setup, labelled)[2]
    assert error_of(nodes(setup).CouncilPreview.execute, "council").startswith(
        "InstructMoLE Council Preview, input 'council': got 'council', not a council"
    )
