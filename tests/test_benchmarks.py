"""The benchmark scripts run end to end (smoke test: agreement is checked, timings are not)."""

from __future__ import annotations

import json

from benchmarks import icedit, inference, routing_fidelity


def test_inference_benchmark_quick(tmp_path):
    out = tmp_path / "bench.json"
    inference.main(["--quick", "--device", "cpu", "--out", str(out)])
    data = json.loads(out.read_text())
    assert {"base", "dynamic", "fixed", "merged", "reference"} <= set(data["variants"])
    assert all(v < 1e-3 for v in data["agreement"].values())  # every path computes the same thing


def test_routing_fidelity_measures_both_paddings():
    result = routing_fidelity.measure(seeds=(0,), short=8, long=16)
    assert 0.0 <= result["identical_council_share"] <= 1.0 and result["mean_abs_prob_diff"] >= 0.0
    assert result["padding"] == {"exact": 16, "comfyui": 8}


def test_icedit_benchmark_quick_agrees_with_dense():
    data = icedit.main(["--quick"])
    assert len(data["results"]) == 2 * len(icedit.CASES)
    assert all(r["max_abs_diff"] < 1e-4 for r in data["results"].values())
