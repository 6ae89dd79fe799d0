"""Losses against their definitions: Gram-form orthogonality and load balancing."""

from __future__ import annotations

import torch

from instructmole.losses import (
    balance_statistics,
    load_balancing_from_statistics,
    load_balancing_loss,
    orthogonality_loss,
    orthogonality_loss_reference,
)


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
    # 2 instances, 4 experts, k=2. Choices: {0,1} and {0,2} -> shares of instances f = [2/2, 1/2, 1/2, 0]
    # (the recipe's f_e: share of rows whose top-k holds e, so Σ f = k).
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.5, 0.1, 0.3, 0.1]])
    indices = torch.tensor([[0, 1], [0, 2]])
    # mean probs p = [0.45, 0.2, 0.25, 0.1]; N·Σ f p = 4·(0.45 + 0.1 + 0.125) = 2.7
    torch.testing.assert_close(load_balancing_loss(probs, indices), torch.tensor(2.7))


def test_load_balancing_is_k_when_balanced_n_when_collapsed_and_averages_layers():
    probs = torch.full((4, 3, 4), 0.25)  # 4 instances, 3 layers, 4 experts, k=2
    indices = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])[:, None].expand(4, 3, 2)
    torch.testing.assert_close(load_balancing_loss(probs, indices), torch.tensor(2.0))
    collapsed = torch.zeros(4, 1, 4)
    collapsed[..., 0] = 1.0
    torch.testing.assert_close(
        load_balancing_loss(collapsed, torch.zeros(4, 1, 1, dtype=torch.long)), torch.tensor(4.0)
    )


def test_load_balancing_of_the_issue_example_n8_k4():
    """N = 8, k = 4, 8 instances: balanced routing scores k = 4, routing collapsed on one council N = 8."""
    n, k = 8, 4
    balanced_idx = torch.tensor([[(i + j) % n for j in range(k)] for i in range(8)])
    balanced = torch.full((8, n), 1 / n)
    torch.testing.assert_close(load_balancing_loss(balanced, balanced_idx), torch.tensor(4.0))
    collapsed = torch.zeros(8, n)
    collapsed[:, :k] = 1 / k
    collapsed_idx = torch.arange(k).expand(8, k)
    torch.testing.assert_close(load_balancing_loss(collapsed, collapsed_idx), torch.tensor(8.0))


def test_step_statistics_over_micro_batches_equal_one_batch():
    """f of the whole step with each micro-batch's own p (prob_units = units / M): the mean of the
    micro-batch terms is the one-batch value, and so is its gradient."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 3, 6, generator=g, requires_grad=True)  # 8 instances, 3 layers, 6 experts
    probs = logits.softmax(-1)
    indices = probs.topk(2, dim=-1).indices
    prob_sum, counts, units = balance_statistics(probs, indices)
    whole = load_balancing_from_statistics(prob_sum, counts, units)
    (grad_whole,) = torch.autograd.grad(whole.sum(), logits, retain_graph=True)
    parts = []
    for m in range(8):  # 8 micro-batches of one instance
        p_sum, _, _ = balance_statistics(probs[m : m + 1], indices[m : m + 1])
        parts.append(load_balancing_from_statistics(p_sum, counts, units, prob_units=units / 8))
    mean = torch.stack(parts).mean(0)
    torch.testing.assert_close(mean, whole)
    (grad_parts,) = torch.autograd.grad(mean.sum(), logits)
    torch.testing.assert_close(grad_parts, grad_whole)
    alone = torch.stack(  # what per-micro-batch statistics gave: another loss
        [load_balancing_from_statistics(*balance_statistics(probs[m : m + 1], indices[m : m + 1])) for m in range(8)]
    ).mean(0)
    assert not torch.allclose(alone, whole)
