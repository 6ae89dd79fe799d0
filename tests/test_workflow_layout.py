"""The workflows' canvas layout: what a user sees when a file opens, checked on its boxes.

Boxes as the ComfyUI frontend (LiteGraph) draws them: a node's title bar sits above its ``pos``
(``NODE_TITLE`` tall), so a node covers ``[x, y - NODE_TITLE, w, h + NODE_TITLE]``; a group covers
its ``bounding`` and its title bar is the top ``1.4 x font_size`` of it. Sizes are the ones the
files declare (scripts/workflows.py describes them, scripts/workflow_format.py places them); the
browser tests check that the frontend never needs a node taller or wider than declared, so these
boxes are the drawn ones.

The same checks run on the shipped files and on random layouts built by the placement function
(with a stand-in for the server's ``/object_info``): no coordinate is written by hand, so the
properties must hold for any layout, not only for the six that ship.
"""

from __future__ import annotations

import json
import random
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest

from scripts import workflow_format as fmt
from scripts import workflows as wf

SHIPPED = sorted((Path(__file__).resolve().parent.parent / "workflows").glob("*.json"))
Box = tuple[float, float, float, float]  # x0, y0, x1, y1
FLUX_MAP = 602  # the council map's height for 57 layers with its summary (tests/web/council_map.test.mjs)
SLOTS = 70  # the Council Preview's input and two outputs above the map
READABLE = 40  # the least gap between two nodes or two groups (title bars included) that reads as a gap


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


def gap(a: Box, b: Box) -> float:
    """How far apart two boxes are: along x or along y, whichever separates them more (< 0: overlap)."""
    return max(a[0] - b[2], b[0] - a[2], a[1] - b[3], b[1] - a[3])


def name(node: dict) -> str:
    return f"{node['id']} ({node.get('title') or node['type']})"


# ---- the checks, each a list of what breaks it (empty: it holds) -------------------------------------------


def overlapping_nodes(ui: dict) -> list:
    return [(name(a), name(b)) for a, b in combinations(ui["nodes"], 2) if overlap(node_box(a), node_box(b))]


def overlapping_groups(ui: dict) -> list:
    groups = ui["groups"]
    return [(a["title"], b["title"]) for a, b in combinations(groups, 2) if overlap(group_box(a), group_box(b))]


def misplaced_nodes(ui: dict, definition: fmt.Workflow) -> list:
    """Nodes not inside exactly their own group, or under a group's title bar; a Note on a group."""
    where = definition.placement()
    problems = []
    for node in ui["nodes"]:
        box = node_box(node)
        if node["type"] == "Note":
            problems += [(name(node), "on", g["title"]) for g in ui["groups"] if overlap(box, group_box(g))]
            continue
        holders = [g["title"] for g in ui["groups"] if inside(box, group_box(g))]
        if holders != [where[node["id"]][0]]:
            problems.append((name(node), "in", holders))
        problems += [(name(node), "under the title of", g["title"]) for g in ui["groups"] if overlap(box, title_box(g))]
    return problems


def crowded(ui: dict) -> list:
    """Pairs of nodes (the Note too) or of groups closer than ``READABLE``."""
    nodes = [(name(a), name(b)) for a, b in combinations(ui["nodes"], 2) if gap(node_box(a), node_box(b)) < READABLE]
    groups = [
        (a["title"], b["title"]) for a, b in combinations(ui["groups"], 2) if gap(group_box(a), group_box(b)) < READABLE
    ]
    return nodes + groups


def backward_links(ui: dict, definition: fmt.Workflow) -> list:
    """Links inside one group that run right to left (down a column or to the right is the flow)."""
    where = definition.placement()
    by_id = {n["id"]: n for n in ui["nodes"]}
    problems = []
    for _, source, _, target, _, _ in ui["links"]:
        if where[source][0] == where[target][0] and by_id[source]["pos"][0] > by_id[target]["pos"][0]:
            problems.append((name(by_id[source]), name(by_id[target])))
    return problems


# ---- the shipped files ---------------------------------------------------------------------------------------


def shipped(path: Path) -> tuple[dict, fmt.Workflow]:
    return json.loads(path.read_text()), next(make() for make in wf.WORKFLOWS if make().name == path.stem)


def test_every_workflow_is_checked() -> None:
    assert [p.stem for p in SHIPPED] == sorted(make().name for make in wf.WORKFLOWS)


def test_every_definition_places_each_node_once() -> None:
    for make in wf.WORKFLOWS:
        definition = make()
        assert sorted(definition.placement()) == sorted(definition.nodes), definition.name


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_no_two_nodes_overlap(path: Path) -> None:
    assert overlapping_nodes(shipped(path)[0]) == []


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_no_two_groups_overlap(path: Path) -> None:
    ui, _ = shipped(path)
    assert len(ui["groups"]) >= 3
    assert overlapping_groups(ui) == []


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_node_sits_in_one_group_below_its_title(path: Path) -> None:
    """Each node but the Note lies inside exactly its own group and clear of every group's title
    bar; the Note lies outside every group."""
    assert misplaced_nodes(*shipped(path)) == []


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_spacing_is_readable(path: Path) -> None:
    assert crowded(shipped(path)[0]) == []


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_links_in_a_group_run_left_to_right(path: Path) -> None:
    assert backward_links(*shipped(path)) == []


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


# ---- the placement function on layouts that do not ship ----------------------------------------------------

# A stand-in for the server's /object_info: a source with a widget, and a node taking two links.
INFO: dict[str, Any] = {
    "Source": {"input": {"required": {"value": ["INT", {"default": 1}]}}, "output": ["X"], "output_name": ["X"]},
    "Join": {"input": {"required": {"a": ["X"], "b": ["X"]}}, "output": ["X"], "output_name": ["X"]},
}


def random_workflow(rng: random.Random) -> fmt.Workflow:
    """Canvas columns of groups of node columns, of random sizes; each node after a group's first
    column joins the last node of the column before it and its own predecessor (or itself twice)."""
    nodes: dict[int, fmt.Node] = {}
    layout: list[tuple[fmt.Group | str, ...]] = []
    for c in range(rng.randint(1, 3)):
        column: list[fmt.Group | str] = []
        for g in range(rng.randint(1, 3)):
            ids: list[tuple[int, ...]] = []
            for _ in range(rng.randint(1, 3)):
                col = tuple(range(len(nodes) + 1, len(nodes) + 1 + rng.randint(1, 3)))
                for i in col:
                    size = {"tall": rng.choice((0, 60, 260, 630)), "width": rng.choice((340, 380, 440))}
                    if ids:
                        link = [ids[-1][-1], 0]
                        nodes[i] = fmt.Node("Join", {"a": link, "b": [i - 1, 0] if i > col[0] else link}, **size)
                    else:
                        nodes[i] = fmt.Node("Source", {"value": i}, **size)
                ids.append(col)
            column.append(fmt.Group(f"group {c}.{g}", tuple(ids)))
        layout.append(tuple(column))
    i = rng.randrange(len(layout))
    at = rng.randint(0, len(layout[i]))
    layout[i] = (*layout[i][:at], fmt.NOTE, *layout[i][at:])
    return fmt.Workflow("random", "A random layout", "about it", nodes, tuple(layout))


def test_placement_holds_for_random_layouts() -> None:
    rng = random.Random(0)
    for _ in range(100):
        definition = random_workflow(rng)
        ui = fmt.build(definition, INFO)
        assert len(ui["nodes"]) == len(definition.nodes) + 1  # and the Note
        assert overlapping_nodes(ui) == overlapping_groups(ui) == [], definition.layout
        assert misplaced_nodes(ui, definition) == [], definition.layout
        assert crowded(ui) == [], definition.layout
        assert backward_links(ui, definition) == [], definition.layout


def two_groups(layout_of: Any) -> fmt.Workflow:
    nodes = {1: fmt.Node("Source", {"value": 1}), 2: fmt.Node("Join", {"a": [1, 0], "b": [1, 0]})}
    return fmt.Workflow(
        "small", "Small", "about it", nodes, layout_of(fmt.Group("A", ((1,),)), fmt.Group("B", ((2,),)))
    )


def test_build_places_columns_left_to_right_and_the_note_where_the_layout_says() -> None:
    ui = fmt.build(two_groups(lambda a, b: ((a, fmt.NOTE), (b,))), INFO)
    (source, join, note) = ui["nodes"]
    assert source["pos"][0] < join["pos"][0] and note["type"] == "Note"
    assert note["pos"][0] == 0 and note["pos"][1] > source["pos"][1]  # under the first group
    assert [g["title"] for g in ui["groups"]] == ["A", "B"]
    assert ui["links"] == [[1, 1, 0, 2, 0, "X"], [2, 1, 0, 2, 1, "X"]]


@pytest.mark.parametrize(
    ("layout_of", "message"),
    [
        (lambda a, b: ((a, fmt.NOTE),), r"nodes in no group \[2\]"),
        (lambda a, b: ((a, b, fmt.NOTE), (b,)), "node 2 is placed twice"),
        (lambda a, b: ((a, b, fmt.Group("C", ((3,),)), fmt.NOTE),), r"unknown nodes \[3\]"),
        (lambda a, b: ((a, b),), "places the Note 0 times"),
    ],
)
def test_build_refuses_a_layout_that_does_not_place_every_node_once(layout_of: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fmt.build(two_groups(layout_of), INFO)


def test_box_helpers() -> None:
    assert overlap((0, 0, 10, 10), (5, 5, 15, 15))
    assert not overlap((0, 0, 10, 10), (10, 0, 20, 10))  # touching edges
    assert inside((1, 1, 2, 2), (0, 0, 2, 2)) and not inside((1, 1, 3, 2), (0, 0, 2, 2))
    assert gap((0, 0, 10, 10), (50, 0, 60, 10)) == 40 and gap((0, 0, 10, 10), (5, 5, 15, 15)) < 0
    # a node's title bar counts: a node 20 px below another's bottom still clears it, 20 px does not
    upper = {"pos": [0, 30], "size": [100, 100]}
    assert not overlap(node_box(upper), node_box({"pos": [0, 160], "size": [100, 50]}))
    assert overlap(node_box(upper), node_box({"pos": [0, 140], "size": [100, 50]}))
