"""Seeded fuzzing of the council boundary: rule texts, council JSON, and the override functions.

Thousands of generated inputs (stdlib ``random`` with fixed seeds, so every run sees the same
ones): tokens of the rule grammar mixed with junk (huge numbers, nan/inf, unicode digits and
spaces, stray separators, very long ranges), and council dicts with wrong types, ragged or deeply
nested lists, missing and unknown fields. For every input:

* only ``InstructMoLEError`` subclasses escape, with a one-line message;
* an accepted council holds finite probabilities in [0, 1] and finite weights in [0, 100] and
  keeps its adapter id;
* it is handled in bounded time, and range rules in bounded memory.
"""

from __future__ import annotations

import math
import random
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import torch

from instructmole import Council, InstructMoLEError, apply_rules, ban, blend, force, only, scale, take, top
from instructmole.council import MAX_WEIGHT
from instructmole.overrides import ACTIONS, select_layers

LAYERS = (
    "transformer_blocks.0.ff.net.2",
    "transformer_blocks.1.ff.net.2",
    "transformer_blocks.2.attn.to_q",
    "single_transformer_blocks.0.proj_out",
    "single_transformer_blocks.1.proj_out",
)
ID = "fuzz0123456789ab"
SLOW = 1.0  # seconds one input may take (retried once: a busy machine may pause any process)
JUNK_TOKENS = [
    "nan", "NaN", "inf", "-inf", "1e308", "1e999", "-1", "-0", "0", "99999999999999999999999", "9" * 400,
    "²", "٣", "½", "\u00a0", "\u2028", "\u3000", "\x00", "\x1b[31m", "#", ";", ",", ":", "-", "*", "..", "::",
    "ünïcödé", "🙂", "0x10", "1_000", "+.5e-3", "1.", ".5", "e5", "1e", " ", "\t", "\n", "\r", "'", '"', "\\",
    "transformer_blocks.", "single_transformer_blocks.99999.proj_out", "double:", "single:-", "all all",
]  # fmt: skip
SEPARATORS = [";", "\n", "; ", "\r\n", " # note\n", ";;", "\u2028", "\n\n"]


def council(batch: int = 2, seed: int = 0) -> Council:
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(batch, len(LAYERS), 6, generator=g).softmax(-1)
    weights, indices = probs.topk(2, -1)
    return Council.from_topk(LAYERS, probs, indices, weights, adapter_id=ID)


def assert_sound(c: Council, adapter_id: str | None = ID) -> None:
    """What every accepted council satisfies: finite, in range, right id."""
    assert isinstance(c, Council)
    assert torch.isfinite(c.probs).all() and torch.isfinite(c.weights).all()
    assert bool(((c.probs >= 0) & (c.probs <= 1)).all()), c.probs
    assert bool(((c.weights >= 0) & (c.weights <= MAX_WEIGHT)).all()), c.weights
    assert 1 <= c.top_k <= c.num_experts
    if adapter_id is not None:
        assert c.adapter_id == adapter_id


def run(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in bounded time; returns the result or the InstructMoLEError it raised.

    Anything else escaping is a bug and fails the test with the input in the message.
    """
    for attempt in range(2):
        start = time.perf_counter()
        try:
            result = fn(*args)
        except InstructMoLEError as err:
            result = err
            message = str(err)
            assert message and "\n" not in message and len(message) < 1000, repr(message[:2000])
        except Exception as err:  # pragma: no cover - the failure report
            raise AssertionError(f"{type(err).__name__}: {err} escaped for {_show(args)}") from err
        if time.perf_counter() - start < SLOW:
            return result
        assert attempt == 0, f"took {time.perf_counter() - start:.2f} s twice for {_show(args)}"
    return result


def _show(args: tuple) -> str:
    return repr(args)[:600]


# ---- rule texts --------------------------------------------------------------------------------


def _number(rng: random.Random, junk: float) -> str:
    """Mostly a small whole number; with ``junk``, also junk tokens, huge numbers and decimals."""
    pick = rng.random()
    if pick < junk:
        return rng.choice(JUNK_TOKENS)
    if junk and pick < junk + 0.1:
        return str(rng.randrange(0, 10 ** rng.randrange(1, 40)))
    if junk and pick < junk + 0.25:
        return rng.choice(["0.5", "1.5", "2", "0", "1e-3", "100", "100.0001", "1e2", "-0.5", ".25"])
    return str(rng.randrange(0, 7))


def _scale(rng: random.Random, junk: float) -> str:
    return _number(rng, junk) if junk else rng.choice(["0.5", "1.5", "2", "0", "1e-3", "1", ".25", "3"])


def _top(rng: random.Random, junk: float) -> str:
    return _number(rng, junk) if junk else str(rng.randrange(1, 7))


def _experts(rng: random.Random, junk: float, weights: bool = True) -> str:
    items = []
    clean = [str(e) for e in rng.sample(range(6), 3)]  # distinct experts of the fuzzed councils
    for i in range(rng.randrange(1, 4)):
        item = _number(rng, junk) if junk else clean[i]
        if (weights or junk) and rng.random() < 0.4:
            item += ":" + rng.choice(["0.5", "1", "2.5", "0.01", _number(rng, junk)])
        items.append(item)
    return rng.choice([",", ", ", ",,", " , "] if junk else [",", ", "]).join(items)


def _blocks(rng: random.Random, junk: float) -> str:
    if rng.random() < 0.2:
        return "*"
    parts = []
    for _ in range(rng.randrange(1, 5)):
        lo = _number(rng, junk) if rng.random() < junk else str(rng.randrange(0, 3))
        far = ["10000", "10001", "99999999999", _number(rng, junk)] if junk else ["10000"]
        hi = rng.choice([str(rng.randrange(2, 40)), *far])
        parts.append(lo if rng.random() < 0.4 else f"{lo}-{hi}")
    return ",".join(parts)


def _selector(rng: random.Random, junk: float) -> str:
    pick = rng.random()
    if pick < junk:
        return rng.choice([*JUNK_TOKENS, "triple", "transformer_blocks.7.ff.net.2", "Double", "all:1"])
    if pick < 0.5:
        return rng.choice(["all", "double", "single", "double:*", "single:*", *LAYERS])
    return f"{rng.choice(['double', 'single'])}:{_blocks(rng, junk)}"


def _rule(rng: random.Random, junk: float) -> str:
    actions = [*ACTIONS, *ACTIONS, "bam", "FORCE", "", "top2"] if junk else list(ACTIONS)
    action = rng.choice(actions)
    if action == "ban":
        arg = _experts(rng, junk, weights=False)
    else:
        arg = {"scale": _scale, "top": _top}.get(action, _experts)(rng, junk)
    tokens = [action, arg] if rng.random() < 0.2 else [_selector(rng, junk), action, arg]
    if rng.random() < junk:  # junk somewhere
        tokens.insert(rng.randrange(len(tokens) + 1), rng.choice(JUNK_TOKENS))
    if rng.random() < junk / 2:
        tokens = tokens[: rng.randrange(len(tokens) + 1)]
    return rng.choice([" ", "  ", "\t", " \u00a0"]).join(tokens)


def rule_text(rng: random.Random) -> str:
    """One to five rules: half of the texts mostly valid (so councils really get edited), half junky."""
    junk = rng.choice([0.0, 0.02, 0.25])
    text = rng.choice(SEPARATORS).join(_rule(rng, junk) for _ in range(rng.randrange(1, 6)))
    if rng.random() < 0.05:  # a long text
        text = (text + ";") * rng.randrange(10, 200)
    return text


def test_fuzz_rule_texts():
    rng = random.Random(1234)
    councils = [council(), council(batch=1, seed=1), ban(council(seed=2), [1], where="double")]
    accepted = 0
    for i in range(3200):
        text = rule_text(rng)
        result = run(apply_rules, councils[i % len(councils)], text)
        if isinstance(result, Council):
            assert_sound(result)
            accepted += 1
    assert accepted > 500  # the generator also makes valid rules, so the checks above see real councils


def test_fuzz_long_ranges_stay_small():
    """Generated range rules (the 25-byte rule that once exhausted memory) stay under 2 MB each."""
    rng = random.Random(77)
    c = council()
    tracemalloc.start()
    try:
        for _ in range(300):
            lo, hi = rng.randrange(0, 20), rng.choice(["10000", "99999999999", "9" * rng.randrange(5, 60)])
            text = f"{rng.choice(['double', 'single'])}:{lo}-{hi} {rng.choice(['ban 1', 'scale 2', 'top 3'])}"
            tracemalloc.reset_peak()
            result = run(apply_rules, c, text)
            peak = tracemalloc.get_traced_memory()[1]
            assert peak < 2_000_000, (text, peak)
            if isinstance(result, Council):
                assert_sound(result)
    finally:
        tracemalloc.stop()


KINDS = {"double": "transformer_blocks", "single": "single_transformer_blocks"}


def test_fuzz_ranges_pick_the_blocks_they_name():
    """Ranges kept as merged (lo, hi) pairs pick exactly the blocks an expanded set would."""
    rng = random.Random(5)
    layers = [f"transformer_blocks.{i}.ff.net.2" for i in range(19)]
    layers += [f"single_transformer_blocks.{i}.proj_out" for i in range(38)]
    for _ in range(500):
        kind = rng.choice(["double", "single"])
        parts = [(lo, lo + rng.randrange(0, 8)) for lo in (rng.randrange(0, 45) for _ in range(rng.randrange(1, 5)))]
        spec = ",".join(f"{lo}-{hi}" if hi > lo or rng.random() < 0.5 else str(lo) for lo, hi in parts)
        blocks = {n for lo, hi in parts for n in range(lo, hi + 1)}
        want = [name.split(".")[0] == KINDS[kind] and int(name.split(".")[1]) in blocks for name in layers]
        result = run(select_layers, layers, f"{kind}:{spec}")
        if any(want):
            assert result.tolist() == want, spec
        else:
            assert isinstance(result, InstructMoLEError) and "picks no layer" in str(result)


# ---- the override functions --------------------------------------------------------------------

_VALUES = [
    0, 1, 2, 5, 6, -1, 255, 256, 10**30, True, False, 0.5, 1.0, 2.5, -0.5, 100, 101, 1e308,
    math.nan, math.inf, -math.inf, None, "1", "", "all", [], [1], (2, 3), {1: 0.5}, torch.tensor(1),
    torch.tensor(1.5), torch.tensor(True), torch.tensor([1, 2]), object(),
]  # fmt: skip
_KEYS = [v for v in _VALUES if not isinstance(v, (list, dict))]  # the hashable ones
_WHERE = [
    "all", "double", "single:1", "double:0-99999", "triple", "", 3, None, True, LAYERS[0],
    torch.ones(len(LAYERS), dtype=torch.bool), torch.zeros(len(LAYERS), dtype=torch.bool), torch.ones(len(LAYERS)),
    torch.ones(2, dtype=torch.bool), [True] * len(LAYERS), [1] * len(LAYERS),
]  # fmt: skip


def _experts_arg(rng: random.Random) -> Any:
    """A list of experts, a mapping of experts to weights (both mostly valid), or any value."""
    pick = rng.random()
    if pick < 0.4:
        return [rng.choice(_VALUES) if rng.random() < 0.3 else rng.randrange(6) for _ in range(rng.randrange(0, 4))]
    if pick < 0.7:
        keys = [rng.choice(_KEYS) if rng.random() < 0.2 else rng.randrange(6) for _ in range(rng.randrange(0, 4))]
        return {key: rng.choice(_VALUES) if rng.random() < 0.4 else rng.choice([None, rng.random()]) for key in keys}
    return rng.choice(_VALUES)


def _call(rng: random.Random, a: Council, b: Council) -> tuple[Callable[..., Any], tuple]:
    where = rng.choice(_WHERE)
    pick = rng.randrange(7)
    if pick == 0:
        return force, (a, _experts_arg(rng), where)
    if pick == 1:
        return only, (a, _experts_arg(rng), where)
    if pick == 2:
        return ban, (a, _experts_arg(rng), where)
    if pick == 3:
        return scale, (a, rng.choice([*_VALUES, rng.uniform(0, 3)]), where)
    if pick == 4:
        return top, (a, rng.choice([*_VALUES, rng.randrange(1, 7)]), where)
    if pick == 5:
        k = rng.choice([None, None, *_VALUES])
        return (lambda x, y, f, w: blend(x, y, f, w, k)), (a, b, rng.choice([*_VALUES, rng.random()]), where)
    return take, (a, rng.choice([b, b, a.row(0), "x", None]), where)


def test_fuzz_override_functions():
    rng = random.Random(99)
    pairs = [(council(), council(seed=3)), (council(batch=1), council(seed=4)), (council(), council(batch=1))]
    accepted = 0
    for i in range(2500):
        a, b = pairs[i % len(pairs)]
        fn, args = _call(rng, a, b)
        result = run(fn, *args)
        if isinstance(result, Council):
            assert_sound(result)
            accepted += 1
    assert accepted > 200


# ---- council dicts -----------------------------------------------------------------------------

_NAMES = [f"transformer_blocks.{i}.ff.net.2" for i in range(19)] + [
    f"single_transformer_blocks.{i}.proj_out" for i in range(38)
]


def _deep(depth: int) -> Any:
    value: Any = 0.5
    for _ in range(depth):
        value = [value]
    return value


_JUNK = [
    None, True, False, 0, -1, 1, 1.5, math.nan, math.inf, -math.inf, 10**400, -(10**400), "", "x" * 1000, "1",
    "🙂", [], {}, [[]], [[[]]], [None], {"a": 1}, (1, 2), 1e308, -0.0, 2**63, _deep(50), _deep(500),
    [[[0.5] * 6] * 5] * 2, [_deep(3)] * 3,
]  # fmt: skip


def _valid(rng: random.Random) -> dict[str, Any]:
    b, n = rng.randrange(1, 4), rng.randrange(1, 9)
    layers = rng.sample(_NAMES, rng.randrange(0, 6))
    k = rng.randrange(1, n + 1)
    probs = [[[rng.random() for _ in range(n)] for _ in layers] for _ in range(b)]
    weights = [[[p if rng.random() < 0.4 else 0.0 for p in row] for row in plane] for plane in probs]
    data: dict[str, Any] = {
        "format": "instructmole-council",
        "version": 1,
        "layers": layers,
        "num_experts": n,
        "top_k": k,
        "adapter_id": ID,
        "label": [f"instruction {i}" for i in range(b)] if rng.random() < 0.5 else [],
        "probs": probs,
        "weights": weights,
        "banned": [[[rng.random() < 0.1 for _ in range(n)] for _ in layers] for _ in range(b)]
        if rng.random() < 0.5
        else None,
    }
    if rng.random() < 0.3 and layers:
        del data["num_experts"]
    return data


def _inner_lists(value: Any) -> list[list]:
    """The lists inside ``value`` (three levels deep at most, not inside huge ones), to mutate in place."""
    out, todo = [], [(value, 0)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, list):
            out.append(item)
            if depth < 3 and len(item) <= 64:
                todo.extend((x, depth + 1) for x in item)
    return out


def _mutate(rng: random.Random, data: dict[str, Any]) -> None:
    keys = ["format", "version", "layers", "num_experts", "top_k", "adapter_id", "label", "probs", "weights", "banned"]
    pick = rng.randrange(9)
    if pick == 0:
        data[rng.choice(keys)] = rng.choice(_JUNK)
    elif pick == 1:
        data.pop(rng.choice(keys), None)
    elif pick == 2:
        data[rng.choice(["extra", "Layers", "", "weights "])] = rng.choice(_JUNK)
    elif pick in (3, 4):  # an element or a row deep inside
        lists = _inner_lists(data.get(rng.choice(["probs", "weights", "banned", "layers", "label"])))
        if lists:
            target = rng.choice(lists)
            if target and rng.random() < 0.7:
                target[rng.randrange(len(target))] = rng.choice(_JUNK)
            elif target:
                del target[rng.randrange(len(target))]  # ragged
            else:
                target.append(rng.choice(_JUNK))
    elif pick == 5 and isinstance(data.get("layers"), list) and data["layers"]:
        data["layers"][rng.randrange(len(data["layers"]))] = rng.choice([*_NAMES, "foo.bar", "transformer_blocks.x"])
    elif pick == 6:  # claims of huge sizes
        data["probs"] = [[]] * rng.choice([4096, 4097, 10**6])
        data["layers"] = rng.choice([_NAMES * 80, _NAMES])
    elif pick == 7:
        data["num_experts"] = rng.choice([0, 1, 6, 8, 256, 257, 10**12, True])
    else:
        data["top_k"] = rng.choice([0, 1, 2, 8, 9, True, 2.0, None])


def test_fuzz_council_dicts():
    rng = random.Random(2024)
    accepted = 0
    for _ in range(2200):
        data = _valid(rng)
        for _ in range(rng.randrange(0, 4)):
            _mutate(rng, data)
        result = run(Council.from_dict, data)
        if isinstance(result, Council):
            assert_sound(result)
            back = Council.from_dict(result.to_dict())
            assert torch.equal(back.weights, result.weights) and back.layers == result.layers
            accepted += 1
    assert accepted > 300
