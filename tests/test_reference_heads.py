"""Importing a reference checkpoint whose train_config.json records no router head count: the reference
code's Perceiver always has 12 heads, so that is the default (recorded as a default), where it fits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import instructmole as im
from instructmole.cli import main
from instructmole.reference import REFERENCE_ROUTER_HEADS, write_reference_layout
from tests.helpers import random_adapter

TEXT, POOLED = torch.randn(3, 32, 64, generator=torch.Generator().manual_seed(0)), torch.randn(3, 32)


def reference_without_heads(adapter: im.Adapter, folder: Path) -> Path:
    """The adapter in the reference layout, its config stripped of the head count (as the reference's own is)."""
    write_reference_layout(adapter, folder)
    raw = json.loads((folder / "train_config.json").read_text())
    del raw["moe_config"]["router_heads"], raw["moe_config"]["router_head_dim"]
    (folder / "train_config.json").write_text(json.dumps(raw))
    return folder


def routes_alike(a: im.Adapter, b: im.Adapter) -> bool:
    ca, cb = a.route(TEXT, POOLED), b.route(TEXT, POOLED)
    return torch.equal(ca.probs, cb.probs) and torch.equal(ca.weights, cb.weights)


def test_the_head_count_defaults_to_the_reference_codes_twelve(tmp_path, capsys):
    official = random_adapter(router_heads=REFERENCE_ROUTER_HEADS, router_head_dim=2)  # 12 heads, width 24
    folder = reference_without_heads(official, tmp_path / "ckpt")
    back = im.import_reference(folder)
    assert (back.config.router_heads, back.config.router_head_dim) == (12, 2)
    assert back.config.extra["router_heads_default"] == 12
    assert routes_alike(back, official)
    out = tmp_path / "a.safetensors"
    assert main(["convert", str(folder), str(out), "--quiet"]) == 0  # no --router-heads needed
    printed = capsys.readouterr().out
    assert "router: 12 heads of 2, the reference code's" in printed
    assert routes_alike(im.load_adapter(out), official)


def test_a_recorded_or_given_head_count_wins_over_the_default(tmp_path):
    three = random_adapter(router_heads=3, router_head_dim=8)  # width 24: 12 would divide it, and be wrong
    folder = tmp_path / "ckpt"
    write_reference_layout(three, folder)  # records router_heads 3
    back = im.import_reference(folder)
    assert back.config.router_heads == 3 and "router_heads_default" not in back.config.extra
    assert routes_alike(back, three)
    reference_without_heads(three, folder)
    given = im.import_reference(folder, router_heads=3)
    assert given.config.router_heads == 3 and "router_heads_default" not in given.config.extra
    assert routes_alike(given, three)
    assert not routes_alike(im.import_reference(folder), three)  # the default is the reference's, not this one's


def test_a_width_twelve_does_not_divide_still_names_the_flag(tmp_path):
    folder = reference_without_heads(random_adapter(router_heads=2, router_head_dim=8), tmp_path / "ckpt")
    with pytest.raises(im.AdapterError, match=r"12, the reference code's, does not divide it.*--router-heads"):
        im.import_reference(folder)
