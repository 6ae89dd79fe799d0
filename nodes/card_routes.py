"""The pack's HTTP routes: an adapter file's card and preview, for the loader nodes in the browser.

``GET /instructmole/card?name=<adapter>`` answers JSON (``card_payload``): the card as data, the
lines a node shows, the full text of ``python -m instructmole info``, whether a preview exists and
the recorded sha256. ``GET /instructmole/preview?name=<adapter>`` answers that adapter's
``<name>.preview.png``. ``web/adapter_card.js`` asks for both when a loader's ``adapter`` widget
changes. ComfyUI serves every route of the table under ``/api`` too, which is where the
frontend's ``api.fetchApi`` sends it.

Only files the loader widgets list are served: ``name`` must be one of ``adapter_files()`` (the
``.safetensors`` files ComfyUI finds in its ``instructmole`` and ``loras`` folder lists), compared
as a string, so ``../``, absolute paths and anything else outside those folders is refused (404)
before a path is built; the path ComfyUI resolves is checked to lie inside one of the folders as
well, and the preview is only ever the adapter's own ``<stem>.preview.png``. Reading a card reads
the file's header only (milliseconds), in a worker thread so the server's loop never waits on a
slow disk.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from ..instructmole import InstructMoLEError
from ..instructmole.card import preview_path, read_card_metadata, recorded_sha256, render_card, summary_lines
from .common import FOLDER, adapter_files, adapter_path

ROUTE_CARD = "/instructmole/card"
ROUTE_PREVIEW = "/instructmole/preview"
_MAX_NAME = 1024

_registered = False


def _folders() -> list[str]:
    import folder_paths

    found = []
    for kind in (FOLDER, "loras"):
        try:
            found += folder_paths.get_folder_paths(kind)
        except KeyError:  # a folder kind this ComfyUI does not know
            continue
    return [os.path.abspath(p) for p in found]


def resolve_adapter(name: Any) -> Path | None:
    """The adapter file a loader widget lists as ``name``, or ``None`` for any other string.

    Why a list lookup rather than path cleaning: the list is what ComfyUI itself found inside its
    folders, so a name that is not in it cannot point anywhere else, however it is spelled."""
    if not isinstance(name, str) or not name or len(name) > _MAX_NAME or "\x00" in name:
        return None
    if name not in adapter_files():
        return None
    path = adapter_path(name)
    if path is None:
        return None
    full = os.path.abspath(path)
    if not any(_inside(full, folder) for folder in _folders()):
        return None
    return Path(full)


def _inside(path: str, folder: str) -> bool:
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:  # another drive (Windows)
        return False


def _not_listed(name: Any) -> str:
    shown = name if isinstance(name, str) and len(name) <= 200 else "that name"
    return f"'{shown}' is not an adapter file in models/instructmole or models/loras; pick one from the list"


def card_payload(name: Any) -> tuple[int, dict[str, Any]]:
    """``(HTTP status, JSON body)`` for the card route. 404: not a listed adapter; 422: listed, but
    its header cannot be read (damaged file); 200 with ``card: null``: a file without a card."""
    path = resolve_adapter(name)
    if path is None:
        return 404, {"error": _not_listed(name)}
    try:
        _meta, card = read_card_metadata(path)
    except InstructMoLEError as err:
        return 422, {"error": str(err)}
    preview = preview_path(path)
    try:
        stamp = f"{preview.stat().st_mtime_ns}" if preview.is_file() else ""
    except OSError:
        stamp = ""
    return 200, {
        "name": name,
        "card": card.to_dict() if card is not None else None,
        "lines": summary_lines(card) if card is not None else [],
        "text": render_card(card),
        "preview": bool(stamp),
        "preview_version": stamp,
        "sha256": recorded_sha256(path),
    }


def preview_file(name: Any) -> Path | None:
    """The preview PNG of listed adapter ``name``, or ``None``."""
    path = resolve_adapter(name)
    if path is None:
        return None
    preview = preview_path(path)
    return preview if preview.is_file() else None


def register_routes() -> bool:
    """Add the routes to ComfyUI's server (once; only where a server runs). Returns whether they
    are registered. Called from ``comfy_entrypoint``, which ComfyUI runs before it adds the
    route table to its web app; in-process test harnesses without a server skip it."""
    global _registered
    if _registered:
        return True
    # ComfyUI's main imports its ``server`` module before it loads packs; where nothing did, no
    # server runs, and importing it here would only drag the web stack into a test harness.
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None or not hasattr(instance, "routes"):
        return False
    from aiohttp import web

    @instance.routes.get(ROUTE_CARD)
    async def adapter_card(request: web.Request) -> web.Response:
        status, body = await asyncio.to_thread(card_payload, request.query.get("name"))
        return web.json_response(body, status=status, headers={"Cache-Control": "no-cache"})

    @instance.routes.get(ROUTE_PREVIEW)
    async def adapter_preview(request: web.Request) -> web.StreamResponse:
        name = request.query.get("name")
        path = await asyncio.to_thread(preview_file, name)
        if path is None:
            return web.json_response({"error": _not_listed(name) + " (or it has no preview)"}, status=404)
        return web.FileResponse(path, headers={"Content-Type": "image/png", "Cache-Control": "no-cache"})

    _registered = True
    return True
