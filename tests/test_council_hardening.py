"""Bad input to councils and overrides never crashes, poisons or silently changes anything.

One group per fault class: council JSON (``from_dict``), the constructor's cheap checks, adapter
ids, the rule text (limits, numbers, resource use), and the Python override functions. Every
refusal is an ``InstructMoLEError`` subclass whose one-line message names the bad value.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import time
import tracemalloc
from typing import Any

import pytest
import torch

import instructmole as im
from instructmole import (
    Council,
    CouncilMismatchError,
    CouncilRuleError,
    InstructMoLEError,
    apply_rules,
    ban,
    blend,
    force,
    only,
    parse_rules,
    scale,
    take,
    top,
)
from instructmole.council import MAX_EXPERTS, MAX_INSTANCES, MAX_LAYERS
from instructmole.overrides import MAX_BLOCK, MAX_RULES, MAX_RULES_CHARS, with_strength
from tests.helpers import flux_inputs
from tests.test_overrides import LAYERS

ID = "0123456789abcdef"
PROBS = torch.tensor([0.30, 0.25, 0.20, 0.12, 0.08, 0.05]).expand(2, 4, 6).clone()


def council(adapter_id: str = ID, probs: torch.Tensor = PROBS) -> Council:
    weights, indices = probs.topk(2, -1)
    return Council.from_topk(LAYERS, probs, indices, weights, adapter_id=adapter_id, label=("a", "b"))


def refused(error: type[Exception], fn, *args, **kwargs) -> str:
    """The one-line message of the expected refusal."""
    with pytest.raises(error) as err:
        fn(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message and len(message) < 400, message
    return message


def valid_dict() -> dict[str, Any]:
    return ban(council(), [1], where="double").to_dict()  # with bans and labels


# ---- 1. council JSON ----------------------------------------------------------------------------


def test_json_round_trip_keeps_every_field():
    c = ban(council(), [1], where="double")
    back = Council.from_dict(c.to_dict())
    assert back.layers == c.layers and back.top_k == c.top_k and back.adapter_id == ID and back.label == ("a", "b")
    assert torch.equal(back.probs, c.probs) and torch.equal(back.weights, c.weights)
    assert torch.equal(back.banned, c.banned)


def test_json_without_num_experts_still_reads():
    data = valid_dict()
    del data["num_experts"]
    assert Council.from_dict(data).num_experts == 6


def _with(path: tuple, value: Any) -> dict[str, Any]:
    data = valid_dict()
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


_DELETE = object()
_MANY_LAYERS = [f"single_transformer_blocks.{i}.proj_out" for i in range(MAX_LAYERS + 1)]


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("format",), "x", "not an InstructMoLE council"),
        (("version",), True, "council version True is not supported"),
        (("version",), 2, "council version 2 is not supported"),
        (("version",), _DELETE, "council version None"),
        (("layers",), _DELETE, "council field 'layers' is missing"),
        (("probs",), _DELETE, "council field 'probs' is missing"),
        (("weights",), _DELETE, "council field 'weights' is missing"),
        (("top_k",), _DELETE, "council field 'top_k' is missing"),
        (("adapter_id",), _DELETE, "council field 'adapter_id' is missing"),
        (("colour",), "red", "council field 'colour' is not known"),
        (("top_k",), 0, "top_k is 0; it must be a whole number from 1 to 6"),
        (("top_k",), 99, "top_k is 99"),
        (("top_k",), True, "top_k is True"),
        (("top_k",), 2.0, "top_k is 2.0"),
        (("top_k",), "2", "top_k is '2'"),
        (("weights", 0, 0, 0), math.nan, "council weights[0][0][0] is nan; council weights are finite numbers"),
        (("weights", 1, 2, 3), -0.1, "weights[1][2][3] is -0.1; council weights are finite numbers from 0 to 100"),
        (("weights", 0, 0, 0), math.inf, "weights[0][0][0] is inf"),
        (("weights", 0, 0, 0), 101, "weights[0][0][0] is 101"),
        (("weights", 0, 0, 0), 10**400, "a whole number too large to use"),
        (("probs", 0, 1, 2), 1.5, "probs[0][1][2] is 1.5; router probabilities are finite numbers from 0 to 1"),
        (("probs", 0, 1, 2), "0.2", "probs[0][1][2] is '0.2'"),
        (("probs", 0, 1, 2), True, "probs[0][1][2] is True"),
        (("probs", 0, 1, 2), None, "probs[0][1][2] is None"),
        (("probs", 0, 1, 2), [0.1], "probs[0][1][2] is a list of 1"),
        (("weights", 0, 1), [0.1] * 5, "weights[0][1] must be a list of 6 expert values, got a list of 5"),
        (("weights", 1), [[0.0] * 6] * 3, "weights[1] must be a list of 4 layer rows, got a list of 3"),
        (("weights",), [], "weights must be a list of 2 instances"),
        (("weights",), "0.5", "weights must be a list of 2 instances, got '0.5'"),
        (("banned", 0, 0, 0), 1, "banned[0][0][0] is 1; banned holds true or false"),
        (("banned",), [[[False] * 6] * 4], "banned must be a list of 2 instances"),
        (("layers", 2), "foo.bar", "layers[2] is 'foo.bar', not a layer inside a transformer block"),
        (("layers", 2), LAYERS[0], "lists 'transformer_blocks.0.ff.net.2' twice"),
        (("layers", 2), 7, "layers[2] is 7; a layer name is text"),
        (("layers", 2), "transformer_blocks." + "9" * 5000 + ".x", "a layer name is text of 1 to 256"),
        (("layers",), LAYERS[0], "layers must be a list of at most 4096 layer names"),
        (("layers",), _MANY_LAYERS, "layers must be a list of at most 4096"),
        (("layers",), list(LAYERS[:3]), "probs[0] must be a list of 3 layer rows"),
        (("adapter_id",), "", "council adapter_id is ''; it must be the id of the adapter that routed it"),
        (("adapter_id",), 5, "council adapter_id is 5"),
        (("adapter_id",), "x" * 300, "council adapter_id is 'xxxx"),
        (("adapter_id",), "a\nb", "council adapter_id is 'a\\nb'"),
        (("label",), ["a"], "label must be a list of 2 texts (one per instance) or empty, got a list of 1"),
        (("label",), "ab", "label must be a list of 2 texts"),
        (("label",), [1, 2], "label[0] is 1"),
        (("num_experts",), 0, "council has 0 experts per layer"),
        (("num_experts",), MAX_EXPERTS + 1, "council has 257 experts per layer"),
        (("num_experts",), 5, "probs[0][0] must be a list of 5 expert values"),
        (("probs",), [[]] * (MAX_INSTANCES + 1), "probs must be a list of at most 4096 instances"),
    ],
)
def test_from_dict_refuses_each_bad_field(path, value, message):
    assert message in refused(CouncilMismatchError, Council.from_dict, _with(path, value))


@pytest.mark.parametrize("data", [None, [], "council", 3, {"format": "instructmole-council"}])
def test_from_dict_refuses_what_is_not_a_council(data):
    refused(CouncilMismatchError, Council.from_dict, data)


def test_from_dict_checks_sizes_before_building_anything():
    """A few bytes claiming 4096 instances × 4096 layers × 256 experts: refused at once, no allocation."""
    layers = [f"single_transformer_blocks.{i}.proj_out" for i in range(MAX_LAYERS)]
    data = {**valid_dict(), "layers": layers, "num_experts": MAX_EXPERTS, "probs": [[]] * MAX_INSTANCES}
    tracemalloc.start()
    start = time.perf_counter()
    try:
        assert "too large" in refused(CouncilMismatchError, Council.from_dict, data)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert time.perf_counter() - start < 1.0 and peak < 4_000_000


# ---- 2. the constructor: types and shapes only -------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"top_k": 0}, "top_k is 0"),
        ({"top_k": 7}, "top_k is 7"),
        ({"top_k": True}, "top_k is True"),
        ({"label": ("a", "b", "c")}, "label names 3 instructions but the council holds 2"),
        ({"label": "ab"}, "label must be a list of texts"),
        ({"layers": "transformer_blocks.0.ff.net.2"}, "layers must be a list of layer names"),
        ({"probs": [[0.5]]}, "probs must be a float tensor"),
        ({"banned": torch.zeros(2, 4, 6)}, "banned must be None or a bool tensor of shape (2, 4, 6)"),
        ({"banned": torch.zeros(1, 4, 6, dtype=torch.bool)}, "banned must be None or a bool tensor"),
        ({"adapter_id": None}, "adapter_id must be text"),
    ],
)
def test_constructor_checks_types_and_shapes(change, message):
    fields = {"layers": LAYERS, "probs": PROBS, "weights": PROBS.clone(), "top_k": 2, "adapter_id": ID, **change}
    assert message in refused(CouncilMismatchError, Council, **fields)


def test_constructor_keeps_autograd_working():
    """Training builds councils from weights that require grad: no value check may detach them."""
    weights = torch.rand(2, 4, 2, requires_grad=True)
    _, indices = PROBS.topk(2, -1)
    c = Council.from_topk(LAYERS, PROBS, indices, weights, adapter_id=ID)
    assert c.weights.requires_grad
    c.weights.sum().backward()
    assert torch.equal(weights.grad, torch.ones_like(weights))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.row(2), "instance 2 does not exist; this council holds 2 (0 to 1)"),
        (lambda c: c.row(True), "instance True does not exist"),
        (lambda c: c.row(0).expand(0), "batch size 0 is not possible"),
        (lambda c: c.expand(3), "a council of 2 instances cannot serve a batch of 3"),
        (lambda c: Council.cat([]), "cat needs at least one council"),
        (lambda c: Council.cat([c, "x"]), "expected a council, got 'x'"),
        (lambda c: c.members(0, 4), "layer row 4 does not exist"),
    ],
)
def test_council_methods_refuse_bad_indices(call, message):
    assert message in refused(CouncilMismatchError, call, council())


def test_one_label_names_every_instance():
    """The Route node labels a batched conditioning with its one text."""
    c = Council(LAYERS, PROBS, PROBS.clone(), 2, ID, ("make it blue",))
    assert c.label == ("make it blue", "make it blue")


def test_row_counts_from_the_end_like_python():
    assert council().row(-1).label == ("b",)


def test_empty_council_compacts():
    """An adapter with token-routed layers only gives councils without layers."""
    c = Council((), torch.zeros(1, 0, 4), torch.zeros(1, 0, 4), 2, ID)
    indices, weights = c.compact()
    assert indices.shape == (1, 0, 1) and weights.shape == (1, 0, 1)
    assert Council.from_dict(c.to_dict()).num_experts == 4


# ---- 3. adapter ids ----------------------------------------------------------------------------


def test_every_operation_keeps_the_adapter_id():
    c, other = council(), council(probs=PROBS.flip(-1))
    results = [
        c.row(0),
        c.row(0).expand(3),
        Council.cat([c, other]),
        force(c, [4]),
        only(c, {3: 0.5}),
        ban(c, [0]),
        scale(c, 2.0),
        top(c, 3),
        blend(c, other, 0.5),
        take(c, other, "single"),
        apply_rules(c, "double ban 0; single force 5; scale 0.5; top 2"),
        Council.from_dict(c.to_dict()),
        with_strength(c, -1.0),
    ]
    assert all(r.adapter_id == ID for r in results)


@pytest.mark.parametrize(
    "mix", [lambda a, b: Council.cat([a, b]), lambda a, b: blend(a, b, 0.5), lambda a, b: take(a, b, "double")]
)
@pytest.mark.parametrize("other_id", ["fedcba9876543210", ""])
def test_councils_of_two_adapters_never_mix(mix, other_id):
    message = refused(CouncilMismatchError, mix, council(), council(adapter_id=other_id))
    assert "routed by different adapters with the same layout" in message
    assert "route both instructions with the same adapter" in message


def test_check_adapter_refuses_a_council_without_id():
    assert "carries no adapter id" in refused(CouncilMismatchError, council(adapter_id="").check_adapter, LAYERS, 6, ID)
    assert "only be checked against an adapter's id" in refused(
        CouncilMismatchError, council().check_adapter, LAYERS, 6
    )
    assert "different adapter file" in refused(CouncilMismatchError, council().check_adapter, LAYERS, 6, "other")
    council().check_adapter(LAYERS, 6, ID)


def test_library_councils_always_carry_the_adapter_id(transformer, adapter):
    inputs = flux_inputs(batch=2)
    text, pooled = inputs["encoder_hidden_states"], inputs["pooled_projections"]
    assert adapter.adapter_id
    assert adapter.route(text, pooled).adapter_id == adapter.adapter_id
    with im.attach(transformer, adapter) as handle:
        assert handle.route(text, pooled).adapter_id == adapter.adapter_id
        with torch.no_grad():
            transformer(**inputs)
        assert handle.last_council.adapter_id == adapter.adapter_id


# ---- 4. the rule text --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("double:0-99999999999 ban 1", "block numbers are whole numbers from 0 to 10000"),
        (f"double:0-{MAX_BLOCK + 1} ban 1", "block numbers are whole numbers from 0 to 10000"),
        ("force 99999999999999999999999", "expert 999999999999… does not exist; experts are numbered 0 to 255"),
        ("force 256", "expert 256 does not exist"),
        ("force " + "9" * 5000, "does not exist"),
        ("top " + "9" * 5000, "is not possible"),
        ("double:" + "9" * 5000 + " ban 1", "block numbers are whole numbers"),
        ("force 1:nan", "'1:nan' is not E or E:W"),
        ("force 1:inf", "'1:inf' is not E or E:W"),
        ("force 1:1e308", "weight 1e+308 of expert 1 is not possible"),
        ("force 1:1e999", "weight inf of expert 1 is not possible"),
        ("force 1:-0.5", "weight -0.5 of expert 1 is not possible; a forced weight is a number above 0"),
        ("force 1:0", "to remove an expert, ban it"),
        ("only 1:101", "weight 101.0 of expert 1 is not possible"),
        ("force 1,1", "expert 1 is listed twice"),
        ("ban 2,2", "expert 2 is listed twice"),
        ("scale nan", "scale needs a number, got 'nan'; choose one from 0 to 100"),
        ("scale inf", "scale needs a number, got 'inf'"),
        ("scale 1e308", "scale factor 1e+308 is not possible; choose a number from 0 to 100"),
        ("scale -1", "scale factor -1.0 is not possible"),
        ("scale 1_000", "scale needs a number"),
        ("top 0", "top 0 is not possible"),
        ("top ²", "top needs a whole number of experts, got '²'"),
        ("force ٣", "is not E or E:W"),
        ("double:٣ ban 1", "block range '٣' is not valid"),
        ("foo.bar ban 1", "selector 'foo.bar' is not valid"),
        ("transformer_blocks.7.ff.net.2 ban 1", "picks no layer of this adapter"),
        ("all scale 50; scale 50", "would lift a council weight above 100"),
        ("all scale 0; force 1", "expert 1 has no mean weight to take"),
        ("x" * (MAX_RULES_CHARS + 1), f"the limit is {MAX_RULES_CHARS} characters"),
        ("ban 1;" * (MAX_RULES + 1), f"more than {MAX_RULES} rules"),
    ],
)
def test_rule_text_refusals_name_the_value_and_the_limit(text, message):
    assert message in refused(CouncilRuleError, apply_rules, council(), text)


def test_rule_errors_quote_a_long_rule_shortly():
    message = refused(CouncilRuleError, parse_rules, "double:" + ",".join(["1"] * 3000) + " bam 2")
    assert "unknown action 'bam'" in message and "…" in message


@pytest.mark.parametrize("text", [None, 3, b"ban 1", ["ban 1"]])
def test_rules_must_be_text(text):
    assert "rules must be text" in refused(CouncilRuleError, parse_rules, text)


def test_a_huge_range_rule_costs_no_memory():
    """25 bytes once allocated until memory ran out; ranges now stay two numbers."""
    for text in ("double:0-99999999999 ban 1", f"double:0-{MAX_BLOCK} ban 1", f"single:0-{MAX_BLOCK},5 scale 2"):
        tracemalloc.start()
        start = time.perf_counter()
        try:
            with contextlib.suppress(CouncilRuleError):
                apply_rules(council(), text)
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert peak < 1_000_000 and time.perf_counter() - start < 0.5, (text, peak)


def test_long_rule_texts_are_refused_or_parsed_quickly():
    megabyte = "double:0-5 ban 1\n" * 62_000
    start = time.perf_counter()
    assert "characters" in refused(CouncilRuleError, parse_rules, megabyte)
    valid = ("double:0-3,5,7-9 force 1:0.5,2; single top 3\n" * (MAX_RULES // 2))[:MAX_RULES_CHARS]
    assert len(parse_rules(valid)) == MAX_RULES
    assert time.perf_counter() - start < 1.0


def test_valid_rules_still_work():
    c = apply_rules(council(), "double:0-10000 force 1:0.5,5; single:* ban 0; all scale 1.5")
    assert dict(c.members(0, 0)) == pytest.approx({1: 0.75, 5: 0.4125})
    assert dict(c.members(1, 3)) == pytest.approx({1: 0.375, 2: 0.45})  # 2 inherits the banned weight


# ---- 5. the Python override functions -----------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: force(c, [True]), "expert True does not exist"),
        (lambda c: force(c, [1.0]), "expert 1.0 does not exist"),
        (lambda c: force(c, ["1"]), "expert '1' does not exist"),
        (lambda c: force(c, [6]), "expert 6 does not exist; this adapter has experts 0-5"),
        (lambda c: force(c, [-1]), "expert -1 does not exist"),
        (lambda c: force(c, [10**400]), "a whole number too large to use"),
        (lambda c: force(c, []), "no expert given"),
        (lambda c: force(c, "12"), "experts must be a list of expert numbers, got '12'"),
        (lambda c: force(c, 3), "experts must be a list"),
        (lambda c: force(c, [1, 1]), "expert 1 is listed twice"),
        (lambda c: ban(c, itertools.count()), "more than 256 experts given"),  # endless: read no further
        (lambda c: ban(c, itertools.repeat(1)), "more than 256 experts given"),
        (lambda c: ban(c, list(range(300))), "more than 256 experts given"),
        (lambda c: force(c, {1: math.nan}), "weight nan of expert 1 is not possible"),
        (lambda c: force(c, {1: -1.0}), "weight -1.0 of expert 1"),
        (lambda c: force(c, {1: 1e9}), "at most 100"),
        (lambda c: only(c, {1: "0.5"}), "weight '0.5' of expert 1"),
        (lambda c: only(c, {1: True}), "weight True of expert 1"),
        (lambda c: ban(c, {1: 0.5}), "ban takes a list of experts"),
        (lambda c: scale(c, math.nan), "scale factor nan is not possible; choose a number from 0 to 100"),
        (lambda c: scale(c, math.inf), "scale factor inf"),
        (lambda c: scale(c, -1), "scale factor -1"),
        (lambda c: scale(c, 101), "scale factor 101"),
        (lambda c: scale(c, "2"), "scale factor '2'"),
        (lambda c: scale(c, True), "scale factor True"),
        (lambda c: scale(c, None), "scale factor None"),
        (lambda c: scale(c, 10**400), "scale factor a whole number too large to use"),
        (lambda c: scale(scale(c, 100), 4), "would lift a council weight above 100"),
        (lambda c: top(c, 0), "top 0 is not possible; choose 1 to 6"),
        (lambda c: top(c, 7), "top 7"),
        (lambda c: top(c, True), "top True"),
        (lambda c: top(c, 2.0), "top 2.0"),
        (lambda c: blend(c, c, math.nan), "blend factor nan is not possible; choose a number from 0 to 1"),
        (lambda c: blend(c, c, 1.5), "blend factor 1.5"),
        (lambda c: blend(c, c, "0.5"), "blend factor '0.5'"),
        (lambda c: blend(c, c, 0.5, k=0), "top 0 is not possible"),
        (lambda c: scale(c, 2, where=3), "where must be a layer selector (text) or a bool mask of 4 layers, got 3"),
        (lambda c: scale(c, 2, where=torch.ones(4)), "bool mask of 4 layers"),
        (lambda c: scale(c, 2, where=torch.ones(3, dtype=torch.bool)), "bool mask of 4 layers"),
        (lambda c: scale(c, 2, where=[True, False]), "bool mask of 4 layers"),
        (lambda c: scale(c, 2, where="triple"), "selector 'triple' is not valid"),
        (lambda c: with_strength(c, math.nan), "expert_strength nan is not possible"),
    ],
)
def test_override_functions_check_their_arguments(call, message):
    assert message in refused(CouncilRuleError, call, council())


@pytest.mark.parametrize("fn", [lambda x: scale(x, 2), lambda x: apply_rules(x, "ban 1"), lambda x: blend(x, x, 0.5)])
def test_overrides_refuse_what_is_not_a_council(fn):
    assert "must be a Council" in refused(CouncilMismatchError, fn, {"format": "instructmole-council"})


def test_masks_and_integer_likes_are_accepted():
    c = council()
    mask = torch.tensor([True, False, False, True])
    assert torch.equal(scale(c, 2, where=mask).weights, scale(c, 2, where=[True, False, False, True]).weights)
    assert dict(force(c, [torch.tensor(4)]).members(0, 0)) == dict(force(c, [4]).members(0, 0))
    assert dict(top(c, 3).members(0, 0)) == pytest.approx({0: 0.30, 1: 0.25, 2: 0.20})


def test_take_brings_the_bans_of_the_taken_layers():
    a, b = council(), ban(council(probs=PROBS.flip(-1)), [5])
    taken = take(a, b, "single")
    assert taken.banned[:, 2:, 5].all() and not taken.banned[:, :2].any()
    assert 5 not in dict(top(taken, 2).members(0, 2))


def test_with_strength_may_invert_the_experts():
    """The merged paths fold ``expert_strength`` (which may be negative) through with_strength."""
    c = with_strength(council(), -2.0)
    assert torch.equal(c.weights, council().weights * -2.0)


def test_refusals_are_instructmole_errors():
    assert issubclass(CouncilRuleError, InstructMoLEError) and issubclass(CouncilMismatchError, InstructMoLEError)
    data = copy.deepcopy(valid_dict())
    data["weights"][0][0][0] = math.nan
    with pytest.raises(InstructMoLEError):
        Council.from_dict(data)
