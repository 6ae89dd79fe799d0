"""Council overrides and their text form: each action, selectors, composition, errors."""

from __future__ import annotations

import pytest
import torch

from instructmole import (
    Council,
    CouncilMismatchError,
    CouncilRuleError,
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

LAYERS = (
    "transformer_blocks.0.ff.net.2",
    "transformer_blocks.1.ff.net.2",
    "single_transformer_blocks.0.proj_out",
    "single_transformer_blocks.1.proj_out",
)
# One instance; per layer the router prefers experts 0 > 1 > 2 > 3 > 4 > 5.
PROBS = torch.tensor([0.30, 0.25, 0.20, 0.12, 0.08, 0.05]).expand(1, 4, 6).clone()
ADAPTER_ID = "0123456789abcdef"  # councils carry the id of the adapter that routed them


def council(k: int = 2) -> Council:
    weights, indices = PROBS.topk(k, -1)
    return Council.from_topk(LAYERS, PROBS, indices, weights, adapter_id=ADAPTER_ID)


def members(c: Council, layer: int) -> dict[int, float]:
    return {e: round(w, 4) for e, w in c.members(0, layer)}


def test_compact_gives_members_heaviest_first():
    idx, w = council().compact()
    assert idx[0, 0].tolist() == [0, 1] and torch.allclose(w[0, 0], torch.tensor([0.30, 0.25]))


def test_force_replaces_weakest_and_uses_mean_weight():
    c = force(council(), [4], where="all")
    assert members(c, 0) == {0: 0.30, 4: 0.275}  # 1 (weakest) made room; 4 gets the mean 0.275
    c = force(council(), {4: 0.9, 5: 0.1}, where="single")
    assert members(c, 0) == {0: 0.30, 1: 0.25}  # double layers untouched
    assert members(c, 2) == {4: 0.9, 5: 0.1}


def test_only_sets_exact_council():
    c = only(council(), {3: 0.5, 4: None, 5: 0.2}, where="double:1")
    assert members(c, 1) == {3: 0.5, 4: 0.275, 5: 0.2}
    assert members(c, 0) == {0: 0.30, 1: 0.25}


def test_ban_refills_with_next_best_routed():
    """``ban 2 routed``: the newcomer keeps its own router probability as its weight."""
    c = ban(council(), [0], where="all", inherit=False)
    assert members(c, 3) == {1: 0.25, 2: 0.20}
    c = ban(c, [1, 2], where="single:1", inherit=False)
    assert members(c, 3) == {3: 0.12, 4: 0.08}  # 0 stays banned: refills skip it
    assert members(top(c, 2), 3) == {3: 0.12, 4: 0.08}
    assert members(top(c, 2), 0) == {1: 0.25, 2: 0.20}
    assert members(force(c, [0], where="single:1"), 3) == {0: 0.10, 3: 0.12}  # force lifts the ban
    assert members(top(force(c, [0], where="single:1"), 2), 3) == {0: 0.30, 3: 0.12}
    assert members(apply_rules(council(), "ban 0 routed"), 3) == {1: 0.25, 2: 0.20}


def test_ban_newcomer_inherits_the_banned_weight():
    """``ban 2`` (the default): the layer keeps its strength; the heaviest banned weight goes to the
    most probable newcomer."""
    c = ban(council(), [0], where="all")
    assert members(c, 3) == {1: 0.25, 2: 0.30}
    c = ban(c, [1, 2], where="single:1")
    assert members(c, 3) == {3: 0.30, 4: 0.25}
    assert members(apply_rules(council(), "single:1 ban 0"), 3) == {1: 0.25, 2: 0.30}
    total = council().weights.sum(-1)
    torch.testing.assert_close(ban(council(), [0, 1]).weights.sum(-1), total)


def test_scale_and_top():
    assert members(scale(council(), 2.0, where="double"), 0) == {0: 0.6, 1: 0.5}
    assert members(scale(council(), 0.0), 0) == {}
    assert members(top(council(), 3), 2) == {0: 0.30, 1: 0.25, 2: 0.20}


def test_blend_mixes_probabilities_then_top_k():
    a = council()
    other = PROBS.flip(-1)  # prefers 5 > 4 > ...
    w, i = other.topk(2, -1)
    b = Council.from_topk(LAYERS, other, i, w, adapter_id=ADAPTER_ID)
    half = blend(a, b, 0.5)
    assert torch.allclose(half.probs, (PROBS + other) / 2)
    assert set(members(blend(a, b, 1.0), 0)) == {5, 4}
    assert set(members(blend(a, b, 0.0), 0)) == {0, 1}
    mixed = take(a, b, where="single:0")
    assert set(members(mixed, 2)) == {5, 4} and set(members(mixed, 0)) == {0, 1}


def test_text_form_composes_rules_in_order():
    c = apply_rules(council(), "single:0-1 force 4,5; double:* ban 0\nall scale 2")
    assert members(c, 2) == {4: 0.55, 5: 0.55}
    assert members(c, 0) == {1: 0.5, 2: 0.6}  # 2 took over the banned expert's 0.3, then x2
    c = apply_rules(council(), "ban 1  # no selector means all")
    assert members(c, 0) == {0: 0.30, 2: 0.25}  # 2 inherits 0.25 from the banned 1


def test_text_form_layer_name_selector_and_weights():
    c = apply_rules(council(), f"{LAYERS[3]} only 2:0.7, 3:0.1")
    assert members(c, 3) == {2: 0.7, 3: 0.1} and members(c, 2) == {0: 0.30, 1: 0.25}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "double:* bam 2",
            "rule 1 ('double:* bam 2'): unknown action 'bam'; valid actions: force, only, ban, scale, top",
        ),
        ("all scale lots", "scale needs a number, got 'lots'"),
        ("double:3-1 ban 2", "block range '3-1' runs backwards"),
        ("double:x ban 2", "block range 'x' is not valid"),
        ("triple ban 2", "selector 'triple' is not valid"),
        ("all force 1:abc", "'1:abc' is not E or E:W"),
        ("ban 1:0.5", "'1:0.5' is not an expert number"),
        ("all top two", "top needs a whole number of experts, got 'two'"),
        ("all ban", "'ban' needs an argument"),
        (
            "ban 1; single:7 ban 2",
            "rule 2 ('single:7 ban 2'): selector 'single:7' picks no layer of this adapter "
            "(it has double 0-1, single 0-1)",
        ),
        ("force 9", "expert 9 does not exist; this adapter has experts 0-5"),
        ("top 7", "top 7 is not possible; choose 1 to 6"),
    ],
)
def test_text_form_errors_name_the_bad_token(text, message):
    with pytest.raises(CouncilRuleError) as err:
        apply_rules(council(), text)
    assert message in str(err.value)


def test_parse_is_pure_and_reusable():
    rules = parse_rules("double ban 0; scale 0.5")
    assert [r.action for r in rules] == ["ban", "scale"]
    c0 = council()
    out = c0
    for rule in rules:
        out = rule(out)
    assert members(c0, 0) == {0: 0.30, 1: 0.25}  # the input council is unchanged
    assert members(out, 0) == {1: 0.125, 2: 0.15}  # 2 took over 0's 0.3, then x0.5


def test_council_json_round_trip_and_mismatch():
    c = council()
    back = Council.from_dict(c.to_dict())
    assert back.layers == c.layers and torch.equal(back.weights, c.weights)
    with pytest.raises(CouncilMismatchError, match="another adapter"):
        c.check_adapter(LAYERS[:2], 6)
    with pytest.raises(CouncilMismatchError, match="not an InstructMoLE council"):
        Council.from_dict({"format": "x"})
