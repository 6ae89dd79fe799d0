"""A workflow described as data, turned into the file the ComfyUI frontend saves, and back.

Why a module of its own: the example workflows (``scripts/workflows.py``) are data (which nodes,
their inputs, how they connect, which group and column each sits in); everything they have in
common about the *format* is here, once:

* ``Node``, ``Group`` and ``Workflow`` describe a workflow: an API-style graph (``class_type`` +
  ``inputs``, links as ``[node, slot]``) and a ``layout``, the canvas as columns of groups, each
  group as columns of node ids. No coordinates are written by hand.
* ``place`` is the one placement function: it computes every node's position, every group's box
  and the Note's box from the layout and the node sizes, so that no two groups, nodes or titles
  overlap and the gaps are fixed (tests/test_workflow_layout.py checks the boxes, on the shipped
  files and on random layouts).
* ``build`` turns a description into the frontend's saved format (version 0.4: nodes with their
  sockets and ``widgets_values``, links, groups), using the server's ``/object_info`` for each
  node's inputs in order; ``to_prompt`` turns such a file back into the prompt the frontend would
  queue (the headless tests run exactly that prompt; the browser tests check that the frontend's
  own ``graphToPrompt`` agrees).
* ``unavailable`` tells why a server cannot hold a saved file as it is (a node type it lacks, a
  core node with other widgets): the tests skip such a workflow on an older ComfyUI with the reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote"}  # canvas notes: never sent to the server

# ---- layout (canvas units; the frontend's LiteGraph draws a node's title bar above its pos) ----------------

NODE_WIDTH = 340
NODE_TITLE = 30  # LiteGraph.NODE_TITLE_HEIGHT: the title bar above a node's pos
GROUP_FONT = 24  # a group's title bar is 1.4 x its font size tall (LGraphGroup.titleHeight)
GROUP_TOP = 75  # from a group's top edge to its first node's pos: the group title, a gap, the node title
GROUP_PAD = 15  # a group's margin left, right and below its nodes
GAP_X, GAP_Y = 60, 40  # between node columns of a group; between a node and the next one's title bar
GROUP_GAP = 40  # between groups
NOTE = "Note"  # in a layout: where the Note goes
NOTE_WIDTH, NOTE_HEIGHT = 770, 260  # the Note's least width: its title fits (the frontend widens it otherwise)
GROUP_COLOURS = ("#3f789e", "#8A8", "#b06634", "#a1309b", "#88A", "#b58b2a")


@dataclass(frozen=True)
class ModelFile:
    """A public file a loader reads: the frontend offers its download where it is missing."""

    name: str
    url: str
    directory: str  # the folder under ComfyUI/models/


@dataclass
class Node:
    """One node: what it runs (``class_type``, ``inputs``) and what only the canvas has."""

    class_type: str
    inputs: dict[str, Any]  # widget values, and links as [node id, output slot] (to a socket or a widget)
    title: str | None = None
    tall: int = 0  # extra height (a preview, a long text box, the expert grid)
    width: int = NODE_WIDTH
    models: tuple[ModelFile, ...] = ()  # the public files it loads (the frontend's ``models`` metadata)


@dataclass(frozen=True)
class Group:
    """A titled block of node columns: ``columns`` lists node ids, left to right, each top to bottom."""

    title: str
    columns: tuple[tuple[int, ...], ...]


Layout = tuple[tuple[Group | str, ...], ...]  # canvas columns, left to right, each top to bottom


@dataclass
class Workflow:
    """One workflow: its graph and its ``layout``.

    The layout lists the canvas columns left to right, each listing its groups top to bottom, and
    ``NOTE`` where the Note goes. Every node sits in exactly one column of one group. Groups never
    share a column of nodes and a canvas column is as wide as its widest group, so no group or node
    can overlap another.
    """

    name: str  # file stem
    title: str
    note: str
    nodes: dict[int, Node]
    layout: Layout

    def groups(self) -> Iterator[Group]:
        for column in self.layout:
            yield from (g for g in column if isinstance(g, Group))

    def placement(self) -> dict[int, tuple[str, int]]:
        """Each node's ``(group title, column in the group)``; raises unless every node of the graph
        is placed exactly once, the layout places no other, and the Note is placed once."""
        where: dict[int, tuple[str, int]] = {}
        for group in self.groups():
            for col, ids in enumerate(group.columns):
                for node_id in ids:
                    if node_id in where:
                        raise ValueError(f"{self.name}: node {node_id} is placed twice ({where[node_id][0]})")
                    where[node_id] = (group.title, col)
        if sorted(where) != sorted(self.nodes):
            unplaced = sorted(set(self.nodes) - set(where))
            unknown = sorted(set(where) - set(self.nodes))
            raise ValueError(f"{self.name}: nodes in no group {unplaced}, groups name unknown nodes {unknown}")
        notes = sum(column.count(NOTE) for column in self.layout)
        if notes != 1:
            raise ValueError(f"{self.name}: the layout places the Note {notes} times, not once")
        return where


# ---- a description -> the frontend's format ----------------------------------------------------------------


def _spec(info: dict[str, Any], class_type: str) -> list[tuple[str, Any, dict]]:
    """``(name, type, options)`` of every input, required first, as the frontend orders them."""
    if class_type not in info:
        raise KeyError(f"node type {class_type!r} is not installed on this server")
    inputs = info[class_type]["input"]
    out = []
    for section in ("required", "optional"):
        for name, spec in inputs.get(section, {}).items():
            out.append((name, spec[0], spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}))
    return out


def _is_widget(kind: Any) -> bool:
    return isinstance(kind, list) or kind in WIDGET_TYPES


def widget_inputs(info: dict[str, Any], class_type: str) -> list[str]:
    """The names of a node type's widget inputs, in the order its ``widgets_values`` are saved."""
    return [name for name, kind, _ in _spec(info, class_type) if _is_widget(kind)]


def _extra_values(kind: Any, options: dict) -> list[Any]:
    """Values the frontend saves after a widget's own: a seed's control mode, an image upload button."""
    if options.get("control_after_generate"):
        return ["fixed"]
    if options.get("image_upload"):
        return ["image"]
    return []


def _height(n_sockets: int, n_widgets: int, tall: int) -> int:
    return 46 + 24 * max(n_sockets, 1) + 26 * n_widgets + tall


def build(workflow: Workflow, info: dict[str, Any]) -> dict[str, Any]:
    """The frontend's saved format (version 0.4) of one description, placed by ``place``."""
    where = workflow.placement()
    nodes, links = [], []
    out_links: dict[tuple[int, int], list[int]] = {}
    for node_id in sorted(workflow.nodes, key=lambda i: (where[i][1], i)):
        node = workflow.nodes[node_id]
        sockets, widgets, values = [], [], []
        linked_widgets: list[tuple[list, dict]] = []  # (link, widget input): the slot is known once all sockets are
        for name, kind, options in _spec(info, node.class_type):
            value = node.inputs.get(name)
            linked = isinstance(value, list) and len(value) == 2 and isinstance(value[0], int)
            if _is_widget(kind):
                default = options.get("default", kind[0] if isinstance(kind, list) and kind else None)
                # A linked widget (e.g. a size from Get Image Size) keeps its default value, as the frontend saves it.
                values += [value if name in node.inputs and not linked else default, *_extra_values(kind, options)]
                widgets.append(
                    {
                        "name": name,
                        "type": "COMBO" if isinstance(kind, list) else kind,
                        "widget": {"name": name},
                        "link": None,
                    }
                )
                if linked:
                    if isinstance(kind, list):
                        raise ValueError(f"{workflow.name}: node {node_id} links its list input {name!r}")
                    link = [len(links) + 1, value[0], value[1], node_id, None, kind]
                    links.append(link)
                    out_links.setdefault((value[0], value[1]), []).append(link[0])
                    widgets[-1]["link"] = link[0]
                    linked_widgets.append((link, widgets[-1]))
                if options.get("image_upload"):
                    widgets.append(
                        {"name": "upload", "type": "IMAGEUPLOAD", "widget": {"name": "upload"}, "link": None}
                    )
                continue
            link_id = None
            if linked:
                link_id = len(links) + 1
                links.append([link_id, value[0], value[1], node_id, len(sockets), kind])
                out_links.setdefault((value[0], value[1]), []).append(link_id)
            sockets.append({"name": name, "type": kind, "link": link_id})
        inputs = sockets + widgets
        for link, widget in linked_widgets:  # a link's target slot: its input's place among all the node's inputs
            link[4] = next(i for i, entry in enumerate(inputs) if entry is widget)
        unknown = set(node.inputs) - {name for name, _, _ in _spec(info, node.class_type)}
        if unknown:
            raise ValueError(f"{workflow.name}: node {node_id} ({node.class_type}) has no input {sorted(unknown)[0]!r}")
        entry: dict[str, Any] = {
            "id": node_id,
            "type": node.class_type,
            "pos": [0, 0],  # placed by place
            "size": [node.width, _height(len(sockets), len(widgets), node.tall)],
            "flags": {},
            "order": len(nodes),
            "mode": 0,
            "inputs": inputs,
            "outputs": [],
            "properties": {"Node name for S&R": node.class_type},
            "widgets_values": values,
        }
        if node.title:
            entry["title"] = node.title
        if node.models:
            entry["properties"]["models"] = [
                {"name": m.name, "url": m.url, "directory": m.directory} for m in node.models
            ]
        nodes.append(entry)
    for entry in nodes:
        spec = info[entry["type"]]
        names = spec.get("output_name") or spec["output"]
        entry["outputs"] = [
            {"name": name, "type": kind, "links": out_links.get((entry["id"], slot), []), "slot_index": slot}
            for slot, (name, kind) in enumerate(zip(names, spec["output"], strict=True))
        ]
    groups, note_box = place(workflow.layout, {n["id"]: n for n in nodes})
    _add_note(workflow, nodes, note_box)
    return {
        "last_node_id": max(n["id"] for n in nodes),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": groups,
        "config": {},
        "extra": {"ds": {"scale": 0.6, "offset": [40, 80]}, "instructmole": {"title": workflow.title}},
        "version": 0.4,
    }


# ---- placement ---------------------------------------------------------------------------------------------


def _stack(entries: list[dict]) -> int:
    """Height of nodes stacked in one column, from the first node's pos to the last node's bottom."""
    return sum(e["size"][1] for e in entries) + (len(entries) - 1) * (NODE_TITLE + GAP_Y)


def place(layout: Layout, nodes: dict[int, dict]) -> tuple[list[dict], list[int]]:
    """Set the ``pos`` of every node entry (frontend format, by id, its ``size`` set) from the layout;
    returns the groups (frontend format) and the Note's box ``[x, y, width, height]`` (its pos and
    size: the title bar sits above it).

    A group is a block of node columns (a column as wide as its widest node, its nodes stacked in
    order ``GAP_Y`` apart, columns ``GAP_X`` apart), its title band above them and a margin around;
    groups are stacked in the canvas columns ``GROUP_GAP`` apart, and a canvas column is as wide as
    its widest group (or the Note). So every box is disjoint by construction."""

    def columns(group: Group) -> list[list[dict]]:
        return [[nodes[i] for i in ids] for ids in group.columns]

    def size(group: Group) -> tuple[int, int]:
        cols = columns(group)
        width = sum(max(e["size"][0] for e in col) for col in cols) + GAP_X * (len(cols) - 1)
        return width + 2 * GROUP_PAD, GROUP_TOP + max(_stack(col) for col in cols) + GROUP_PAD

    groups: list[dict] = []
    note_box: list[int] | None = None
    x = 0
    for column in layout:
        widths = [size(g)[0] for g in column if isinstance(g, Group)] + [NOTE_WIDTH] * (NOTE in column)
        column_width = max(widths)
        y = 0
        for group in column:
            if group == NOTE:  # the Note's title bar goes where a group's top edge would
                note_box = [x, y + NODE_TITLE, column_width, NOTE_HEIGHT]
                y += NODE_TITLE + NOTE_HEIGHT + GROUP_GAP
                continue
            width, height = size(group)
            node_x = x + GROUP_PAD
            for col in columns(group):
                node_y = y + GROUP_TOP
                for entry in col:
                    entry["pos"] = [node_x, node_y]
                    node_y += entry["size"][1] + NODE_TITLE + GAP_Y
                node_x += max(e["size"][0] for e in col) + GAP_X
            groups.append(
                {
                    "id": len(groups) + 1,
                    "title": group.title,
                    "bounding": [x, y, width, height],
                    "color": GROUP_COLOURS[len(groups) % len(GROUP_COLOURS)],
                    "font_size": GROUP_FONT,
                    "flags": {},
                }
            )
            y += height + GROUP_GAP
        x += column_width + GROUP_GAP
    if note_box is None:
        raise ValueError("the layout places no Note")
    return groups, note_box


def _add_note(workflow: Workflow, nodes: list[dict], box: list[int]) -> None:
    nodes.append(
        {
            "id": max(n["id"] for n in nodes) + 1,
            "type": "Note",
            "pos": box[:2],
            "size": box[2:],
            "flags": {},
            "order": len(nodes),
            "mode": 0,
            "inputs": [],
            "outputs": [],
            "properties": {},
            "widgets_values": [workflow.note],
            "title": f"About: {workflow.title}",
        }
    )


# ---- the frontend's format -> the prompt it queues ---------------------------------------------------------


def to_prompt(ui: dict[str, Any], info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The API prompt of a saved workflow, as the frontend's ``graphToPrompt`` builds it."""
    links = {link[0]: link for link in ui["links"]}
    prompt: dict[str, dict[str, Any]] = {}
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        if node.get("mode", 0) != 0:
            raise ValueError(
                f"node {node['id']} ({node['type']}) is muted or bypassed; shipped workflows run every node"
            )
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs: dict[str, Any] = {}
        for name, kind, options in _spec(info, node["type"]):
            if name in linked:
                link = linked[name]
                inputs[name] = [str(link[1]), link[2]]
                if _is_widget(kind):
                    values.pop(0)
                    values = values[len(_extra_values(kind, options)) :]
                continue
            if _is_widget(kind):
                if not values:
                    raise ValueError(f"node {node['id']} ({node['type']}) has no saved value for {name!r}")
                inputs[name] = values.pop(0)
                values = values[len(_extra_values(kind, options)) :]
        if values:
            raise ValueError(f"node {node['id']} ({node['type']}) has {len(values)} saved values no input takes")
        entry: dict[str, Any] = {"class_type": node["type"], "inputs": inputs}
        if node.get("title"):
            entry["_meta"] = {"title": node["title"]}
        prompt[str(node["id"])] = entry
    return prompt


# ---- whether a server can hold a saved workflow -------------------------------------------------------------


def unavailable(ui: dict[str, Any], info: dict[str, Any]) -> str | None:
    """Why a server (its ``/object_info``) cannot hold a saved workflow as it is, or None: a node type
    it lacks, or a core node whose widgets differ from the ones the file saves (a file built on a
    newer ComfyUI, e.g. v0.33's CFGNorm with ``pre_cfg``). The pack's own nodes are not compared here:
    a change to them is a change to the workflow, which the tests compare in full."""
    used = {n["type"] for n in ui["nodes"] if n["type"] not in FRONTEND_ONLY}
    missing = sorted(used - set(info))
    if missing:
        return f"this ComfyUI has no {', '.join(missing)} (node types the workflow uses)"
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY or node["type"].startswith("InstructMoLE_"):
            continue
        saved = [i["name"] for i in node.get("inputs", []) if "widget" in i and i["type"] != "IMAGEUPLOAD"]
        here = widget_inputs(info, node["type"])
        if saved != here:
            return f"this ComfyUI's {node['type']} takes the widgets {here}, the file saves {saved} (a newer ComfyUI's)"
    return None
