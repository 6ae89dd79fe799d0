"""Kontext token layout: packing, and reference positions as ComfyUI's offset method lays them out."""

from __future__ import annotations

import torch

from instructmole.kontext import pack, reference_offsets, token_ids, unpack


def test_pack_round_trip_and_channel_order():
    z = torch.randn(2, 16, 6, 4)
    tokens = pack(z)
    assert tokens.shape == (2, 6, 64)
    assert torch.equal(unpack(tokens, 6, 4), z)
    # token 0 holds the top-left 2x2 patch, channel-major: (c, ph, pw)
    assert torch.equal(tokens[0, 0].reshape(16, 2, 2), z[0, :, :2, :2])


def test_reference_offsets_follow_the_canvas():
    # same-size square references: the first at the origin, the next below (h + H > w + W is false)
    assert reference_offsets([(8, 8), (8, 8), (8, 8)]) == [(0, 0), (8, 0), (0, 8)]
    # after a wide reference the next goes below it; after a tall one, to its right
    assert reference_offsets([(4, 12), (10, 4)]) == [(0, 0), (4, 0)]
    assert reference_offsets([(12, 4), (4, 4)]) == [(0, 0), (0, 4)]


def test_token_ids_target_then_references():
    ids = token_ids((4, 6), [(4, 6), (2, 2)])
    assert ids.shape == (2 * 3 + 2 * 3 + 1, 3)
    target, first, second = ids[:6], ids[6:12], ids[12:]
    assert torch.equal(target[:, 0], torch.zeros(6)) and torch.equal(first[:, 0], torch.ones(6))
    assert target[:, 1:].tolist() == [[r, c] for r in range(2) for c in range(3)]
    assert torch.equal(first[:, 1:], target[:, 1:])  # one reference: diffusers' Kontext layout
    assert second.tolist() == [[1.0, 2.0, 0.0]]  # below the first: row offset 4 latent px = 2 patches


def test_resolution_shift_is_fluxs():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from instructmole.kontext import FLUX_SCHEDULER, resolution_shift

    c = FLUX_SCHEDULER
    for tokens in (4, 256, 1024, 4096, 8192):
        want = calculate_shift(tokens, c["base_image_seq_len"], c["max_image_seq_len"], c["base_shift"], c["max_shift"])
        assert abs(resolution_shift(tokens) - want) < 1e-12
