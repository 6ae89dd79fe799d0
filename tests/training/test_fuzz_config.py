"""Seeded fuzz over the trainer's two user files, the YAML config (and its overrides) and the data
manifest: whatever the bytes, only the trainer's own errors escape (``ConfigError``, ``DataError``),
each one line, and a file that loads gives values of the declared types."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from training.config import TrainConfig, load_config
from training.data import check_rows, read_rows
from training.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[2]
CONFIG_CASES = 600
MANIFEST_CASES = 400


def junk(rng: random.Random, depth: int = 0) -> Any:
    """A random YAML/JSON-able value, biased to the values that break parsers and validators."""
    kind = rng.randrange(16 if depth < 3 else 11)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, 1, -1, 2, 7, 255, 256, 4097, -(10**30), 10**30, 2**63])
    if kind == 3:
        return rng.choice([0.0, -0.0, 0.5, 1e-12, 1e308, -1e308, float("nan"), float("inf"), float("-inf")])
    if kind == 4:
        return rng.choice(["", " ", "no", "yes", "off", "bf16", "fp32", "cosine", "skip", "reference", "~", "null"])
    if kind == 5:
        return "".join(rng.choice("abc/.\\:=- \t\n\x00é☃\ud7ff") for _ in range(rng.randrange(0, 12)))
    if kind == 6:
        return "x" * rng.choice([255, 256, 4096, 70000])
    if kind == 7:
        return rng.choice(["1e-4", "3e5", ".inf", "0x10", "1_000", "[1, 2", "{a: 1", "'quoted'", "*alias", "&a b"])
    if kind == 8:
        return rng.choice(["train.lr", "transformer_blocks.0.ff.net.2", "../../etc/passwd", "/", "."])
    if kind in (9, 10):
        return rng.random() * rng.choice([1, 100, 1e6])
    if kind in (11, 12):
        return [junk(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    if kind in (13, 14):
        return {
            rng.choice(["a", "lr", "rank", "items", "1", "instruction"]): junk(rng, depth + 1)
            for _ in range(rng.randrange(0, 4))
        }
    nested: Any = 1
    for _ in range(rng.choice([10, 100, 300])):
        nested = [nested]
    return nested


@pytest.fixture(scope="module")
def valid_config(tmp_path_factory) -> dict:
    """The tiny demo config with its paths pointing at files that exist."""
    root = tmp_path_factory.mktemp("fuzz_config")
    (root / "model").mkdir()
    (root / "m.jsonl").write_text("")
    data = yaml.safe_load((ROOT / "training" / "configs" / "tiny_demo.yaml").read_text())
    data["model"]["pretrained"] = str(root / "model")
    data["data"]["manifest"] = str(root / "m.jsonl")
    data["train"]["output_dir"] = str(root / "out")
    return data


def mutate(rng: random.Random, data: dict) -> dict:
    data = copy.deepcopy(data)
    for _ in range(rng.randrange(1, 4)):
        section = rng.choice([*data, "train", "adapter", "nonsense"])
        op = rng.randrange(6)
        if op == 0:
            data[section] = junk(rng)
        elif op == 1 and isinstance(data.get(section), dict) and data[section]:
            data[section].pop(rng.choice(list(data[section])))
        elif isinstance(data.get(section), dict):
            keys = [*data[section], "lora", "items", "learning_rate", "mixed_precision", "trackers", "betas"]
            data[section][rng.choice(keys)] = junk(rng)
    return data


def text_of(rng: random.Random, data: dict) -> bytes:
    """YAML of ``data``, sometimes damaged: cut, bytes flipped, binary, another encoding, a BOM."""
    try:
        text = yaml.safe_dump(data, allow_unicode=True).encode()
    except (yaml.YAMLError, RecursionError):
        text = b"train: {lr: 1}\n"
    op = rng.randrange(8)
    if op == 0:
        return text[: rng.randrange(len(text) + 1)]
    if op == 1:
        raw = bytearray(text)
        for _ in range(rng.randrange(1, 6)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return bytes(raw)
    if op == 2:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
    if op == 3:
        return text.decode().encode("utf-16")
    if op == 4:
        return b"\xef\xbb\xbf" + text
    if op == 5:
        return b"a: &x [*x]\n" if rng.random() < 0.5 else b"- " * 5000 + b"1\n"
    return text


def overrides_of(rng: random.Random) -> list[str]:
    keys = [
        "train.lr",
        "train.mixed_precision",
        "adapter.top_k",
        "save.every",
        "sample.items",
        "data.manifest",
        "model.vae",
        "train",
        "train.lr.x",
        "=",
        "",
        "a.b.c.d",
        "log.trackers",
        "adapter.lora.rank",
    ]
    out = []
    for _ in range(rng.randrange(0, 3)):
        key = rng.choice(keys)
        value = junk(rng)
        try:
            text = value if isinstance(value, str) else json.dumps(value) if rng.random() < 0.5 else str(value)
        except (ValueError, RecursionError):
            text = "[" * 3000
        out.append(f"{key}={text}" if rng.random() < 0.9 else key)
    return out


def check_types(config: TrainConfig) -> None:
    """A config that loads holds values of the declared types (never a YAML boolean where text belongs)."""
    t = config.train
    assert isinstance(t.lr, float) and t.lr > 0 and isinstance(t.max_steps, int) and t.max_steps >= 1
    assert t.mixed_precision in ("bf16", "fp16", "no") and isinstance(config.adapter.top_k, int)
    assert config.adapter.top_k <= config.adapter.num_experts
    assert all(isinstance(b, float) for b in t.betas) and len(t.betas) == 2


def test_fuzz_config_files_and_overrides(valid_config, tmp_path):
    rng = random.Random(20261207)
    loaded = refused = 0
    path = tmp_path / "c.yaml"
    for case in range(CONFIG_CASES):
        path.write_bytes(text_of(rng, mutate(rng, valid_config) if case % 5 else valid_config))
        overrides = overrides_of(rng)
        try:
            config = load_config(path, overrides)
        except ConfigError as err:
            message = str(err)
            assert message and "\n" not in message, (case, message)
            refused += 1
            continue
        check_types(config)
        loaded += 1
    assert loaded > 10 and refused > 300, (loaded, refused)  # the fuzz reaches both sides


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz_images")
    good = root / "good.png"
    Image.new("RGB", (64, 48), (10, 20, 30)).save(good)
    small = root / "small.png"
    Image.new("RGB", (8, 8)).save(small)
    cut = root / "cut.png"
    cut.write_bytes(good.read_bytes()[:40])
    empty = root / "empty.png"
    empty.write_bytes(b"")
    text = root / "text.jpg"
    text.write_text("not an image")
    folder = root / "folder.png"
    folder.mkdir()
    return {
        "good": good,
        "small": small,
        "cut": cut,
        "empty": empty,
        "text": text,
        "folder": folder,
        "missing": root / "missing.png",
    }


def manifest_row(rng: random.Random, images: dict[str, Path]) -> Any:
    if rng.random() < 0.4:  # a good row: manifests are mostly good, and "skip" then keeps some
        return {"instruction": "make it snowy", "target": str(images["good"]), "references": str(images["good"])}
    paths = [str(p) for p in images.values()] + ["good.png", "", " ", "../x.png", "a\x00b.png", "x" * 300]
    row: dict[str, Any] = {
        "instruction": rng.choice(["make it snowy", "", " ", "é☃", "x" * 5000]),
        "target": rng.choice(paths[:3] + paths),
        "references": rng.choice([[], rng.choice(paths), [rng.choice(paths) for _ in range(rng.randrange(6))]]),
    }
    if rng.random() < 0.3:
        row["task"] = rng.choice(["weather", None, 3, ""])
    if rng.random() < 0.3:
        row["split"] = rng.choice(["train", "holdout", "hold", "", None, 1])
    for _ in range(rng.randrange(3) if rng.random() < 0.3 else 0):
        key = rng.choice(["instruction", "target", "references", "task", "split", "refs", "prompt"])
        row[key] = junk(rng)
    return row if rng.random() < 0.95 else junk(rng)


def manifest_bytes(rng: random.Random, images: dict[str, Path]) -> bytes:
    lines = []
    for _ in range(rng.randrange(0, 6)):
        op = rng.randrange(20)
        if op == 0:
            lines.append(rng.choice(["", "# a comment", "{", "[1, 2]", "null", "{'a': 1}", "[" * 100000]))
        else:
            try:
                lines.append(json.dumps(manifest_row(rng, images), ensure_ascii=rng.random() < 0.5))
            except (ValueError, RecursionError):
                lines.append("{}")
    text = "\n".join(lines).encode("utf-8", "surrogatepass")
    op = rng.randrange(12)
    if op == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
    if op == 1:
        return b"\xef\xbb\xbf" + text
    if op == 2 and text:
        raw = bytearray(text)
        raw[rng.randrange(len(raw))] = rng.randrange(256)
        return bytes(raw)
    return text


def test_fuzz_manifests(images, tmp_path):
    rng = random.Random(7)
    usable = refused = 0
    path = tmp_path / "edits.jsonl"
    for case in range(MANIFEST_CASES):
        path.write_bytes(manifest_bytes(rng, images))
        try:
            rows = read_rows(path)
            checked = check_rows(
                rows,
                min_side=rng.choice([1, 16, 64]),
                max_references=rng.choice([0, 1, 4]),
                on_error=rng.choice(["fail", "skip"]),
            )
        except DataError as err:
            message = str(err)
            assert message and "\n" not in message, (case, message)
            refused += 1
            continue
        assert checked.rows and all(r.target.is_file() for r in checked.rows)
        assert all("\n" not in p for p in checked.problems)
        usable += 1
    assert usable > 20 and refused > 100, (usable, refused)
