"""A real ComfyUI server starts headless on CPU, lists the core nodes and loads this pack with all its nodes."""

from __future__ import annotations

from typing import Any

from .conftest import REPO_ROOT
from .test_node_names import TREE


def test_server_starts_and_lists_core_nodes(comfy_server: Any) -> None:
    info = comfy_server.object_info()
    assert "KSampler" in info
    assert comfy_server.object_info("KSampler")["KSampler"]["output"] == ["LATENT"]


def test_pack_imports_cleanly(comfy_server: Any) -> None:
    """ComfyUI's import-time summary lists '<secs> seconds[ (IMPORT FAILED)]: <pack path>' per pack;
    a pack that imports but registers nothing (no ``comfy_entrypoint``, say) shows no failure there,
    so the server must also list every node of the pack."""
    assert (REPO_ROOT / "__init__.py").is_file(), "the pack's entry point __init__.py is missing"
    lines = [line for line in comfy_server.log().splitlines() if line.rstrip().endswith("custom_nodes/instructmole")]
    assert lines, comfy_server.log()[-4000:]
    assert not any("IMPORT FAILED" in line for line in lines), comfy_server.log()[-4000:]
    missing = set().union(*TREE.values()) - set(comfy_server.object_info())
    assert not missing, (sorted(missing), comfy_server.log()[-4000:])
