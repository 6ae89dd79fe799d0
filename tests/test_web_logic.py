"""The expert grid's pure logic (web/lib/grid_rules.mjs) against the Python rule parser.

* ``node --test`` runs the JavaScript unit tests (tests/web/*.test.mjs);
* grid states rendered to rule text in JavaScript are accepted by ``parse_rules`` and, applied to a
  council, force and ban exactly the cells the grid state says;
* typed rule texts read by the grid mean in Python what the grid shows (unless it warns);
* the JavaScript grammar check accepts exactly the texts ``parse_rules`` accepts.

Every test skips when ``node`` is not on PATH (the pack itself needs no Node.js).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from instructmole import Council, CouncilRuleError, apply_rules, parse_rules

ROOT = Path(__file__).resolve().parent.parent
WEB_TESTS = ROOT / "tests" / "web"
CLI = WEB_TESTS / "grid_cli.mjs"
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(NODE is None, reason="node (Node.js) is not on PATH; the web logic tests need it")

ADAPTER_ID = "0123456789abcdef"
N_EXPERTS = 6
DOUBLE = (0, 1, 2, 3)
SINGLE = (0, 1, 2, 4, 5)  # block 3 missing: ranges must not run over it
LAYOUT = {"double": list(DOUBLE), "single": list(SINGLE), "numExperts": N_EXPERTS}
WEIGHTS = ("0.5", "1.25", "0.1", "2", "0.3333")  # as the grid writes them (JavaScript's number form)


def _layers() -> list[tuple[str, str, int]]:
    """(canonical name, kind, block): double block 0 holds two layers, one selector picks both."""
    out = [("transformer_blocks.0.attn.to_q", "double", 0)]
    out += [(f"transformer_blocks.{b}.ff.net.2", "double", b) for b in DOUBLE]
    out += [(f"single_transformer_blocks.{b}.proj_out", "single", b) for b in SINGLE]
    return out


LAYERS = _layers()


def council(seed: int, k: int) -> Council:
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(1, len(LAYERS), N_EXPERTS, generator=g).softmax(-1)
    weights, indices = probs.topk(k, -1)
    return Council.from_topk([name for name, _, _ in LAYERS], probs, indices, weights, adapter_id=ADAPTER_ID)


def run_cli(payload: dict[str, Any]) -> dict[str, Any]:
    assert NODE is not None
    done = subprocess.run(
        [NODE, str(CLI)], input=json.dumps(payload), capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def effective(state: dict[str, Any], kind: str, block: int, expert: int) -> str:
    cells = state[kind]
    return cells["blocks"].get(str(block), {}).get(str(expert)) or cells["group"].get(str(expert)) or "auto"


def check_cells(result: Council, state: dict[str, Any], text: str) -> None:
    """Forced cells are members (with their weight when the grid gave one), banned cells are out."""
    banned = result.banned_mask[0]
    for row, (name, kind, block) in enumerate(LAYERS):
        for e in range(N_EXPERTS):
            cell = effective(state, kind, block, e)
            w = float(result.weights[0, row, e])
            where = f"{name} expert {e} ({cell}) in\n{text}"
            if cell.startswith("force"):
                assert w > 0, where
                if cell.startswith("force:"):
                    assert w == pytest.approx(float(cell[6:]), rel=1e-6), where
                assert not bool(banned[row, e]), where
            elif cell == "ban":
                assert w == 0 and bool(banned[row, e]), where


def random_state(rng: random.Random) -> dict[str, Any]:
    """A normalised grid state: block cells never equal their group's cell."""

    def cell() -> str:
        r = rng.random()
        return "ban" if r < 0.35 else ("force" if r < 0.7 else f"force:{rng.choice(WEIGHTS)}")

    state: dict[str, Any] = {}
    for kind, blocks in (("double", DOUBLE), ("single", SINGLE)):
        if rng.random() < 0.08:  # every expert banned on the group: forces below need weights
            group = {str(e): "ban" for e in range(N_EXPERTS)}
        else:
            group = {str(e): cell() for e in range(N_EXPERTS) if rng.random() < 0.3}
        per_block: dict[str, dict[str, str]] = {}
        for b in blocks:
            if rng.random() < 0.5:
                continue
            cells = {str(e): c for e in range(N_EXPERTS) if rng.random() < 0.3 and (c := cell()) != group.get(str(e))}
            if cells:
                per_block[str(b)] = cells
        state[kind] = {"group": group, "blocks": per_block}
    return state


def test_node_unit_tests_pass() -> None:
    files = sorted(str(p) for p in WEB_TESTS.glob("*.test.mjs"))
    assert files, "no tests/web/*.test.mjs"
    done = subprocess.run([NODE, "--test", *files], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]


def test_rendered_grid_states_mean_in_python_what_the_grid_shows() -> None:
    rng = random.Random(1234)
    states = [random_state(rng) for _ in range(200)]
    rendered = run_cli({"layout": LAYOUT, "states": states})["rendered"]
    problems = 0
    for i, (state, out) in enumerate(zip(states, rendered, strict=True)):
        text = out["text"]
        assert out["state"] == state, f"round trip changed the state:\n{text}"
        assert out["hazards"] == [] and out["error"] is None and out["textRules"] == [], text
        assert all(t == "grid" for t in out["types"]), text
        rules = parse_rules(text)
        assert [r.text for r in rules] == [line for line in text.splitlines() if line]
        c = council(i, k=1 + i % 3)
        if out["problems"]:
            problems += 1
            with pytest.raises(CouncilRuleError, match="no mean weight"):
                apply_rules(c, text)
            continue
        check_cells(apply_rules(c, text), state, text)
    assert 0 < problems < len(states) // 4  # both paths exercised


def _selector(rng: random.Random, kind: str) -> str:
    blocks = DOUBLE if kind == "double" else SINGLE
    r = rng.random()
    if r < 0.25:
        return kind
    if r < 0.3:
        return f"{kind}:*"
    if r < 0.45:
        lo = rng.choice(blocks[:-1])
        hi = lo + 1 if lo + 1 in blocks else lo
        return f"{kind}:{lo}-{hi}"
    if r < 0.55:
        a, b = rng.sample(blocks, 2)
        return f"{kind}:{a},{b}"
    return f"{kind}:{rng.choice(blocks)}"


def typed_text(rng: random.Random) -> str:
    rules = []
    for _ in range(rng.randint(1, 7)):
        kind = rng.choice(("double", "single"))
        experts = rng.sample(range(N_EXPERTS), rng.choice((1, 1, 2, 3)))
        if rng.random() < 0.5:
            rules.append(f"{_selector(rng, kind)} ban {','.join(map(str, experts))}")
        else:
            listed = [f"{e}:{rng.choice(WEIGHTS)}" if rng.random() < 0.3 else str(e) for e in experts]
            rules.append(f"{_selector(rng, kind)} force {', '.join(listed)}")
        if rng.random() < 0.05:  # switch a group off: a later force without weight is refused
            rules.append(f"{kind} ban {','.join(map(str, range(N_EXPERTS)))}")
    return rng.choice(("\n", "; ", " ;\n")).join(rules)


def test_typed_texts_mean_in_python_what_the_grid_shows() -> None:
    rng = random.Random(99)
    texts = [typed_text(rng) for _ in range(300)]
    parsed = run_cli({"layout": LAYOUT, "texts": texts})["parsed"]
    checked = hazards = 0
    for i, (text, out) in enumerate(zip(texts, parsed, strict=True)):
        assert out["error"] is None and out["textRules"] == [], text
        parse_rules(text)
        if out["hazards"]:  # the grid warns: a click rewrites the rules canonically
            hazards += 1
            continue
        c = council(1000 + i, k=1 + i % 3)
        if out["problems"]:
            with pytest.raises(CouncilRuleError, match="no mean weight"):
                apply_rules(c, text)
            continue
        check_cells(apply_rules(c, text), out["state"], text)
        checked += 1
    assert checked > 100 and hazards > 10


def test_hazards_are_real() -> None:
    """A force that does not relist an earlier forced expert can push it out in Python."""
    text = "double force 1\ndouble force 2"
    out = run_cli({"layout": LAYOUT, "texts": [text]})["parsed"][0]
    assert out["hazards"] and effective(out["state"], "double", 0, 1) == "force"
    c = council(5, k=1)
    assert float(apply_rules(c, text).weights[0, 0, 1]) == 0  # expert 1 was pushed out


VOCAB_SELECTORS = (
    "all", "double", "single", "double:*", "single:0-3", "double:3-1", "double:x", "triple", "double:",
    "transformer_blocks.0.ff.net.2", "single_transformer_blocks.x.proj_out", "double:0-10001", "single:1,2",
    "double:0000001", "double:1234567", "single:5-5", "double:*,1", "", "Double", "double:١",
)  # fmt: skip
VOCAB_ACTIONS = ("force", "only", "ban", "scale", "top", "bam", "", "FORCE")
VOCAB_ARGS = (
    "1", "1,5", "1:0.5", "1:0", "1:abc", "1,1", "0.5", "1e400", "2 5", "", "300", "-1", ".5", "1:", "1:+.5e-1",
    "nan", "inf", "1:1e2", "1:100.0001", "256", "255", "1234567", "1.", "1:-0.5", "0", "100", "100.0", "1 , 2:0.5",
    "1:1e-9999", "1:" + "1" * 40, "5:0.25,3", ",", "1;", "２",
)  # fmt: skip
VOCAB_SEPARATORS = (";", "\n", " # note\n", "; ;", "\r\n", "\u2028", "\x85", "\x1c", "\r", "\v")
VOCAB_SPACES = (" ", " ", " ", "\t", "\xa0", "\u3000", "\ufeff", "\x1f", "  ")


def fuzz_text(rng: random.Random) -> str:
    def word(vocab: tuple[str, ...], good: int) -> str:  # mostly one of the first `good` (valid) words
        return rng.choice(vocab[:good] if rng.random() < 0.85 else vocab)

    parts = []
    for _ in range(rng.randint(1, 4)):
        sp = rng.choice(VOCAB_SPACES)
        words = [word(VOCAB_SELECTORS, 5), word(VOCAB_ACTIONS, 5), word(VOCAB_ARGS, 3)]
        if rng.random() < 0.2:
            words = words[1:]  # no selector: all
        parts.append(sp.join(words))
    return "".join(p + rng.choice(VOCAB_SEPARATORS) for p in parts)


def test_grammar_agrees_with_parse_rules() -> None:
    rng = random.Random(7)
    texts = [fuzz_text(rng) for _ in range(1500)]
    texts += ["ban 1;" * 1000, "ban 1;" * 1001, " " * 65_537, "", "#", "all scale 1.0"]
    texts += ["double ban 2 routed", "ban 1, 2 routed", "ban routed", "ban 2 routed routed", "single:3 ban 2  routed"]
    checked = run_cli({"layout": LAYOUT, "check": texts})["checked"]
    accepted = 0
    for text, out in zip(texts, checked, strict=True):
        try:
            rules = parse_rules(text)
        except CouncilRuleError as err:
            assert not out["ok"], f"JavaScript accepts {text!r}; Python says {err}"
            # Both name the same rule.
            assert str(err).split(" (", 1)[0] == out["error"].split(" (", 1)[0], (text, str(err), out["error"])
        else:
            assert out["ok"], f"JavaScript refuses {text!r}: {out['error']}"
            assert out["count"] == len(rules), text
            accepted += 1
    assert 100 < accepted < len(texts) - 100
