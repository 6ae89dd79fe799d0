"""The adapter card route (nodes/card_routes.py) on a real headless ComfyUI server.

The loader nodes' web extension (web/adapter_card.js) asks ``/instructmole/card`` and
``/instructmole/preview`` for the adapter a widget names; the server must answer those, for the
files the widget lists (models/instructmole and models/loras, subfolders too), and refuse every
other name, ``../`` above all, without touching the file it points at. Also: the nodes' schemas
keep their inputs and outputs (the card is drawn by the browser, not a node socket).
"""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from .conftest import SERVER_ADAPTER, SERVER_ICEDIT


def png_bytes() -> bytes:
    """A real 64x32 PNG (the browser test decodes it; the route only serves bytes)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 32), (200, 120, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = png_bytes()


def get(server: Any, route: str, name: str | None, raw_query: str | None = None) -> tuple[int, bytes, str]:
    """GET ``route?name=<name>`` (or a raw query string): (status, body, content type)."""
    query = raw_query if raw_query is not None else urllib.parse.urlencode({"name": name})
    try:
        with urllib.request.urlopen(f"{server.url}{route}?{query}", timeout=30) as resp:
            return resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers.get("Content-Type", "")


def card_json(server: Any, name: str, route: str = "/instructmole/card") -> tuple[int, dict[str, Any]]:
    status, body, kind = get(server, route, name)
    assert "application/json" in kind, (status, body[:200])
    return status, json.loads(body)


@pytest.fixture(scope="module")
def carded(comfy_server: Any) -> dict[str, Any]:
    """A sealed adapter with a card and a preview in models/loras/cards/, and a secret file the
    route must never serve (a preview-named PNG and a safetensors file outside the folders)."""
    from instructmole import card as cards
    from instructmole.tiny import tiny_flux
    from tests.helpers import random_adapter

    base = Path(comfy_server.base_directory)
    folder = base / "models" / "loras" / "cards"
    folder.mkdir(parents=True, exist_ok=True)
    adapter = random_adapter(tiny_flux(0), seed=5)
    card = cards.build_card(
        title="served step 7",
        family=adapter.config.base_model,
        step=7,
        tasks=cards.summarize_tasks([("warm", "make it warmer"), ("cool", "cool it down")]),
        settings={"adapter": {"num_experts": 4, "top_k": 2, "rank": 4}},
        rows=2,
    )
    adapter.metadata.update(card.to_metadata())
    path = adapter.save(folder / "served.safetensors")
    sheet = base / "sheet.png"
    sheet.write_bytes(PNG)
    digest = cards.seal(path, preview=sheet)
    secret = base / "models" / "secret.safetensors"
    random_adapter(tiny_flux(0), seed=6).save(secret)
    (base / "models" / "secret.preview.png").write_bytes(b"\x89PNG secret")
    return {"name": "cards/served.safetensors", "path": path, "sha256": digest, "card": cards.read_card(path)}


def test_card_of_a_listed_adapter(comfy_server, carded):
    status, body = card_json(comfy_server, carded["name"])
    assert status == 200, body
    assert body["name"] == carded["name"] and body["card"]["title"] == "served step 7"
    assert body["card"]["step"] == 7 and [t["task"] for t in body["card"]["tasks"]] == ["warm", "cool"]
    assert body["card"]["hash_sha256"] == carded["card"].hash_sha256
    assert body["lines"][0] == "served step 7" and any("make it warmer" in line for line in body["lines"])
    assert body["text"].startswith("title        served step 7")
    assert body["preview"] is True and body["preview_version"]
    assert body["sha256"] == carded["sha256"] == hashlib.sha256(carded["path"].read_bytes()).hexdigest()
    # the frontend's api.fetchApi sends it under /api
    status, again = card_json(comfy_server, carded["name"], "/api/instructmole/card")
    assert status == 200 and again["card"] == body["card"]


def test_preview_of_a_listed_adapter(comfy_server, carded):
    status, body, kind = get(comfy_server, "/instructmole/preview", carded["name"])
    assert status == 200 and body == PNG and kind.startswith("image/png")
    status, body, _ = get(comfy_server, "/api/instructmole/preview", carded["name"])
    assert status == 200 and body == PNG


def test_adapters_without_card_or_preview(comfy_server):
    status, body = card_json(comfy_server, SERVER_ADAPTER)  # models/instructmole, made before cards
    assert status == 200 and body["card"] is None and body["lines"] == [] and body["preview"] is False
    assert body["text"].startswith("card         none")
    status, body = card_json(comfy_server, SERVER_ICEDIT)  # an ICEdit file in models/loras
    assert status == 200 and body["card"] is None
    status, _, _ = get(comfy_server, "/instructmole/preview", SERVER_ADAPTER)
    assert status == 404


@pytest.mark.parametrize(
    "name",
    [
        "../secret.safetensors",  # models/secret.safetensors: a real adapter, outside the folders
        "../../models/secret.safetensors",
        "cards/../../secret.safetensors",
        "..\\secret.safetensors",
        "/etc/passwd",
        "",
        "not_there.safetensors",
        "cards/served.preview.png",  # a file in the folder, but not one the widget lists
        "../vae/tiny_taesd16.safetensors",
    ],
)
def test_names_outside_the_list_are_refused(comfy_server, carded, name):
    status, body = card_json(comfy_server, name)
    assert status == 404 and "not an adapter file in models/instructmole or models/loras" in body["error"], body
    status, raw, kind = get(comfy_server, "/instructmole/preview", name)
    assert status == 404 and b"PNG secret" not in raw and "image" not in kind


def test_encoded_and_repeated_names_are_refused(comfy_server, carded):
    for query in ("name=%2e%2e%2fsecret.safetensors", "name=..%2Fsecret.safetensors", "", "name"):
        status, body, _ = get(comfy_server, "/instructmole/card", None, raw_query=query)
        assert status == 404, (query, body[:200])
        status, raw, kind = get(comfy_server, "/instructmole/preview", None, raw_query=query)
        assert status == 404 and b"PNG secret" not in raw and "image" not in kind, query
    # the first 'name' is the one read: a second one cannot smuggle a path past the check
    query = "name=..%2Fsecret.safetensors&name=" + urllib.parse.quote(carded["name"])
    assert get(comfy_server, "/instructmole/card", None, raw_query=query)[0] == 404


def test_a_damaged_listed_file_is_a_clear_error(comfy_server, carded):
    broken = Path(comfy_server.base_directory) / "models" / "loras" / "cards" / "broken.safetensors"
    broken.write_bytes(b"\x00" * 16)
    status, body = card_json(comfy_server, "cards/broken.safetensors")
    assert status == 422 and "is not a readable .safetensors file" in body["error"]


def test_loader_schemas_are_unchanged_by_the_card(comfy_server):
    """The card is drawn by the browser: the loaders keep exactly their inputs and outputs."""
    expected = {
        "InstructMoLE_LoadAdapter": (["model", "adapter", "lora_strength", "expert_strength"], 2),
        "InstructMoLE_AdapterFile": (["adapter"], 1),
        "InstructMoLE_LoadKontext": (["unet_name", "weight_dtype", "adapter", "lora_strength", "expert_strength"], 2),
    }
    info = comfy_server.object_info()
    for node, (inputs, outputs) in expected.items():
        assert list(info[node]["input"]["required"]) == inputs, node
        assert len(info[node]["output"]) == outputs, node


def test_without_a_server_no_routes_are_registered(instructmole_pack):
    """Loaded in-process (no ComfyUI server object), the entry point adds no routes and imports no
    web stack; the nodes work as before."""
    routes = instructmole_pack.nodes.card_routes
    if routes._registered:
        pytest.skip("a server object exists in this process")
    assert routes.register_routes() is False
