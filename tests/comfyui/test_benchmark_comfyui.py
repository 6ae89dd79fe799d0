"""The ComfyUI benchmark runs end to end (smoke test: agreement and checks, never timings)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from benchmarks import comfyui


def test_comfyui_benchmark_quick(instructmole_pack: Any, tmp_path) -> None:
    out = tmp_path / "bench.json"
    comfyui.main(["--quick", "--device", "cpu", "--out", str(out)])
    data = json.loads(out.read_text())
    assert set(data["variants"]) == set(comfyui.VARIANTS)
    # Different code paths, same computation: the carried signal routes exactly like the Route
    # node's council, and ComfyUI's weight patches equal the dynamic expert terms.
    assert data["agreement"]["auto-exact vs fixed"] < 1e-6
    assert data["agreement"]["merged vs fixed"] < 1e-3
    checks = data["checks"]
    assert checks["finite"] and not checks["lowvram"]
    assert all(e > 1e-5 for e in checks["effect"].values())  # every patched variant really acts
    assert all(d == 0.0 for d in checks["drift"].values())  # every switch re-patched the model
    assert checks["routed_exact"] == {"auto-exact": [True], "auto-approx": [False]}


def test_comfyui_benchmark_needs_comfyui_path(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        comfyui.main(["--quick"])
    assert exit_info.value.code == 2
    assert "COMFYUI_PATH is not set" in capsys.readouterr().err
