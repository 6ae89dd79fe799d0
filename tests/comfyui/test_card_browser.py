"""The adapter card on a loader node in the real ComfyUI frontend (headless Chromium).

``card_browser.mjs`` loads graphs with an InstructMoLE Adapter File node and changes its adapter
the way a user does; the node must show the card's lines and the preview for a carded file, show
nothing (and keep its size) for a file the server does not have, drop the card for a file without
one, and never put the card into the prompt. Needs the same tools as test_browser.py (node,
Chromium, playwright-core; skipped with the reason otherwise).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from .conftest import SERVER_ADAPTER
from .test_browser import _chromium, _missing_tool, ours, run_driver
from .test_card_route import carded  # noqa: F401  (the fixture: a sealed adapter with card and preview)

DRIVER = Path(__file__).resolve().parent / "card_browser.mjs"


@pytest.fixture(scope="module")
def shown(comfy_server: Any, carded: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:  # noqa: F811
    if reason := _missing_tool():
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("card_browser")
    shots = os.environ.get("INSTRUCTMOLE_BROWSER_ARTIFACTS")
    job = {
        "url": comfy_server.url,
        "chromium": _chromium(),
        "carded": carded["name"],
        "plain": SERVER_ADAPTER,
        "missing": "not_on_this_server.safetensors",
        "shot": str(Path(shots) / "adapter_card.png") if shots else str(work / "adapter_card.png"),
    }
    result = run_driver(DRIVER, job, work, comfy_server, timeout=600)
    return result


def test_a_carded_adapter_shows_its_card_and_preview(shown, carded):  # noqa: F811
    loaded = shown["steps"]["loaded"]
    assert loaded["state"] == "card" and loaded["lines"][0] == "served step 7", loaded
    assert any("make it warmer" in line for line in loaded["lines"])
    assert loaded["lines"][-1].startswith(f"sha256 {carded['sha256'][:16]}")
    assert loaded["title"].startswith("title        served step 7")  # the whole card on hover
    image = loaded["image"]
    assert image["shown"] and image["naturalWidth"] == 64
    assert "/instructmole/preview?name=cards%2Fserved.safetensors" in image["src"]
    assert loaded["size"][1] >= loaded["min"][1] - 0.5  # the node made room for it
    # the drawing is not part of the prompt: the node's inputs are exactly its widget's value
    assert loaded["prompt"]["1"]["inputs"] == {"adapter": carded["name"]}


def test_an_adapter_this_server_lacks_changes_nothing(shown):
    missing = shown["steps"]["missing"]
    assert missing["hasBox"] is False and "adapter_card" not in missing["widgetNames"], missing
    asked = [m for m in shown["console"] if "404" in m["text"] and "instructmole" in m["url"]]
    assert not asked, shown["console"]


def test_choosing_another_adapter_updates_the_card(shown):
    plain, back = shown["steps"]["plain"], shown["steps"]["back"]
    assert plain["state"] == "none" and plain["lines"] == [""] and not plain["image"]["shown"], plain
    assert back["state"] == "card" and back["lines"][0] == "served step 7" and back["image"]["shown"]


def test_no_console_errors_from_the_pack(shown):
    assert not ours(shown["console"]), shown["console"]
