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
    """Each side is routed at its own padding: equal paddings give equal councils (so nothing else
    differs between the sides), and the councils drift apart as the two paddings do."""
    same = routing_fidelity.measure(seeds=(0,), short=16, long=16)
    assert same["identical_council_share"] == 1.0
    assert same["mean_abs_prob_diff"] == same["mean_l1_weight_diff_per_layer"] == 0.0
    near = routing_fidelity.measure(seeds=(0,), short=12, long=16)
    far = routing_fidelity.measure(seeds=(0,), short=8, long=16)
    assert far["padding"] == {"exact": 16, "comfyui": 8}
    assert 0.0 < near["mean_abs_prob_diff"] < far["mean_abs_prob_diff"]
    assert 1.0 > near["identical_council_share"] > far["identical_council_share"]


def test_icedit_benchmark_quick_agrees_with_dense():
    data = icedit.main(["--quick"])
    assert len(data["results"]) == 2 * len(icedit.CASES)
    assert all(r["max_abs_diff"] < 1e-4 for r in data["results"].values())
