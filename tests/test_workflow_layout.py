"""The shipped workflows' canvas layout: what a user sees when a file opens, checked on its boxes.

Boxes as the ComfyUI frontend (LiteGraph) draws them: a node's title bar sits above its ``pos``
(``NODE_TITLE`` tall), so a node covers ``[x, y - NODE_TITLE, w, h + NODE_TITLE]``; a group covers
its ``bounding`` and its title bar is the top ``1.4 x font_size`` of it. Sizes are the ones the
files declare (scripts/workflows.py describes them, scripts/workflow_format.py places them); the
browser tests check that the frontend never needs a node taller or wider than declared, so these
boxes are the drawn ones.
"""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import pytest

from scripts import workflows as wf

SHIPPED = sorted((Path(__file__).resolve().parent.parent / "workflows").glob("*.json"))
Box = tuple[float, float, float, float]  # x0, y0, x1, y1
FLUX_MAP = 602  # the council map's height for 57 layers with its summary (tests/web/council_map.test.mjs)
SLOTS = 70  # the Council Preview's input and two outputs above the map


def node_box(node: dict) -> Box:
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - wf.NODE_TITLE, x + w, y + h


def group_box(group: dict) -> Box:
    x, y, w, h = group["bounding"]
    return x, y, x + w, y + h


def title_box(group: dict) -> Box:
    x, y, w, _ = group["bounding"]
    return x, y, x + w, y + 1.4 * group.get("font_size", wf.GROUP_FONT)


def overlap(a: Box, b: Box) -> bool:
    """Whether two boxes share any area (touching edges do not count)."""
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def inside(inner: Box, outer: Box) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


def name(node: dict) -> str:
    return f"{node['id']} ({node.get('title') or node['type']})"


def test_every_workflow_is_checked() -> None:
    assert [p.stem for p in SHIPPED] == sorted(make().name for make in wf.WORKFLOWS)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_no_two_nodes_overlap(path: Path) -> None:
    nodes = json.loads(path.read_text())["nodes"]
    clashes = [(name(a), name(b)) for a, b in combinations(nodes, 2) if overlap(node_box(a), node_box(b))]
    assert clashes == []


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_no_two_groups_overlap(path: Path) -> None:
    groups = json.loads(path.read_text())["groups"]
    assert len(groups) >= 3
    clashes = [(a["title"], b["title"]) for a, b in combinations(groups, 2) if overlap(group_box(a), group_box(b))]
    assert clashes == []


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_node_sits_in_one_group_below_its_title(path: Path) -> None:
    """Each node but the Note lies inside exactly one group and clear of every group's title bar;
    the Note lies outside every group."""
    ui = json.loads(path.read_text())
    definition = next(make() for make in wf.WORKFLOWS if make().name == path.stem)
    for node in ui["nodes"]:
        box = node_box(node)
        holders = [g["title"] for g in ui["groups"] if inside(box, group_box(g))]
        if node["type"] == "Note":
            assert not [g["title"] for g in ui["groups"] if overlap(box, group_box(g))], name(node)
            continue
        assert holders == [definition.placement()[node["id"]][0]], name(node)
        titles = [g["title"] for g in ui["groups"] if overlap(box, title_box(g))]
        assert titles == [], f"{name(node)} is under the title of {titles}"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_sizes_are_the_generators(path: Path) -> None:
    """The file's node sizes are the ones the generator declares (the browser tests hold the
    frontend to them): the grid and the council map get their room."""
    ui = json.loads(path.read_text())
    for node in ui["nodes"]:
        if node["type"] == "InstructMoLE_OverrideCouncil":
            assert node["size"][1] >= wf.OVERRIDE_GRID_FOLDED, name(node)
        if node["type"] == "InstructMoLE_CouncilPreview":  # the map of a FLUX.1 council fits after a run
            assert node["size"][0] == wf.PREVIEW_WIDTH and node["size"][1] >= FLUX_MAP + SLOTS, name(node)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_nothing_below_an_override_council(path: Path) -> None:
    """After a run Override Council shows the council map under its grid and grows downwards: no
    node, Note or other group lies below it (its own group ends under it)."""
    ui = json.loads(path.read_text())
    for node in ui["nodes"]:
        if node["type"] != "InstructMoLE_OverrideCouncil":
            continue
        x0, _, x1, bottom = node_box(node)
        below = (x0, bottom, x1, float("inf"))
        nodes = [name(n) for n in ui["nodes"] if n is not node and overlap(node_box(n), below)]
        groups = [
            g["title"]
            for g in ui["groups"]
            if overlap(group_box(g), below) and not inside(node_box(node), group_box(g))
        ]
        assert nodes == groups == [], f"{name(node)} has {nodes + groups} below it"


def test_overlap_helpers() -> None:
    assert overlap((0, 0, 10, 10), (5, 5, 15, 15))
    assert not overlap((0, 0, 10, 10), (10, 0, 20, 10))  # touching edges
    assert inside((1, 1, 2, 2), (0, 0, 2, 2)) and not inside((1, 1, 3, 2), (0, 0, 2, 2))
    # a node's title bar counts: a node 20 px below another's bottom still clears it, 20 px does not
    upper = {"pos": [0, 30], "size": [100, 100]}
    assert not overlap(node_box(upper), node_box({"pos": [0, 160], "size": [100, 50]}))
    assert overlap(node_box(upper), node_box({"pos": [0, 140], "size": [100, 50]}))
