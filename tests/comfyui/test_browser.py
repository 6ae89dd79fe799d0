"""The shipped workflows and the council map in the real ComfyUI frontend (headless Chromium).

One browser session (``browser_driver.mjs``, playwright-core from node) against the session's
headless server: every ``workflows/*.json`` is loaded with ``app.loadGraphData`` and converted
with the frontend's own ``app.graphToPrompt``; then a small graph (tiny CLIP, the test adapter
file, Route, Override Council, Council Preview; no sampler) is queued from the page, and the
council map the frontend draws is checked against the server's result.

Needs, besides COMFYUI_PATH (skipped with the reason otherwise):

- ``node`` on PATH;
- Chromium: ``INSTRUCTMOLE_CHROMIUM``, else ``chromium`` on PATH, else ``/usr/bin/chromium``;
- playwright-core: ``INSTRUCTMOLE_PLAYWRIGHT_DIR`` (a ``node_modules`` folder, or a folder holding
  one, e.g. the ``--prefix`` of ``npm install --prefix /tmp/shot playwright-core``), else a
  ``NODE_PATH`` entry holding ``playwright-core``.

A workflow the server cannot hold as it is (``scripts.workflow_format.unavailable``: a node type it
lacks, e.g. FLUX.2's on v0.3.64, or a core node with other widgets than the file saves) is not loaded,
and its tests skip with the reason.

Screenshots of each loaded workflow (1600x900, graph fitted to the view) and of the run go to
``INSTRUCTMOLE_BROWSER_ARTIFACTS`` (default: a pytest temp folder). With
``INSTRUCTMOLE_UPDATE_SCREENSHOTS=1`` the workflow pictures are also copied to docs/workflows/
(what the README shows).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from scripts import workflows as wf
from scripts.workflow_format import unavailable

from .conftest import REPO_ROOT, SERVER_ADAPTER

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "browser_driver.mjs"
SHIPPED = sorted((REPO_ROOT / "workflows").glob("*.json"))
DOCS = REPO_ROOT / "docs" / "workflows"
IMAGES = {"example.png": 0, "example_2.png": 1}  # the placeholder inputs the workflows name
INSTRUCTION = "make the sky a stormy purple"
RULES = "double:0 ban 1"
# The run: ids as the page keeps them (loadApiJson keeps API ids).
RUN_PROMPT: dict[str, dict[str, Any]] = {
    "1": {"class_type": "InstructMoLETest_TinyCLIP", "inputs": {"seed": 0}},
    "2": {"class_type": "InstructMoLE_AdapterFile", "inputs": {"adapter": SERVER_ADAPTER}},
    "3": {"class_type": "InstructMoLE_Route", "inputs": {"adapter": ["2", 0], "clip": ["1", 0], "text": INSTRUCTION}},
    "4": {"class_type": "InstructMoLE_OverrideCouncil", "inputs": {"council": ["3", 0], "rules": RULES}},
    "5": {"class_type": "InstructMoLE_CouncilPreview", "inputs": {"council": ["4", 0]}},
}
PREVIEW_ID, OVERRIDE_ID = "5", "4"


def _chromium() -> str | None:
    found = os.environ.get("INSTRUCTMOLE_CHROMIUM") or shutil.which("chromium")
    found = found or ("/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None)
    return found if found and Path(found).is_file() else None


def _playwright_modules() -> str | None:
    """The node_modules folder holding playwright-core, from INSTRUCTMOLE_PLAYWRIGHT_DIR or NODE_PATH."""
    candidates = []
    if chosen := os.environ.get("INSTRUCTMOLE_PLAYWRIGHT_DIR"):
        candidates += [Path(chosen), Path(chosen) / "node_modules"]
    candidates += [Path(p) for p in os.environ.get("NODE_PATH", "").split(os.pathsep) if p]
    return next((str(c) for c in candidates if (c / "playwright-core" / "package.json").is_file()), None)


def _missing_tool() -> str | None:
    if not shutil.which("node"):
        return "node is not on PATH"
    if not _chromium():
        return "no Chromium: set INSTRUCTMOLE_CHROMIUM or install chromium (/usr/bin/chromium)"
    if not _playwright_modules():
        return (
            "playwright-core not found: `npm install --prefix DIR playwright-core`, then set "
            "INSTRUCTMOLE_PLAYWRIGHT_DIR=DIR (or NODE_PATH=DIR/node_modules)"
        )
    return None


def run_driver(driver: Path, job: dict[str, Any], work: Path, comfy_server: Any, timeout: float) -> dict[str, Any]:
    """Run a Node driver script on ``job`` (written to ``work``) and return its result; fail with its
    output, and the server's log, when it wrote none or reported an error."""
    (work / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "NODE_PATH": _playwright_modules() or ""}
    done = subprocess.run(
        ["node", str(driver), str(work / "job.json"), str(work / "result.json")],
        cwd=str(REPO_ROOT),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if not (work / "result.json").is_file():
        pytest.fail(f"the browser driver wrote no result ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    result = json.loads((work / "result.json").read_text())
    assert result["error"] is None, f"{result['error']}\n{done.stderr[-4000:]}\n{comfy_server.log()[-3000:]}"
    return result


def ours(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The console errors/warnings that come from this pack: logged by or mentioning it, or thrown
    from its scripts. Other frontend noise (e.g. a missing placeholder image's 404) is not ours."""
    return [m for m in messages if "instructmole" in json.dumps(m).lower()]


def comparable(prompt: dict[str, Any], ui: dict[str, Any]) -> dict[str, Any]:
    """A prompt without the default titles: the frontend puts ``_meta.title`` on every node, the
    node's display name when the workflow gives it no title, and which display name differs between
    frontend versions (1.58 calls ReferenceLatent 'Set Reference Latent'). Titles are cosmetic (never
    executed); those a workflow sets are kept and compared."""
    titled = {str(n["id"]) for n in ui["nodes"] if n.get("title")}
    out = json.loads(json.dumps(prompt))
    for node_id, entry in out.items():
        if node_id not in titled:
            entry.pop("_meta", None)
    return out


@pytest.fixture(scope="module")
def browser(comfy_server: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One driver run: every shipped workflow loaded and screenshotted, then the council run."""
    if reason := _missing_tool():
        pytest.skip(reason)
    rng = np.random.default_rng(0)
    for name, seed in IMAGES.items():
        target = Path(comfy_server.base_directory, "input", name)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            pixels = (rng.random((48 + 16 * seed, 64, 3)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(target)
    env_dir = os.environ.get("INSTRUCTMOLE_BROWSER_ARTIFACTS")
    shots = Path(env_dir) if env_dir else tmp_path_factory.mktemp("browser_shots")
    work = tmp_path_factory.mktemp("browser_job")
    info = comfy_server.object_info()
    skipped = {p.stem: why for p in SHIPPED if (why := unavailable(json.loads(p.read_text()), info))}
    loaded = [p for p in SHIPPED if p.stem not in skipped]
    job = {
        "url": comfy_server.url,
        "chromium": _chromium(),
        "width": 1600,
        "height": 900,
        "shotsDir": str(shots),
        "workflows": [{"stem": p.stem, "path": str(p)} for p in loaded],
        "run": {"prompt": RUN_PROMPT, "previewId": PREVIEW_ID, "overrideId": OVERRIDE_ID, "timeoutMs": 180_000},
    }
    result = {**run_driver(DRIVER, job, work, comfy_server, timeout=900), "skipped": skipped}
    if os.environ.get("INSTRUCTMOLE_UPDATE_SCREENSHOTS") == "1":
        DOCS.mkdir(parents=True, exist_ok=True)
        for path in loaded:
            shutil.copyfile(shots / f"{path.stem}.png", DOCS / f"{path.stem}.png")
        shutil.copyfile(shots / "council_map_run.png", DOCS / "council_map.png")
    return result


def test_frontend_version_is_the_installed_package(browser: dict[str, Any]) -> None:
    installed = metadata.version("comfyui-frontend-package")
    print(f"ComfyUI frontend {browser['frontendVersion']} (installed package {installed})")
    if os.environ.get("INSTRUCTMOLE_FRONTEND_ROOT"):  # another frontend served on purpose (conftest)
        assert browser["frontendVersion"]
    else:
        assert browser["frontendVersion"] in (None, installed)
    assert not ours(browser["startup"]["console"]), browser["startup"]["console"]


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_workflow_loads_in_the_frontend(comfy_server: Any, browser: dict[str, Any], path: Path) -> None:
    if why := browser["skipped"].get(path.stem):
        pytest.skip(why)
    entry = browser["workflows"][path.stem]
    assert entry["error"] is None, entry["error"]
    assert entry["missing"] == [], f"node types the frontend does not know: {entry['missing']}"
    assert not ours(entry["console"]), entry["console"]
    assert not [t for t in entry["toasts"] if "instructmole" in t.lower()], entry["toasts"]
    ui = json.loads(path.read_text())
    assert entry["nodes"] == len(ui["nodes"])
    assert comparable(entry["prompt"], ui) == comparable(wf.to_prompt(ui, comfy_server.object_info()), ui)
    with Image.open(entry["screenshot"]) as shot:
        assert shot.size == (1600, 900)
        assert np.asarray(shot.convert("L")).std() > 5  # a graph, not a blank page


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_workflow_nodes_are_drawn_at_the_size_the_file_declares(browser: dict[str, Any], path: Path) -> None:
    """The frontend neither grows nor shrinks a node of a shipped workflow: each is at least as large
    as the frontend needs (its computeSize: slots, widgets, the expert grid's and council map's
    minimum heights, the title's width), so the boxes tests/test_workflow_layout.py checks are the
    drawn ones. The pack's DOM widgets show all their content (the grid's table scrolls only past
    the height it is allowed)."""
    if why := browser["skipped"].get(path.stem):
        pytest.skip(why)
    declared = {n["id"]: n["size"] for n in json.loads(path.read_text())["nodes"]}
    layout = browser["workflows"][path.stem]["layout"]
    assert sorted(n["id"] for n in layout) == sorted(declared)
    for node in layout:
        want = declared[node["id"]]
        where = f"{node['id']} ({node['type']})"
        assert node["size"] == pytest.approx(want, abs=0.5), f"{where}: drawn {node['size']}, declared {want}"
        assert node["min"][0] <= want[0] + 0.5 and node["min"][1] <= want[1] + 0.5, f"{where} needs {node['min']}"
        for widget in node["dom"]:
            assert widget["shown"], where
            assert widget["scrollHeight"] <= widget["clientHeight"] + 1, (where, widget)
            table = widget["table"]
            if table and table["maxHeight"]:  # the grid: its table is cut only where it scrolls by design
                assert table["clientHeight"] >= min(table["scrollHeight"], table["maxHeight"]) - 1, (where, widget)
    kinds = {n["type"] for n in layout}
    if "InstructMoLE_OverrideCouncil" in kinds:
        assert any(w["name"] == "instructmole_expert_grid" for n in layout for w in n["dom"])
    # A Council Preview keeps its size when it shows the map of a FLUX.1 council (57 layers), as
    # after a run: the file gives it the room (Override Council, which shows a map after a run too,
    # grows downwards, into free canvas: nothing is placed below it).
    previews = browser["workflows"][path.stem]["previewsAfterRun"]
    assert len(previews) == sum(n["type"] == "InstructMoLE_CouncilPreview" for n in layout)
    for node in previews:
        want = declared[node["id"]]
        assert node["size"] == pytest.approx(want, abs=0.5), f"Council Preview {node['id']}: {node['size']} after a run"
        assert node["min"][1] <= want[1] + 0.5, node


def test_only_the_entry_scripts_load_as_extensions(comfy_server: Any) -> None:
    """ComfyUI loads every *.js under WEB_DIRECTORY (subfolders too) as an extension: the pack has
    three, and its modules (web/lib/*.mjs) are served for them to import, as JavaScript."""
    listed = [e for e in comfy_server.request("/extensions") if "/instructmole/" in e]
    assert sorted(listed) == [
        "/extensions/instructmole/adapter_card.js",
        "/extensions/instructmole/expert_grid.js",
        "/extensions/instructmole/instructmole.js",
    ]
    for module in ("lib/grid_rules.mjs", "lib/council_map.mjs", "lib/adapter_card.mjs"):
        with urllib.request.urlopen(f"{comfy_server.url}/extensions/instructmole/{module}", timeout=30) as r:
            assert r.status == 200 and "javascript" in r.headers["Content-Type"], module
            assert b"export " in r.read()


def test_council_map_shows_the_executed_council(comfy_server: Any, browser: dict[str, Any]) -> None:
    run = browser["run"]
    assert run["queued"] is True, run["queued"]
    assert run["error"] is None, f"{run['error']}\n{comfy_server.log()[-3000:]}"
    assert not ours(run["console"]), run["console"]
    history = comfy_server.request("/history")
    entries = [e for e in history.values() if PREVIEW_ID in e.get("outputs", {}) and OVERRIDE_ID in e["outputs"]]
    entries = [
        e for e in entries if e["prompt"][2].get(PREVIEW_ID, {}).get("class_type") == RUN_PROMPT["5"]["class_type"]
    ]
    assert len(entries) == 1, list(history)
    outputs = entries[0]["outputs"]
    executed = outputs[PREVIEW_ID]["instructmole_council"][0]
    assert run["map"]["state"] == "ready" and run["map"]["data"] == executed
    layers, n = executed["layers"], executed["num_experts"]
    assert run["map"]["cells"] == len(layers) * n
    assert run["map"]["rows"] == executed["names"] == ["double:0", "double:1", "single:0", "single:1"]
    chosen = {(row, e) for row, ws in enumerate(executed["weights"]) for e, w in enumerate(ws) if w != 0}
    assert {(row, e) for row, e, _ in run["map"]["chosen"]} == chosen
    assert chosen and all(any((row, e) in chosen for e in range(n)) for row in range(len(layers)))
    assert run["map"]["banned"] == 1 and executed["banned"][0][1] and (0, 1) not in chosen  # double:0 ban 1
    assert executed["label"] == INSTRUCTION and executed["instances"] == 1
    assert run["map"]["summary"] == outputs[PREVIEW_ID]["text"][0] and "double:0" in run["map"]["summary"]
    assert run["map"]["summaryWraps"] is True
    # The Override node shows its edited council too (the same one here: Preview shows it as is).
    assert run["overrideMap"]["state"] == "ready"
    assert run["overrideMap"]["data"] == outputs[OVERRIDE_ID]["instructmole_council"][0] == executed
    assert sum(map(sum, executed["chosen"])) == len(chosen)  # the server's members are the ones drawn
    from instructmole.viz import weight_text  # the summary's and heat map's rule, shared by the map

    def cell(weight: float) -> str:
        return weight_text(weight).replace("0.", ".", 1) if abs(weight) < 1 else f"{weight:.1f}"

    assert [text for _, _, text in run["map"]["chosen"]] == [
        cell(executed["weights"][r][e]) for r, e, _ in run["map"]["chosen"]
    ]
    row, expert, _ = run["map"]["chosen"][0]
    weight = executed["weights"][row][expert]
    assert run["hover"] == (
        f"layer {executed['names'][row]} ({layers[row]}) · expert {expert} · "
        f"probability {executed['probs'][row][expert]:.4f} · weight {weight_text(weight, 4)}"
    )


def test_expert_grid_and_rule_text_stay_in_sync(browser: dict[str, Any]) -> None:
    """On the Override node of the run: clicking a cell writes the rule, clicking again cycles it,
    and typed rules show in the grid; every text the grid writes is valid rule text."""
    from instructmole.overrides import parse_rules

    grid = browser["run"]["grid"]
    assert grid["error"] is None, grid["error"]
    assert grid["before"] == RUN_PROMPT[OVERRIDE_ID]["inputs"]["rules"] == "double:0 ban 1"
    layout = grid["layout"]  # the executed adapter's, not the FLUX.1 default the grid assumes before a run
    assert (layout["numExperts"], layout["double"], layout["single"], layout["assumed"]) == (4, [0, 1], [0, 1], False)

    def actions(text: str) -> set[tuple[str, str, tuple]]:
        out = set()
        for rule in parse_rules(text):
            experts = rule.args[0]
            out.add((rule.selector, rule.action, tuple(sorted(experts))))
        return out

    assert grid["clickedState"] == "force"  # a real mouse click: auto -> force
    assert ("double", "force", (2,)) in actions(grid["clicked"])
    assert ("double:0", "ban", (1,)) in actions(grid["clicked"])  # the typed rule is kept
    assert grid["secondState"] == "ban"  # force -> ban
    assert ("double", "ban", (2,)) in actions(grid["second"])
    assert ("double", "force", (2,)) not in actions(grid["second"])
    assert grid["typedState"] == "ban" and grid["typedOther"] == "auto"  # typed text drives the grid
