"""Routing pictures: the token expert map counts and draws what it is given."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from PIL import Image

from instructmole.viz import EXPERT_COLOURS, dominant_experts, token_expert_map


def test_dominant_experts_is_the_majority_with_its_share():
    choices = torch.tensor([[0, 1, 2, 3], [0, 1, 3, 2], [1, 1, 3, 0]])  # 3 layers x 4 tokens
    top, share = dominant_experts(choices, 4)
    assert top.tolist() == [0, 1, 3, 0]  # token 3: a three-way tie goes to the lowest index
    torch.testing.assert_close(share, torch.tensor([2 / 3, 1.0, 2 / 3, 1 / 3]))


def test_token_expert_map_draws_each_token_as_a_patch_with_a_legend():
    dominant = torch.tensor([[0, 1], [2, 9]])  # expert 9: beyond the fixed palette
    agreement = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    picture = token_expert_map(dominant, agreement, 10, (32, 32), title="single")
    pixels = np.asarray(picture)
    assert picture.width == 32 and picture.height > 32 + 18  # title above, legend below
    assert tuple(pixels[18 + 8, 8]) == EXPERT_COLOURS[0]
    assert tuple(pixels[18 + 8, 24]) == tuple(round(v * 0.35) for v in EXPERT_COLOURS[1])  # layers disagree
    assert tuple(pixels[18 + 24, 8]) == EXPERT_COLOURS[2]
    assert tuple(pixels[18 + 24, 24]) not in {tuple(c) for c in EXPERT_COLOURS}
    under = Image.new("RGB", (32, 32), (0, 0, 0))
    half = np.asarray(token_expert_map(dominant, agreement, 10, (32, 32), under=under, opacity=0.5))
    assert abs(int(half[8, 8, 0]) - EXPERT_COLOURS[0][0] // 2) <= 1  # blended over the image, no title band


def test_legend_never_calls_a_used_expert_zero_percent():
    dominant = torch.zeros(20, 20, dtype=torch.long)
    dominant[0, 0] = 1  # one patch of 400
    with_one = np.asarray(token_expert_map(dominant, torch.ones(20, 20), 3, (320, 320)))
    dominant[0, 0] = 0
    without = np.asarray(token_expert_map(dominant, torch.ones(20, 20), 3, (320, 320)))
    legend = slice(320, None)
    assert not np.array_equal(with_one[legend], without[legend])  # "1: <1%" is not "1: 0%"


def _flat_council(p: float):
    """One instance, two layers, four experts, every probability ``p``; experts 0 and 1 are members."""
    from instructmole.council import Council
    from instructmole.layers import reference_targets

    probs = torch.full((1, 2, 4), p)
    weights = torch.zeros(1, 2, 4)
    weights[..., :2] = p
    return Council(tuple(reference_targets(1, 1)), probs, weights, 2, "test", ("a",))


def test_council_heatmap_colours_are_on_a_fixed_scale():
    """A probability has one colour in every picture: a flat council at 0.25 is drawn in the ramp's
    colour for 0.25, not in its top colour (which stretching to the picture's own maximum gave)."""
    from instructmole.viz import _colour, council_heatmap

    cell = 40
    low, high = council_heatmap(_flat_council(0.25), cell), council_heatmap(_flat_council(0.5), cell)
    pixels = Counter(low.getdata())
    non_members = 2 * 2 * (cell - 2) ** 2  # two layers x experts 2 and 3: no frame, no text
    assert pixels[_colour(0.25)] >= non_members
    assert pixels[_colour(1.0)] < 2 * cell  # only the legend's ramp has the top colour
    assert Counter(high.getdata())[_colour(0.5)] >= non_members
    assert low.size == high.size  # same layout: the pictures lie side by side


def test_vertical_text_is_a_rotated_tile():
    from instructmole.viz import _font, vertical_text

    tile = vertical_text("layer", _font(12), (200, 200, 200), (0, 0, 0))
    assert tile.height > tile.width  # written bottom to top
    assert (np.asarray(tile) > 0).any()
