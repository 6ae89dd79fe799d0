"""The routing report: metrics on hand-built councils whose answers are known, and the picture/files."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from instructmole.layers import reference_targets
from training.report import (
    agreement,
    balance,
    council_sets,
    decode_accuracy,
    distinctness,
    layer_labels,
    modal_councils,
    report_image,
    routing_metrics,
    swap_gap,
    task_mean_weights,
    usage,
    write_report,
)


def idx(*instances):
    """Index tensor [b, L, k] from per-instance lists of per-layer expert lists."""
    return torch.tensor(instances, dtype=torch.long)


def fs(*experts):
    return frozenset(experts)


# ---- councils and modal councils --------------------------------------------------------------


def test_council_sets_per_instance_per_layer():
    assert council_sets(idx([[1, 0], [3, 2]], [[2, 3], [0, 1]])) == [[fs(0, 1), fs(2, 3)], [fs(2, 3), fs(0, 1)]]


def test_council_sets_rejects_float_or_flat_input():
    with pytest.raises(ValueError, match="integer tensor"):
        council_sets(torch.zeros(2, 3, 2))
    with pytest.raises(ValueError, match="integer tensor"):
        council_sets(torch.zeros(2, 3, dtype=torch.long))


def test_modal_council_is_the_most_frequent_set_per_layer():
    indices = idx([[2, 3], [0, 1]], [[3, 2], [0, 1]], [[0, 1], [1, 2]])
    modal = modal_councils(indices, ["a", "a", "a"])
    assert modal == {"a": [fs(2, 3), fs(0, 1)]}  # order within an instance's top-k does not matter


def test_modal_tie_break_is_the_smallest_sorted_tuple_whatever_the_order():
    one = modal_councils(idx([[2, 3]], [[0, 3]], [[1, 2]]), ["t", "t", "t"])
    other = modal_councils(idx([[1, 2]], [[2, 3]], [[0, 3]]), ["t", "t", "t"])
    assert one == other == {"t": [fs(0, 3)]}


def test_modal_councils_are_keyed_by_sorted_task_names():
    modal = modal_councils(idx([[0, 1]], [[2, 3]]), ["zoom", "blur"])
    assert list(modal) == ["blur", "zoom"]
    assert modal["zoom"] == [fs(0, 1)]


def test_modal_councils_need_one_task_per_instance():
    with pytest.raises(ValueError, match="one per instance"):
        modal_councils(idx([[0, 1]], [[2, 3]]), ["a"])


# ---- distinctness -----------------------------------------------------------------------------


def test_distinctness_disjoint_is_one_identical_is_zero():
    assert distinctness({"a": [fs(0, 1)], "b": [fs(2, 3)]}) == 1.0
    assert distinctness({"a": [fs(0, 1)], "b": [fs(1, 0)]}) == 0.0


def test_distinctness_half_overlap_is_one_minus_a_third():
    # k=2, n=4: {0,1} and {1,2} share 1 of 3 experts -> Jaccard 1/3.
    assert distinctness({"a": [fs(0, 1)], "b": [fs(1, 2)]}) == pytest.approx(2 / 3)


def test_distinctness_averages_over_pairs_and_layers():
    modal = {
        "a": [fs(0, 1), fs(0, 1)],
        "b": [fs(2, 3), fs(0, 1)],  # vs a: 1, 0
        "c": [fs(0, 1), fs(1, 2)],  # vs a: 0, 2/3; vs b: 1, 2/3
    }
    assert distinctness(modal) == pytest.approx((1 + 0 + 0 + 2 / 3 + 1 + 2 / 3) / 6)


def test_distinctness_needs_two_tasks():
    assert math.isnan(distinctness({"a": [fs(0, 1)]}))
    assert math.isnan(distinctness({}))


# ---- decode accuracy and agreement ------------------------------------------------------------

MODAL3 = {"a": [fs(0, 1), fs(0, 1)], "b": [fs(2, 3), fs(2, 3)], "c": [fs(4, 5), fs(4, 5)]}


def test_decode_accuracy_on_a_crafted_held_out_set():
    held = idx(
        [[0, 1], [0, 1]],  # a, exactly a's councils: right
        [[0, 1], [1, 2]],  # a, a: 1 + 1/3, b: 0 + 1/3: right
        [[2, 3], [2, 3]],  # a, looks like b: wrong
        [[2, 3], [3, 4]],  # b, b: 1 + 1/3, c: 0 + 1/3: right
        [[4, 5], [0, 4]],  # b, c: 1 + 1/3, a: 1/3: wrong
        [[4, 5], [4, 5]],  # c: right
    )
    tasks = ["a", "a", "a", "b", "b", "c"]
    assert decode_accuracy(MODAL3, held, tasks) == pytest.approx(4 / 6)


def test_decode_ties_split_the_credit_evenly():
    # {1,2} in both layers: a and b both score 2/3, c scores 0.
    held = idx([[1, 2], [1, 2]], [[1, 2], [1, 2]])
    assert decode_accuracy(MODAL3, held, ["a", "c"]) == pytest.approx((1 / 2 + 0) / 2)
    assert decode_accuracy(MODAL3, held[:1], ["b"]) == pytest.approx(1 / 2)


def test_decode_of_a_collapsed_router_is_chance():
    same = [fs(0, 1), fs(2, 3)]
    modal = {"a": same, "b": same, "c": same}
    held = idx([[0, 1], [2, 3]], [[0, 1], [2, 3]], [[0, 1], [2, 3]])
    assert decode_accuracy(modal, held, ["a", "b", "c"]) == pytest.approx(1 / 3)


def test_decode_and_agreement_refuse_a_task_without_modal_council():
    with pytest.raises(ValueError, match="'d'"):
        decode_accuracy(MODAL3, idx([[0, 1], [0, 1]]), ["d"])
    with pytest.raises(ValueError, match="layers"):
        agreement(MODAL3, idx([[0, 1]]), ["a"])


def test_agreement_is_the_share_of_instance_layer_pairs_on_the_modal_council():
    held = idx(
        [[1, 0], [0, 1]],  # a: 2 of 2
        [[0, 1], [0, 2]],  # a: 1 of 2
        [[0, 1], [0, 1]],  # b: 0 of 2
        [[5, 4], [4, 3]],  # c: 1 of 2
    )
    assert agreement(MODAL3, held, ["a", "a", "b", "c"]) == pytest.approx(4 / 8)


def test_empty_held_out_set_gives_nan():
    empty = torch.zeros(0, 2, 2, dtype=torch.long)
    assert math.isnan(decode_accuracy(MODAL3, empty, []))
    assert math.isnan(agreement(MODAL3, empty, []))


# ---- swap gap, usage, balance -----------------------------------------------------------------


def test_swap_gap_is_the_relative_increase_of_the_mean_loss():
    assert swap_gap(torch.tensor([1.0, 3.0]), torch.tensor([2.5, 2.5, 2.0])) == pytest.approx((7 / 3 - 2) / 2)
    assert swap_gap([0.5], [0.4]) == pytest.approx(-0.2)
    assert swap_gap([1.0, 1.0], [1.0]) == 0.0
    assert math.isnan(swap_gap([0.0], [1.0]))
    assert math.isnan(swap_gap([], [1.0]))


def test_usage_counts_routing_slots_per_layer():
    u = usage(idx([[0, 1], [0, 0]], [[0, 2], [0, 0]]), num_experts=3)
    torch.testing.assert_close(u, torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="outside"):
        usage(idx([[0, 3]]), num_experts=3)


def test_balance_one_for_even_zero_for_collapsed():
    assert balance(torch.full((3, 4), 0.25)) == pytest.approx(1.0)
    assert balance(torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0]])) == pytest.approx(0.0)
    # Two of four experts evenly: entropy log 2 of log 4.
    assert balance(torch.tensor([[0.5, 0.5, 0, 0]])) == pytest.approx(0.5)
    # Averaged over layers; unnormalised counts are fine.
    assert balance(torch.tensor([[3.0, 3.0, 3.0, 3.0], [0, 5.0, 0, 0]])) == pytest.approx(0.5)


def test_balance_of_usage_from_indices():
    even = idx([[0, 1]], [[2, 3]])  # every expert once
    assert balance(usage(even, 4)) == pytest.approx(1.0)


# ---- mean weights and the all-in-one helper ---------------------------------------------------


def test_task_mean_weights_averages_per_task_in_sorted_order():
    w = torch.tensor(
        [
            [[0.6, 0.4, 0.0]],  # warm
            [[0.0, 0.5, 0.5]],  # cool
            [[0.2, 0.8, 0.0]],  # warm
        ]
    )
    names, means = task_mean_weights(w, ["warm", "cool", "warm"])
    assert names == ["cool", "warm"]
    torch.testing.assert_close(means, torch.tensor([[[0.0, 0.5, 0.5]], [[0.4, 0.6, 0.0]]]))


def test_routing_metrics_uses_training_for_modal_and_held_out_for_scores():
    train = idx([[0, 1]], [[0, 1]], [[2, 3]], [[2, 3]])
    held = idx([[0, 1]], [[2, 3]])
    modal, m = routing_metrics(train, ["a", "a", "b", "b"], held, ["a", "b"], 4, [1.0], [1.1])
    assert modal == {"a": [fs(0, 1)], "b": [fs(2, 3)]}
    assert m == pytest.approx(
        {"distinctness": 1.0, "decode_accuracy": 1.0, "agreement": 1.0, "swap_gap": 0.1, "balance": 1.0}
    )
    _, m = routing_metrics(train, ["a", "a", "b", "b"], held, ["b", "a"], 4)
    assert m["decode_accuracy"] == 0.0 and m["agreement"] == 0.0 and "swap_gap" not in m


# ---- picture ----------------------------------------------------------------------------------

METRICS = {"distinctness": 0.62, "decode_accuracy": 0.83, "swap_gap": 0.12, "agreement": 0.7, "balance": 0.93}


def _inputs(n_tasks, layers, n_exp, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    tasks = [f"task{t}" for t in range(n_tasks) for _ in range(3)]
    probs = torch.rand(len(tasks), len(layers), n_exp, generator=g)
    top, indices = probs.topk(k, -1)
    weights = torch.zeros_like(probs).scatter_(-1, indices, top / top.sum(-1, keepdim=True))
    names, means = task_mean_weights(weights, tasks)
    return names, means, modal_councils(indices, tasks)


def _white(img):
    return sum(1 for px in img.getdata() if px == (255, 255, 255))


def test_report_image_small_and_grows_with_tasks():
    layers = reference_targets(1, 1)
    img2 = report_image(*_inputs(2, layers, 4), layers, METRICS, "step 10")
    img6 = report_image(*_inputs(6, layers, 4), layers, METRICS, "step 10")
    assert img2.mode == img6.mode == "RGB"
    assert img6.width > img2.width
    assert img6.height <= img2.height  # the metrics may fit on fewer lines when wider


def test_report_image_scales_cells_down_for_many_layers():
    layers = reference_targets()  # 57 layers
    names, means, modal = _inputs(6, layers, 8)
    img = report_image(names, means, modal, layers, METRICS, "step 4000")
    assert img.mode == "RGB"
    assert img.height < 1100 and img.width < 1000  # at the 36 px of a short report it would be > 2,000 px tall
    big = report_image(names, means, modal, layers, METRICS, "step 4000", cell=36)
    assert big.height > 57 * 36
    # The modal councils are framed (pure white); without modal councils there is no frame.
    assert _white(img) > 0
    assert _white(report_image(names, means, None, layers, METRICS, "step 4000")) == 0


def test_report_image_renders_one_task_and_odd_values():
    layers = ["transformer_blocks.0.ff.net.2", "transformer_blocks.0.attn.to_out.0", "some.other.layer"]
    names, means, modal = _inputs(1, layers, 3, k=1)
    metrics = {"distinctness": math.nan, "swap_gap": -0.05, "note": "init"}
    img = report_image(names, means, modal, layers, metrics, "")
    assert img.mode == "RGB" and img.width >= 300
    with pytest.raises(ValueError, match="tasks=2"):
        report_image(["a", "b"], means, modal, layers, metrics)


def test_report_image_colour_scale_is_fixed_so_runs_compare_by_eye():
    """A weight has one colour in every report, whatever the other weights: 0.25 everywhere is drawn
    in the ramp's colour for 0.25 (stretching to the picture's maximum made it the top colour)."""
    from collections import Counter

    from instructmole.viz import _colour

    layers = reference_targets(1, 1)
    flat = torch.full((1, 2, 4), 0.25)
    mixed = flat.clone()
    mixed[0, 0, 0] = 0.9
    cell = 36
    one, two = (Counter(report_image(["t"], m, None, layers, {}, cell=cell).getdata()) for m in (flat, mixed))
    assert one[_colour(0.25)] >= 8 * (cell - 2) ** 2 // 2  # every cell (less its printed value)
    assert two[_colour(0.25)] >= 7 * (cell - 2) ** 2 // 2  # the same colour beside a larger weight
    assert one[_colour(1.0)] < 2 * cell  # the legend's ramp only
    half = Counter(report_image(["t"], flat, None, layers, {}, cell=cell, scale=0.5).getdata())
    assert half[_colour(0.5)] >= 8 * (cell - 2) ** 2 // 2
    with pytest.raises(ValueError, match="colour scale"):
        report_image(["t"], flat, None, layers, {}, scale=0.0)


def test_layer_labels_are_the_rule_names_and_unambiguous():
    assert layer_labels(reference_targets(2, 1)) == ["double:0", "double:1", "single:0"]
    names = [
        "transformer_blocks.0.ff.net.2",
        "transformer_blocks.0.attn.to_q",
        "x.y",
        "single_transformer_blocks.4.proj_out",
    ]
    assert layer_labels(names) == [*names[:3], "single:4"]


# ---- files ------------------------------------------------------------------------------------


def test_write_report_writes_both_files_atomically(tmp_path):
    img = Image.new("RGB", (30, 20), (10, 20, 30))
    data = {
        "step": 100,
        "metrics": {"distinctness": math.nan, "swap_gap": 0.12, "inf": math.inf},
        "modal": {"a": [fs(3, 1)]},
        "usage": torch.tensor([[0.5, 0.5]]),
    }
    folder = tmp_path / "reports" / "deep"
    json_path, png_path = write_report(folder, "routing-000100", data, img)
    assert (json_path.name, png_path.name) == ("routing-000100.json", "routing-000100.png")
    text = json_path.read_text()
    loaded = json.loads(text)
    assert loaded["metrics"] == {"distinctness": None, "inf": None, "swap_gap": 0.12}
    assert loaded["modal"] == {"a": [[1, 3]]}
    assert loaded["usage"] == [[0.5, 0.5]]
    assert "NaN" not in text and text.index('"metrics"') < text.index('"step"')  # sorted keys
    assert text.startswith('{\n  "')  # indent 2
    with Image.open(png_path) as png:
        assert png.size == (30, 20)
    # Overwriting works and leaves no temp file behind.
    write_report(folder, "routing-000100", {"step": 200}, img)
    assert json.loads(json_path.read_text()) == {"step": 200}
    assert sorted(p.name for p in folder.iterdir()) == ["routing-000100.json", "routing-000100.png"]


def test_write_report_failure_leaves_no_temp_file(tmp_path):
    class Broken:
        def convert(self, mode):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_report(tmp_path, "r", {"a": 1}, Broken())  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
