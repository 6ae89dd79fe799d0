"""The routing signal follows what core conditioning nodes do to a conditioning after Text Encode.

The signal rides in ``model_conds``, which every core node copies unchanged. A node that changes
the conditioning itself (ZeroOut, Average, Concat) must not be routed as the instruction the
conditioning came from: such rows are routed from their own features, as the model sees them. A
node that only says where or when the conditioning applies (SetArea, SetMask, SetTimestepRange) or
lists entries side by side (Combine) keeps each entry's exact signal. Checked inside a real KSampler
run, row by row, against the adapter's router.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from .test_patched_model import load
from .test_sampling import expected_council, sample_and_record


def encoded(setup: dict[str, Any], seed: int, tokens: int = 16) -> list:
    """A conditioning as InstructMoLE Text Encode gives it: ComfyUI's T5 + pooled, and the exact signal."""
    g = torch.Generator().manual_seed(seed)
    cond = [[torch.randn(1, tokens, 64, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]]
    return setup["nodes"].signal.attach_signal(
        cond, torch.randn(1, 512, 64, generator=g), torch.randn(1, 32, generator=g)
    )


EDITS = ["ZeroOut", "Average_half", "Average_0", "Average_1", "Concat", "Combine", "SetArea", "SetMask"]
EDITS += ["SetTimestepRange"]


def edits() -> dict[str, tuple[Any, bool]]:
    """name -> (edit of (A, B), whether the edited rows keep A's exact signal). ComfyUI's ``nodes``
    is imported here, at run time: at collection the name is still this repository's package."""
    import nodes as n

    return {
        "ZeroOut": (lambda a, b: n.ConditioningZeroOut().zero_out(a)[0], False),
        "Average_half": (lambda a, b: n.ConditioningAverage().addWeighted(a, b, 0.5)[0], False),
        "Average_0": (lambda a, b: n.ConditioningAverage().addWeighted(a, b, 0.0)[0], False),  # B's features
        "Average_1": (lambda a, b: n.ConditioningAverage().addWeighted(a, b, 1.0)[0], True),  # A unchanged
        "Concat": (lambda a, b: n.ConditioningConcat().concat(a, b)[0], False),
        "Combine": (lambda a, b: n.ConditioningCombine().combine(a, b)[0], True),
        "SetArea": (lambda a, b: n.ConditioningSetArea().append(a, 64, 64, 0, 0, 1.0)[0], True),
        "SetMask": (lambda a, b: n.ConditioningSetMask().append(a, torch.ones(1, 128, 128), "default", 1.0)[0], True),
        "SetTimestepRange": (lambda a, b: n.ConditioningSetTimestepRange().set_range(a, 0.0, 1.0)[0], True),
    }


@pytest.mark.parametrize("name", EDITS)
def test_signal_follows_core_conditioning_edits(setup, name):
    edit, keeps = edits()[name]
    model, _ = load(setup)
    a, b = encoded(setup, 1), encoded(setup, 2)
    seen = sample_and_record(setup, model, edit(a, b), encoded(setup, 3), cfg=1.0, size=16)
    assert seen
    for call in seen:
        assert call["exact_rows"] == (keeps,) * call["rows"]
        for row in range(call["rows"]):
            kwargs = call["kwargs"] if keeps else {}  # not kept: routed from the row's own features
            want = expected_council(setup, call["context"][row], call["y"][row], kwargs, row)
            assert torch.allclose(call["council"].weights[row], want.weights[0], atol=1e-5)
            assert torch.equal(call["council"].weights[row] > 0, want.weights[0] > 0)  # the same experts
    if name == "ZeroOut":  # routed from zeros, as the model sees it: not as the instruction
        assert all(float(c["context"].abs().max()) == 0 for c in seen)


def test_a_batch_of_edited_and_unedited_rows_routes_each_its_own_way(setup):
    """Under CFG a zeroed-out negative and an exact positive share one forward: each row is routed
    its own way (the two groups' signals differ in length, so they are routed apart and joined)."""
    import nodes as n

    model, _ = load(setup)
    positive = encoded(setup, 1)
    negative = n.ConditioningZeroOut().zero_out(positive)[0]
    seen = sample_and_record(setup, model, positive, negative, cfg=2.0)
    batched = [c for c in seen if c["rows"] == 2]
    assert batched  # one forward held both rows
    for call in batched:
        assert sorted(call["exact_rows"]) == [False, True]
        for row, exact in enumerate(call["exact_rows"]):
            want = expected_council(setup, call["context"][row], call["y"][row], call["kwargs"] if exact else {}, row)
            assert torch.allclose(call["council"].weights[row], want.weights[0], atol=1e-5)
