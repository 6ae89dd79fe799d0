"""The pack through a real headless ComfyUI server: node definitions, whole workflows, user errors.

Why a server and not only in-process calls: users run the pack through ComfyUI's discovery of
``custom_nodes``, V3 registration, ``/object_info`` serialisation (what the frontend builds widgets
and tooltips from), prompt validation (``validate_inputs``) and the execution queue, and a failure
in any of them is invisible to tests that call ``execute`` directly.

All tests share the session's one server (``comfy_server`` in conftest: 7-13 s to start). Models
come from the test node pack (``testing_pack``: tiny Flux, random conditioning, a tiny CLIP) and
from files the fixture writes (a random adapter ``tiny.safetensors``, a random TAESD VAE). Log
assertions look only at the part of the log a test produced (a character offset taken before it
posts), so test order does not matter.
"""

from __future__ import annotations

import json
import time
import urllib.error
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from .conftest import REPO_ROOT, SERVER_ADAPTER, SERVER_VAE
from .tiny_clip import T5_MIN_LENGTH, TinyCLIP

INSTRUCTION = "make the sky purple"
RULES = "single force 1; double ban 0"
BAD_RULES = "double bam 2"
BAD_RULES_MESSAGE = "unknown action 'bam'"

# Every node of the pack with its inputs (required, optional) and output types, as specified.
NODES: dict[str, tuple[list[str], list[str], list[str]]] = {
    "InstructMoLE_LoadAdapter": (
        ["model", "adapter", "lora_strength", "expert_strength"],
        [],
        ["MODEL", "INSTRUCTMOLE_ADAPTER"],
    ),
    "InstructMoLE_LoadKontext": (
        ["unet_name", "weight_dtype", "adapter", "lora_strength", "expert_strength"],
        [],
        ["MODEL", "INSTRUCTMOLE_ADAPTER"],
    ),
    "InstructMoLE_AdapterFile": (["adapter"], [], ["INSTRUCTMOLE_ADAPTER"]),
    "InstructMoLE_ApplyAdapter": (
        ["model", "adapter", "lora_strength", "expert_strength"],
        [],
        ["MODEL", "INSTRUCTMOLE_ADAPTER"],
    ),
    "InstructMoLE_TextEncode": (["clip", "text"], ["adapter"], ["CONDITIONING"]),
    "InstructMoLE_Route": (["adapter"], ["clip", "text", "conditioning"], ["INSTRUCTMOLE_COUNCIL"]),
    "InstructMoLE_OverrideCouncil": (["council", "rules"], [], ["INSTRUCTMOLE_COUNCIL"]),
    "InstructMoLE_BlendCouncils": (["council_a", "council_b", "factor", "layers"], [], ["INSTRUCTMOLE_COUNCIL"]),
    "InstructMoLE_ApplyCouncil": (["model", "council", "mode"], [], ["MODEL"]),
    "InstructMoLE_CouncilPreview": (["council"], [], ["IMAGE", "STRING"]),
    "InstructMoLE_LoadCouncil": (["file", "council_json"], [], ["INSTRUCTMOLE_COUNCIL"]),
}


# ---------------------------------------------------------------------------------------------------------------
# helpers


@pytest.fixture
def server(comfy_server: Any) -> Any:
    """The session's server; these tests need the pack itself installed in it."""
    if not (REPO_ROOT / "__init__.py").is_file():
        pytest.skip("the pack has no __init__.py yet")
    return comfy_server


def combo_options(spec: list[Any]) -> list[Any]:
    """A combo input's choices in either serialisation: V1 ``[[choices], opts]`` or V3 ``["COMBO", {"options"}]``."""
    return list(spec[0]) if isinstance(spec[0], list) else list(spec[1].get("options", []))


def wait_finished(server: Any, prompt_id: str, timeout: float = 180.0) -> dict[str, Any]:
    """The history entry once the prompt finished, successfully or not (``wait_history`` raises on error)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"ComfyUI exited ({server.process.returncode}):\n{server.log()[-4000:]}")
        entry = server.request(f"/history/{prompt_id}").get(prompt_id)
        status = (entry or {}).get("status", {})
        if status.get("completed") or status.get("status_str") == "error":
            return entry
        time.sleep(0.2)
    raise TimeoutError(f"prompt {prompt_id} not finished after {timeout}s:\n{server.log()[-4000:]}")


def post(server: Any, prompt: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """POST /prompt; returns (HTTP status, body) for accepted and rejected prompts alike."""
    body = {"prompt": prompt, "client_id": server.client_id}
    try:
        return 200, server.request("/prompt", body)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def describe(status: dict[str, Any]) -> str:
    """A failed prompt in a few lines: the node, the exception and the innermost frames."""
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            frames = "".join(data.get("traceback", [])[-3:])
            return (
                f"node {data['node_id']} ({data['node_type']}): {data['exception_type']}: "
                f"{data['exception_message']}\n{frames}"
            )
    return json.dumps(status)[:4000]


def run_ok(server: Any, prompt: dict[str, Any], timeout: float = 180.0) -> tuple[dict[str, Any], str]:
    """Run a prompt that must succeed; returns its history entry and the log it produced."""
    mark = len(server.log())
    code, body = post(server, prompt)
    assert code == 200 and not body.get("node_errors"), body
    entry = wait_finished(server, body["prompt_id"], timeout)
    assert entry["status"]["status_str"] == "success", describe(entry["status"])
    return entry, server.log()[mark:]


def workflow(model_from_apply_council: bool, prefix: str) -> dict[str, Any]:
    """The headless workflow: tiny Flux -> adapter; tiny CLIP -> Text Encode (positive) and Route ->
    Override -> Preview; KSampler on the council-applied model (or on the adapter's auto-routing
    model) -> TAESD decode -> SaveImage."""
    sampler_model = ["9", 0] if model_from_apply_council else ["2", 0]
    return {
        "1": {"class_type": "InstructMoLETest_TinyFlux", "inputs": {"seed": 0}},
        "2": {
            "class_type": "InstructMoLE_LoadAdapter",
            "inputs": {"model": ["1", 0], "adapter": SERVER_ADAPTER, "lora_strength": 1.0, "expert_strength": 1.0},
        },
        "3": {"class_type": "InstructMoLETest_TinyCLIP", "inputs": {"seed": 0}},
        "4": {"class_type": "InstructMoLE_TextEncode", "inputs": {"clip": ["3", 0], "text": INSTRUCTION}},
        "5": {"class_type": "InstructMoLETest_TinyConditioning", "inputs": {"seed": 2, "tokens": 16, "guidance": 3.5}},
        "6": {
            "class_type": "InstructMoLE_Route",
            "inputs": {"adapter": ["2", 1], "clip": ["3", 0], "text": INSTRUCTION},
        },
        "7": {"class_type": "InstructMoLE_OverrideCouncil", "inputs": {"council": ["6", 0], "rules": RULES}},
        "8": {"class_type": "InstructMoLE_CouncilPreview", "inputs": {"council": ["7", 0]}},
        "9": {
            "class_type": "InstructMoLE_ApplyCouncil",
            "inputs": {"model": ["2", 0], "council": ["7", 0], "mode": "merged"},
        },
        "10": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "11": {
            "class_type": "KSampler",
            "inputs": {
                "model": sampler_model,
                "positive": ["4", 0],
                "negative": ["5", 0],
                "latent_image": ["10", 0],
                "seed": 0,
                "steps": 3,
                "cfg": 2.0,
                "sampler_name": "euler",
                "scheduler": "simple",
                "denoise": 1.0,
            },
        },
        "12": {"class_type": "VAELoader", "inputs": {"vae_name": SERVER_VAE}},
        "13": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["12", 0]}},
        "14": {"class_type": "SaveImage", "inputs": {"images": ["13", 0], "filename_prefix": prefix}},
    }


def model_free_loader(prompt: dict[str, Any]) -> dict[str, Any]:
    """The same workflow with the adapter loaded on its own (Adapter File) and put on the model by
    InstructMoLE Apply Adapter: Route and Override no longer wait for the diffusion model."""
    prompt = json.loads(json.dumps(prompt))
    prompt["20"] = {"class_type": "InstructMoLE_AdapterFile", "inputs": {"adapter": SERVER_ADAPTER}}
    prompt["2"] = {
        "class_type": "InstructMoLE_ApplyAdapter",
        "inputs": {"model": ["1", 0], "adapter": ["20", 0], "lora_strength": 1.0, "expert_strength": 1.0},
    }
    prompt["6"]["inputs"]["adapter"] = ["20", 0]
    return prompt


def bad_rules_prompt(linked: bool) -> dict[str, Any]:
    """Route -> Override with the bad rule text, typed into the widget or linked from a string node
    (then ComfyUI cannot validate it before running, and the node's execute must report it)."""
    rules: Any = ["5", 0] if linked else BAD_RULES
    prompt: dict[str, Any] = {
        "1": {"class_type": "InstructMoLETest_TinyFlux", "inputs": {"seed": 0}},
        "2": {
            "class_type": "InstructMoLE_LoadAdapter",
            "inputs": {"model": ["1", 0], "adapter": SERVER_ADAPTER, "lora_strength": 1.0, "expert_strength": 1.0},
        },
        "3": {"class_type": "InstructMoLETest_TinyConditioning", "inputs": {"seed": 4, "tokens": 16, "guidance": 3.5}},
        "4": {"class_type": "InstructMoLE_Route", "inputs": {"adapter": ["2", 1], "conditioning": ["3", 0]}},
        "6": {"class_type": "InstructMoLE_OverrideCouncil", "inputs": {"council": ["4", 0], "rules": rules}},
        "7": {"class_type": "InstructMoLE_CouncilPreview", "inputs": {"council": ["6", 0]}},
    }
    if linked:
        prompt["5"] = {"class_type": "PrimitiveString", "inputs": {"value": BAD_RULES}}
    return prompt


# ---------------------------------------------------------------------------------------------------------------
# a. node definitions as the frontend receives them


def test_object_info_lists_every_node_with_tooltips(server: Any) -> None:
    info = server.object_info()
    missing = sorted(set(NODES) - set(info))
    assert not missing, f"not registered: {missing}"
    for node_id, (required, optional, outputs) in NODES.items():
        node = info[node_id]
        assert node["category"].startswith("InstructMoLE/"), node_id
        assert node["description"], node_id
        inputs = node["input"]
        assert list(inputs.get("required", {})) == required, node_id
        assert list(inputs.get("optional", {})) == optional, node_id
        for section in ("required", "optional"):
            for name, spec in inputs.get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}: input '{name}' has no tooltip"
        assert node["output"] == outputs, node_id
        tooltips = node.get("output_tooltips") or []
        assert len(tooltips) == len(outputs) and all(tooltips), f"{node_id}: output tooltips {tooltips}"
    assert info["InstructMoLE_CouncilPreview"]["output_node"] is True
    assert SERVER_ADAPTER in combo_options(info["InstructMoLE_LoadAdapter"]["input"]["required"]["adapter"])
    assert SERVER_ADAPTER in combo_options(info["InstructMoLE_LoadKontext"]["input"]["required"]["adapter"])
    assert combo_options(info["InstructMoLE_ApplyCouncil"]["input"]["required"]["mode"]) == ["merged", "fixed"]


# ---------------------------------------------------------------------------------------------------------------
# b. whole workflows, headless


def test_workflow_with_council_runs_and_saves(server: Any) -> None:
    entry, log = run_ok(server, workflow(model_from_apply_council=True, prefix="instructmole_merged"))
    outputs = entry["outputs"]
    saved = outputs["14"]["images"]
    assert len(saved) == 1 and saved[0]["type"] == "output", saved
    path = Path(server.base_directory, "output", saved[0]["subfolder"], saved[0]["filename"])
    assert path.is_file() and path.stat().st_size > 0, path
    preview = outputs["8"]
    assert preview.get("images") and preview.get("text"), preview
    shown = preview["images"][0]
    assert Path(server.base_directory, shown["type"], shown["subfolder"], shown["filename"]).is_file(), shown
    assert any(line.strip() for line in preview["text"]), preview["text"]
    assert not crashes(log), log[-4000:]


def test_workflow_with_auto_routing_runs(server: Any) -> None:
    """The adapter's own MODEL straight into KSampler: every row is routed from its conditioning."""
    entry, log = run_ok(server, workflow(model_from_apply_council=False, prefix="instructmole_auto"))
    saved = entry["outputs"]["14"]["images"]
    path = Path(server.base_directory, "output", saved[0]["subfolder"], saved[0]["filename"])
    assert path.is_file(), path
    assert not crashes(log), log[-4000:]


def test_model_free_loader_gives_the_same_image(server: Any) -> None:
    """Adapter File + InstructMoLE Apply Adapter is the one-node loader split in two: same pixels."""
    images = []
    for prefix, prompt in (
        ("instructmole_one_node", workflow(model_from_apply_council=True, prefix="instructmole_one_node")),
        ("instructmole_two_nodes", model_free_loader(workflow(True, prefix="instructmole_two_nodes"))),
    ):
        entry, log = run_ok(server, prompt)
        saved = entry["outputs"]["14"]["images"][0]
        assert saved["filename"].startswith(prefix), saved
        with Image.open(Path(server.base_directory, "output", saved["subfolder"], saved["filename"])) as image:
            images.append(np.asarray(image.convert("RGB")))  # the PNG bytes differ: they embed the prompt
        assert not crashes(log), log[-4000:]
    assert images[0].std() > 0 and np.array_equal(images[0], images[1])


# ---------------------------------------------------------------------------------------------------------------
# c. a user's mistake reaches the client as a message


def test_missing_adapter_file_is_rejected_at_prompt_validation(server: Any) -> None:
    """As core loaders: a file that is not in the list fails POST /prompt (400), nothing runs."""
    for prompt in (workflow(True, prefix="x"), model_free_loader(workflow(True, prefix="x"))):
        node = "20" if "20" in prompt else "2"
        prompt[node]["inputs"]["adapter"] = "not_there.safetensors"
        code, body = post(server, prompt)
        assert code == 400 and node in body.get("node_errors", {}), json.dumps(body)[:4000]
        assert "not_there.safetensors" in json.dumps(body["node_errors"][node])


def test_bad_rule_text_is_a_validation_error_without_traceback(server: Any) -> None:
    """Typed into the widget, the rules are checked by the node's validate_inputs: POST /prompt
    answers 400 with the message under node_errors, nothing runs, and nothing is logged as a crash."""
    mark = len(server.log())
    code, body = post(server, bad_rules_prompt(linked=False))
    errors = json.dumps(body)
    if code == 200:  # not validated up front: it must then fail at execution, with the message
        entry = wait_finished(server, body["prompt_id"])
        errors = json.dumps(entry["status"])
        assert entry["status"]["status_str"] == "error", errors[:4000]
    else:
        assert code == 400 and body.get("node_errors"), errors[:4000]
        assert "6" in body["node_errors"], errors[:4000]
    assert BAD_RULES_MESSAGE in errors, errors[:4000]
    assert not crashes(server.log()[mark:]), server.log()[mark:][-4000:]


def test_bad_rule_text_from_a_link_fails_at_execution_with_the_message(server: Any) -> None:
    """Linked from another node, the text is only known at run time: the prompt is accepted, then
    fails with an execution_error that carries the node's message. (ComfyUI itself always logs a
    traceback for an exception raised by a node -- execution.py -- so the log is not checked here.)"""
    code, body = post(server, bad_rules_prompt(linked=True))
    assert code == 200, json.dumps(body)[:4000]
    entry = wait_finished(server, body["prompt_id"])
    assert entry["status"]["status_str"] == "error", json.dumps(entry["status"])[:4000]
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert errors and errors[0]["node_type"] == "InstructMoLE_OverrideCouncil", describe(entry["status"])
    assert BAD_RULES_MESSAGE in errors[0]["exception_message"], errors[0]["exception_message"]
    assert errors[0]["exception_message"].startswith("InstructMoLE Override Council, input 'rules': ")


# ---------------------------------------------------------------------------------------------------------------
# d. clean start


def tracebacks(log: str) -> list[str]:
    """Every traceback block in a log: from 'Traceback (most recent call last):' through the
    exception line (the first line after it that is not indented)."""
    blocks: list[str] = []
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last):"):
            end = next((j for j in range(i + 1, len(lines)) if not lines[j].startswith(" ")), len(lines) - 1)
            blocks.append("\n".join(lines[i : end + 1]))
    return blocks


# ComfyUI v0.3.64's asset database (SQLAlchemy over SQLite) logs this when the garbage collector closes
# a pooled connection from another thread: its own noise, harmless, and unrelated to any node.
SQLITE_POOL_NOISE = "sqlite3.ProgrammingError: SQLite objects created in a thread can only be used in that same thread"


def crashes(log: str) -> list[str]:
    """The traceback blocks of a server log that tell of a failure (all but ComfyUI's own pool noise)."""
    return [t for t in tracebacks(log) if SQLITE_POOL_NOISE not in t]


def test_packs_load_cleanly(server: Any) -> None:
    """ComfyUI's import summary prints '<secs> seconds[ (IMPORT FAILED)]: <pack path>' per pack, and
    no traceback before the first prompt ('got prompt') involves either pack. (ComfyUI logs its own
    tracebacks at start for optional extras whose dependencies are missing, e.g. torchaudio for
    comfy_extras/nodes_audio.py; those are not ours and are not counted.)"""
    startup = server.log().split("got prompt", 1)[0]
    for pack in ("instructmole", "instructmole_testing"):
        lines = [line for line in startup.splitlines() if line.rstrip().endswith(f"custom_nodes/{pack}")]
        assert lines, f"no import line for {pack}:\n{startup[-4000:]}"
        assert not any("IMPORT FAILED" in line for line in lines), lines
    ours = [t for t in tracebacks(startup) if "instructmole" in t.lower() or str(REPO_ROOT) in t]
    assert not ours, "\n\n".join(ours)


# ---------------------------------------------------------------------------------------------------------------
# the tiny CLIP keeps ComfyUI's shapes (in-process, no server)


def test_tiny_clip_mirrors_comfy_flux_tokenizer_and_clip() -> None:
    """TinyCLIP's token structure matches ComfyUI's real FluxTokenizer (whose vocabularies ship with
    ComfyUI), and its encodes return what ``comfy.sd.CLIP`` returns; at the training length it
    equals the core's tiny encoders exactly."""
    from comfy.text_encoders.flux import FluxTokenizer

    clip = TinyCLIP(0)
    real = FluxTokenizer()
    for options in ({}, {"tokenizer_options": {"t5xxl_min_length": 512}}):
        ours, theirs = clip.tokenize(INSTRUCTION, **options), real.tokenize_with_weights(INSTRUCTION, **options)
        assert ours.keys() == theirs.keys() == {"l", "t5xxl"}
        assert len(ours["t5xxl"]) == len(theirs["t5xxl"]) == 1
        assert len(ours["t5xxl"][0]) == len(theirs["t5xxl"][0])  # both pad T5 to the minimum length
        assert all(len(p) == 2 and p[1] == 1.0 for p in ours["t5xxl"][0] + ours["l"][0])
    assert len(clip.tokenize(INSTRUCTION)["t5xxl"][0]) == T5_MIN_LENGTH
    with_ids = clip.tokenize(INSTRUCTION, return_word_ids=True)
    assert all(len(p) == 3 for p in with_ids["t5xxl"][0])

    tokens = clip.tokenize(INSTRUCTION)
    cond = clip.encode_from_tokens(tokens)
    assert cond.shape == (1, T5_MIN_LENGTH, 64)
    cond2, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    assert torch.equal(cond, cond2) and pooled.shape == (1, 32)
    as_dict = clip.encode_from_tokens(tokens, return_dict=True)
    assert set(as_dict) == {"cond", "pooled_output"}
    scheduled = clip.encode_from_tokens_scheduled(tokens, add_dict={"guidance": 2.5})
    assert len(scheduled) == 1 and torch.equal(scheduled[0][0], cond)
    assert set(scheduled[0][1]) == {"pooled_output", "guidance"} and torch.equal(
        scheduled[0][1]["pooled_output"], pooled
    )

    exact = clip.encode_from_tokens(clip.tokenize(INSTRUCTION, tokenizer_options={"t5xxl_min_length": 512}), True)
    want = clip.encoders.encode([INSTRUCTION])
    assert torch.equal(exact[0], want[0]) and torch.equal(exact[1], want[1])
