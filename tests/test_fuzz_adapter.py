"""Seeded fuzzing of configs and adapter files: whatever a file holds, only ``InstructMoLEError``
escapes, every input is handled in bounded time, and what is accepted holds no NaN or inf.

No hypothesis: ``random.Random`` with fixed seeds, so a failure names a reproducible case
(``seed``/``case`` in the assertion message).
"""

from __future__ import annotations

import copy
import json
import math
import random
import reprlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import instructmole as im
from instructmole.model import InstructMoLE

PER_CASE_S = 1.0
CONFIG_CASES = 2400
FILE_CASES = 200


def tiny_config() -> dict[str, Any]:
    """A valid config small enough that building and loading it costs milliseconds."""
    return {
        "layers": [
            {"name": "transformer_blocks.0.ff.net.2", "in_features": 8, "out_features": 6, "routing": "instruction"},
            {"name": "single_transformer_blocks.0.proj_out", "in_features": 6, "out_features": 6, "routing": "token"},
        ],
        "num_experts": 3,
        "top_k": 2,
        "rank": 2,
        "alpha": 4.0,
        "text_dim": 5,
        "router_dim": 4,
        "router_heads": 1,
        "router_head_dim": 4,
        "router_depth": 1,
        "router_ff_mult": 2,
        "router_dropout": 0.0,
        "gate_noise": False,
        "text_length": 16,
        "base_model": "flux.1-kontext-dev",
        "extra": {"note": "fuzz"},
    }


JUNK: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2,
    3,
    7,
    255,
    256,
    257,
    4096,
    2**20,
    2**31,
    2**63,
    -(2**63),
    10**30,
    0.0,
    -0.0,
    0.5,
    0.999,
    1.0,
    1e-300,
    1e308,
    float("nan"),
    float("inf"),
    float("-inf"),
    "",
    "0.1",
    "8",
    "NaN",
    "inf",
    "-inf",
    "instruction",
    "token",
    "transformer_blocks.1.ff.net.2",
    "x" * 5000,
    "\x00",
    "é",
    [],
    [1, 2],
    [[[]]],
    {},
    {"a": {"b": {"c": [None]}}},
    [{"name": "transformer_blocks.0.x"}],
]


def deep(levels: int) -> list:
    """A list nested ``levels`` deep, built in a loop (deepcopy or repr of it would recurse)."""
    value: list = []
    for _ in range(levels):
        value = [value]
    return value


def junk(rng: random.Random) -> Any:
    roll = rng.random()
    if roll < 0.02:
        return deep(rng.choice([40, 900]))
    if roll < 0.04:
        return 10 ** rng.choice([400, 5000])  # past Python's int-to-str limit at 4300 digits
    value = copy.deepcopy(rng.choice(JUNK))
    if roll < 0.2:  # nest it
        value = rng.choice([[value], {"k": value}, [value, value]])
    return value


def mutate_layers(layers: list, rng: random.Random) -> Any:
    kind = rng.randrange(8)
    layers = [dict(layer) if isinstance(layer, dict) else layer for layer in layers]  # junk may be 900 deep
    i = rng.randrange(len(layers))
    if kind in (1, 2, 3) and not (isinstance(layers[i], dict) and layers[i]):
        kind = 0
    if kind == 0:
        layers[i] = junk(rng)
    elif kind == 1:
        layers[i][rng.choice(["name", "in_features", "out_features", "routing"])] = junk(rng)
    elif kind == 2:
        layers[i][rng.choice(["bias", "rank", "", "Name"])] = junk(rng)
    elif kind == 3:
        del layers[i][rng.choice(list(layers[i]))]
    elif kind == 4:
        layers.append(dict(layers[i]) if isinstance(layers[i], dict) else layers[i])  # a duplicate
    elif kind == 5:
        layers = []
    elif kind == 6:
        n = rng.choice([5000, 300])
        layers = [
            {"name": f"transformer_blocks.{k}.ff.net.2", "in_features": 2**20, "out_features": 2**20} for k in range(n)
        ]
    else:
        return junk(rng)
    return layers


def mutate_config(base: dict[str, Any], rng: random.Random) -> Any:
    """One to three random changes: a field set to junk, deleted, an unknown key, or the layers broken."""
    if rng.random() < 0.03:
        return junk(rng)
    cfg = copy.deepcopy(base)
    for _ in range(rng.randint(1, 3)):
        roll = rng.random()
        if roll < 0.55:
            cfg[rng.choice(list(base))] = junk(rng)
        elif roll < 0.65:
            cfg.pop(rng.choice(list(base)), None)
        elif roll < 0.7:
            cfg[rng.choice(["num_expert", "Layers", "", "top-k"])] = junk(rng)
        elif isinstance(cfg.get("layers"), list) and cfg["layers"]:
            cfg["layers"] = mutate_layers(cfg["layers"], rng)
    return cfg


def config_text(cfg: Any, rng: random.Random) -> str:
    """The config as JSON text, sometimes damaged (truncated, spliced, absurdly nested)."""
    try:
        text = json.dumps(cfg)
    except (ValueError, RecursionError):  # 10**5000 or a 900-deep list: text no JSON writer makes
        return "{" * rng.randrange(1, 3000)
    roll = rng.random()
    if roll < 0.1:
        return text[: rng.randrange(len(text) + 1)]
    if roll < 0.15:
        i = rng.randrange(len(text) + 1)
        return text[:i] + rng.choice(["}", "[", '"', "\\", "NaN", "\x00", "1e999"]) + text[i:]
    if roll < 0.17:
        return "[" * 50_000 + "]" * 50_000
    return text


def label(value: Any) -> str:
    """A short repr for a failure message (the junk includes ints too long for ``repr``)."""
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 4, 80, 80
    try:
        return short.repr(value)
    except ValueError:
        return f"<{type(value).__name__}>"


def assert_finite_config(cfg: im.MoLEConfig) -> None:
    assert math.isfinite(cfg.alpha) and 0 < cfg.alpha <= 1e6 and 0 <= cfg.router_dropout < 1
    text = cfg.to_json()  # what is accepted can be written, and reads back the same (NaN in extra too)
    assert im.MoLEConfig.from_json(text).to_json() == text
    assert cfg.parameter_count() <= 2**34


def handled(fn: Callable[[], Any], case: str) -> Any:
    """Run ``fn``: ours or nothing may escape, within the time bound. Returns the result or None."""
    start = time.perf_counter()
    try:
        result = fn()
    except im.InstructMoLEError as err:
        assert "\n" not in str(err), (case, str(err))
        result = None
    except Exception as err:  # the point: name the foreign error and its input
        raise AssertionError(f"{case}: {type(err).__name__} escaped: {err}") from err
    elapsed = time.perf_counter() - start
    assert elapsed < PER_CASE_S, f"{case}: took {elapsed:.2f} s"
    return result


@pytest.fixture(scope="module", autouse=True)
def warm() -> None:
    """The first meta-device module of a process costs about a second once; keep it out of the bound."""
    with torch.device("meta"):
        InstructMoLE(im.MoLEConfig.from_dict(tiny_config()))


def test_fuzz_config_dicts_and_json():
    rng = random.Random(20240609)
    base = tiny_config()
    accepted = 0
    start = time.perf_counter()
    for case in range(CONFIG_CASES):
        cfg = mutate_config(base, rng)
        via_dict = handled(lambda cfg=cfg: im.MoLEConfig.from_dict(cfg), f"from_dict case {case}: {label(cfg)}")
        text = config_text(cfg, rng)
        via_json = handled(lambda text=text: im.MoLEConfig.from_json(text), f"from_json case {case}: {text[:300]!r}")
        for got in (via_dict, via_json):
            if got is not None:
                accepted += 1
                assert_finite_config(got)
    assert accepted > 50  # the mutations leave some configs valid: the accepting path is exercised too
    assert time.perf_counter() - start < 15


def tiny_adapter_file(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    config = im.MoLEConfig.from_dict(tiny_config())
    torch.manual_seed(0)
    adapter = im.Adapter(InstructMoLE(config))
    adapter.lora["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"] = torch.randn(2, 8)
    adapter.lora["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"] = torch.randn(8, 2)
    adapter.lora["transformer.transformer_blocks.0.attn.to_q.alpha"] = torch.tensor(2.0)
    path = adapter.save(folder / "base.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return load_file(str(path)), meta


DTYPES = [
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.int32,
    torch.uint8,
]


def mutate_tensors(tensors: dict[str, torch.Tensor], rng: random.Random) -> dict[str, torch.Tensor]:
    tensors = dict(tensors)
    key = rng.choice(sorted(tensors))
    kind = rng.randrange(7)
    if kind == 0:  # a NaN or inf somewhere
        t = tensors[key].clone()
        t.view(-1)[rng.randrange(t.numel())] = rng.choice([float("nan"), float("inf"), -float("inf")])
        tensors[key] = t
    elif kind == 1:
        tensors[key] = tensors[key].to(rng.choice(DTYPES))
    elif kind == 2:
        tensors[key] = torch.zeros([rng.choice([0, 1, 2, 3, 9]) for _ in range(rng.randint(0, 3))])
    elif kind == 3:
        del tensors[key]
    elif kind == 4:
        tensors[rng.choice(["junk", "mole.x.A", "transformer.a.lora_A.weight", "transformer..alpha"])] = torch.ones(
            2, 2
        )
    elif kind == 5:  # every tensor of one part to one dtype: fp8 / mixed adapters
        dtype = rng.choice(DTYPES[:5])
        prefix = rng.choice(["mole.", "router.", "transformer.", ""])
        tensors = {k: v.to(dtype) if k.startswith(prefix) else v for k, v in tensors.items()}
    else:
        tensors[key] = tensors[key] * 1e30  # finite but huge: fp32 holds it, the point is no crash
    return tensors


def mutate_metadata(meta: dict[str, str], rng: random.Random) -> dict[str, str]:
    meta = dict(meta)
    roll = rng.random()
    if roll < 0.6:
        cfg = json.loads(meta["config"])
        meta["config"] = config_text(mutate_config(cfg, rng), rng)
    elif roll < 0.7:
        meta["format_version"] = rng.choice(["", "2", "1.0", " 1", "01", "x" * 300])
    elif roll < 0.8:
        meta["format"] = rng.choice(["", "InstructMoLE", "lora", "instructmole "])
    elif roll < 0.9:
        del meta[rng.choice(["format", "format_version", "config", "base_model"])]
    else:
        meta[rng.choice(["note", "source", "", "x" * 100])] = rng.choice(["", "v", "\x00", "{}"])
    return meta


def check_accepted(adapter: im.Adapter, case: str) -> None:
    for name, value in adapter.tensors().items():
        assert bool(torch.isfinite(value.float()).all()), f"{case}: accepted {name} holds NaN/inf"
    dtypes = {p.dtype for p in adapter.model.parameters()}
    assert len(dtypes) == 1, f"{case}: accepted an adapter with dtypes {dtypes}"
    if adapter.config.instruction_layers:
        cfg, dtype = adapter.config, dtypes.pop()
        text = torch.randn(1, 3, cfg.text_dim).to(dtype)
        council = adapter.route(text, torch.randn(1, cfg.router_dim).to(dtype))  # runs: no dtype clash
        assert council.probs.shape == (1, len(cfg.instruction_layers), cfg.num_experts)


def test_fuzz_adapter_files(tmp_path):
    rng = random.Random(7)
    tensors, meta = tiny_adapter_file(tmp_path)
    path = tmp_path / "fuzz.safetensors"
    accepted = 0
    start = time.perf_counter()
    for case in range(FILE_CASES):
        roll = rng.random()
        t, m = (mutate_tensors(tensors, rng), meta) if roll < 0.45 else (tensors, mutate_metadata(meta, rng))
        save_file(t, str(path), metadata=m)
        if rng.random() < 0.08:  # damage the bytes themselves
            raw = bytearray(path.read_bytes())
            if rng.random() < 0.5:
                raw = raw[: rng.randrange(len(raw))]
            else:
                for _ in range(4):
                    raw[rng.randrange(min(len(raw), 400))] = rng.randrange(256)
            path.write_bytes(bytes(raw))
        label = f"file case {case}"
        adapter = handled(lambda: im.load_adapter(path), label)
        if adapter is not None:
            accepted += 1
            check_accepted(adapter, label)
    assert accepted > 20
    assert time.perf_counter() - start < 15
