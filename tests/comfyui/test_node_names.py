"""How the nodes present themselves in the node library: one category tree, one naming pattern.

Node ids are what saved workflows name, so they never change; categories and display names are
only what the library shows. The docs and shipped workflows name the nodes as they are called now.
"""

from __future__ import annotations

import json
from typing import Any

from .conftest import REPO_ROOT

TREE = {
    "InstructMoLE/loaders": {
        "InstructMoLE_LoadAdapter",
        "InstructMoLE_LoadKontext",
        "InstructMoLE_AdapterFile",
        "InstructMoLE_ApplyAdapter",
    },
    "InstructMoLE/routing": {"InstructMoLE_TextEncode", "InstructMoLE_TextEncodeQwenImageEdit", "InstructMoLE_Route"},
    "InstructMoLE/councils": {
        "InstructMoLE_OverrideCouncil",
        "InstructMoLE_BlendCouncils",
        "InstructMoLE_ApplyCouncil",
        "InstructMoLE_CouncilPreview",
        "InstructMoLE_LoadCouncil",
        "InstructMoLE_SaveCouncilLora",
    },
    "InstructMoLE/ICEdit": {
        "InstructMoLE_ICEditDiptych",
        "InstructMoLE_ICEditRightHalf",
        "InstructMoLE_TokenExpertMap",
    },
}
OLD_NAMES = ("Load InstructMoLE Adapter", "Apply InstructMoLE Adapter", "Load Kontext + InstructMoLE")


def schemas(instructmole_pack: Any) -> dict[str, Any]:
    return {s.node_id: s for s in (n.define_schema() for n in instructmole_pack.nodes.NODES)}


def test_every_node_sits_in_one_branch_of_the_tree(instructmole_pack: Any) -> None:
    found: dict[str, set[str]] = {}
    for node_id, schema in schemas(instructmole_pack).items():
        found.setdefault(schema.category, set()).add(node_id)
    assert found == TREE


def test_display_names_read_instructmole_then_what_the_node_does(instructmole_pack: Any) -> None:
    names = {node_id: s.display_name for node_id, s in schemas(instructmole_pack).items()}
    for node_id, name in names.items():
        assert name.startswith("InstructMoLE ") and name.count("InstructMoLE") == 1, (node_id, name)
    assert len(set(names.values())) == len(names)
    assert names["InstructMoLE_LoadAdapter"] == "InstructMoLE Load Adapter"
    assert names["InstructMoLE_LoadKontext"] == "InstructMoLE Load Kontext + Adapter"
    assert names["InstructMoLE_ApplyAdapter"] == "InstructMoLE Apply Adapter"


def test_node_ids_of_saved_workflows_still_exist(instructmole_pack: Any) -> None:
    """Every InstructMoLE node type a shipped workflow names (as older saved files do) is registered."""
    ids = set(schemas(instructmole_pack))
    for path in sorted((REPO_ROOT / "workflows").glob("*.json")):
        used = {n["type"] for n in json.loads(path.read_text())["nodes"] if n["type"].startswith("InstructMoLE_")}
        assert used <= ids, (path.name, used - ids)


def test_docs_and_workflows_use_the_current_names() -> None:
    files = [
        REPO_ROOT / "README.md",
        REPO_ROOT / "workflows" / "README.md",
        *sorted((REPO_ROOT / "workflows").glob("*.json")),
        REPO_ROOT / "scripts" / "workflows.py",
    ]
    for path in files:
        text = path.read_text()
        assert not [old for old in OLD_NAMES if old in text], path.name
