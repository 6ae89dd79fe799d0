"""Routing pictures: the token expert map counts and draws what it is given."""

from __future__ import annotations

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
