"""Losses against their definitions: Gram-form orthogonality and load balancing."""

from __future__ import annotations

import torch

from instructmole.losses import load_balancing_loss, orthogonality_loss, orthogonality_loss_reference


def test_gram_orthogonality_equals_materialised_formula():
    g = torch.Generator().manual_seed(0)
    n, i, r, o = 5, 16, 4, 9
    x, A, B = torch.randn(3, 11, i, generator=g), torch.randn(n, i, r, generator=g), torch.randn(n, r, o, generator=g)
    proj = torch.einsum("bti,nir->btnr", x, A)
    got, want = orthogonality_loss(proj, B), orthogonality_loss_reference(x, A, B)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert 0 < float(got) < 1


def test_orthogonality_is_zero_for_orthogonal_experts_and_one_for_parallel():
    x = torch.eye(4)[None]  # tokens are the basis: E_i(X) = A_i B_i
    A = torch.eye(4).reshape(4, 4, 1)  # expert i reads input coordinate i only
    B = torch.ones(4, 1, 3)
    proj = torch.einsum("bti,nir->btnr", x, A)
    assert float(orthogonality_loss(proj, B)) == 0.0  # outputs live on disjoint tokens
    A_same = torch.ones(4, 4, 1)
    proj_same = torch.einsum("bti,nir->btnr", x, A_same)
    torch.testing.assert_close(orthogonality_loss(proj_same, B), torch.tensor(1.0))


def test_orthogonality_gradient_is_finite_at_zero_init():
    A = torch.randn(4, 8, 2, requires_grad=True)
    B = torch.zeros(4, 2, 5, requires_grad=True)
    loss = orthogonality_loss(torch.einsum("ti,nir->tnr", torch.randn(6, 8), A), B)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert torch.isfinite(A.grad).all() and torch.isfinite(B.grad).all()


def test_load_balancing_hand_checked():
    # 2 instances, 4 experts, k=2. Choices: {0,1} and {0,2} -> slot shares f = [2/4, 1/4, 1/4, 0].
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.5, 0.1, 0.3, 0.1]])
    indices = torch.tensor([[0, 1], [0, 2]])
    # mean probs p = [0.45, 0.2, 0.25, 0.1]; N·Σ f p = 4·(0.225 + 0.05 + 0.0625) = 1.35
    torch.testing.assert_close(load_balancing_loss(probs, indices), torch.tensor(1.35))


def test_load_balancing_is_one_when_balanced_and_averages_layers():
    probs = torch.full((4, 3, 4), 0.25)  # 4 instances, 3 layers, 4 experts
    indices = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])[:, None].expand(4, 3, 2)
    torch.testing.assert_close(load_balancing_loss(probs, indices), torch.tensor(1.0))
    collapsed = torch.zeros(4, 1, 4)
    collapsed[..., 0] = 1.0
    torch.testing.assert_close(
        load_balancing_loss(collapsed, torch.zeros(4, 1, 1, dtype=torch.long)), torch.tensor(4.0)
    )
