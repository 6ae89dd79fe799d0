"""The Council Preview says the same thing in its text, its map data and its numbers.

Which experts are members is decided on the unrounded weights (a weight of 0.00003 is a member
although it rounds to 0.0000); only the shown numbers are rounded, and a member's weight is never
shown as 0 (instructmole/viz.py weight_text, for the summary and the heat map). The council map
(web/lib/council_map.mjs) follows the same rule: tests/web/.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

LAYERS = ("transformer_blocks.0.ff.net.2", "single_transformer_blocks.0.proj_out")
TINY = 3e-5  # rounds to 0 at 4 decimals


@pytest.fixture
def council_nodes(instructmole_pack: Any) -> Any:
    return instructmole_pack.nodes.council_nodes


def make_council(council_nodes: Any, weights: list[list[float]]) -> Any:
    """A council of the pack's own Council class (the pack imports the library under its folder)."""
    w = torch.tensor([weights], dtype=torch.float32)
    probs = torch.full_like(w, 0.25)
    return council_nodes.Council(layers=LAYERS, probs=probs, weights=w, top_k=2, adapter_id="x", label=("an edit",))


def test_weight_text_never_shows_a_member_as_zero() -> None:
    from instructmole.viz import weight_text as text

    assert [text(0.25), text(1.5), text(0.0), text(TINY), text(-TINY), text(0.004), text(0.005)] == [
        "0.25",
        "1.50",
        "0.00",
        "<0.01",
        ">-0.01",
        "<0.01",
        "0.01",
    ]
    assert text(TINY, 4) == "<0.0001" and text(0.00006, 4) == "0.0001"


def test_text_and_map_data_count_the_same_members(council_nodes: Any) -> None:
    council = make_council(council_nodes, [[0.7, TINY, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]])
    out = council_nodes.CouncilPreview.execute(council)
    ui = out.ui if isinstance(out.ui, dict) else out.ui.as_dict()
    (data,) = ui["instructmole_council"]
    assert data["weights"][0] == [0.7, pytest.approx(TINY), 0.0, 0.0]  # rounded, but a member never to 0
    assert data["chosen"] == [[True, True, False, False], [False, False, True, True]]
    summary = ui["text"][0]
    assert "double:0  0:0.70, 1:<0.01" in summary and "single:0  2:0.50, 3:0.50" in summary
    listed = len(re.findall(r"\b\d+:[<>]?-?\d", summary))
    assert listed == sum(map(sum, data["chosen"])) == 4
