"""Expert paths against the plain formula: y = Σ_j w_j · scale · x A_j B_j."""

from __future__ import annotations

import pytest
import torch

from instructmole.experts import (
    MoLELayer,
    council_delta,
    council_delta_with_projections,
    dense_delta,
    token_delta,
    token_route,
)

N, I, O, R, K = 6, 20, 12, 3, 2
SCALE = 1.7


@pytest.fixture
def bank():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, I, R, generator=g), torch.randn(N, R, O, generator=g)


def loop_formula(x, A, B, indices, weights, scale):
    """The definition, one instance and one expert at a time."""
    out = torch.zeros(*x.shape[:-1], B.shape[-1])
    for b in range(x.shape[0]):
        for j, w in zip(indices[b].tolist(), weights[b].tolist(), strict=True):
            out[b] += w * scale * (x[b] @ A[j] @ B[j])
    return out


def test_council_path_per_instance_equals_formula(bank):
    A, B = bank
    x = torch.randn(3, 7, I)
    indices = torch.tensor([[0, 4], [5, 1], [2, 3]])
    weights = torch.tensor([[0.5, 0.2], [0.9, 0.05], [0.3, 0.3]])
    got = council_delta(x, A, B, indices, weights, SCALE)
    torch.testing.assert_close(got, loop_formula(x, A, B, indices, weights, SCALE), atol=1e-5, rtol=1e-5)
    dense = torch.zeros(3, N).scatter_(1, indices, weights)
    torch.testing.assert_close(got, dense_delta(x, A, B, dense, SCALE), atol=1e-5, rtol=1e-5)


def test_shared_council_equals_per_row(bank):
    A, B = bank
    x = torch.randn(4, 5, I)
    idx, w = torch.tensor([3, 1]), torch.tensor([0.6, 0.25])
    shared = council_delta(x, A, B, idx, w, SCALE)
    per_row = council_delta(x, A, B, idx.expand(4, -1), w.expand(4, -1), SCALE)
    torch.testing.assert_close(shared, per_row, atol=1e-5, rtol=1e-5)


def test_zero_weight_slots_add_nothing(bank):
    A, B = bank
    x = torch.randn(2, 5, I)
    padded = council_delta(
        x, A, B, torch.tensor([[1, 2, 0], [4, 5, 0]]), torch.tensor([[0.3, 0.4, 0.0], [0.1, 0.2, 0.0]]), 1
    )
    plain = council_delta(x, A, B, torch.tensor([[1, 2], [4, 5]]), torch.tensor([[0.3, 0.4], [0.1, 0.2]]), 1)
    torch.testing.assert_close(padded, plain, atol=1e-6, rtol=1e-6)


def test_training_path_equals_inference_path_and_gradients(bank):
    A, B = (t.clone().requires_grad_() for t in bank)
    x = torch.randn(2, 6, I)
    indices = torch.tensor([[0, 3], [2, 5]])
    weights = torch.tensor([[0.4, 0.3], [0.7, 0.1]], requires_grad=True)
    out, proj = council_delta_with_projections(x, A, B, indices, weights, SCALE)
    torch.testing.assert_close(
        out, loop_formula(x, A.detach(), B.detach(), indices, weights.detach(), SCALE), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(proj, torch.einsum("bti,nir->btnr", x, A), atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), (A, B, weights))
    ref = council_delta(x, A, B, indices, weights, SCALE)
    ref_grads = torch.autograd.grad(ref.square().sum(), (A, B, weights))
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-5)


def test_token_routing_equals_per_token_formula(bank):
    A, B = bank
    x = torch.randn(2, 5, I)
    gate = torch.randn(N, I)
    probs, indices, weights = token_route(x, gate, K)
    torch.testing.assert_close(probs, (x @ gate.t()).softmax(-1))
    got = token_delta(x, A, B, indices, weights, SCALE)
    want = torch.zeros(2, 5, O)
    for b in range(2):
        for t in range(5):
            for j, w in zip(indices[b, t].tolist(), weights[b, t].tolist(), strict=True):
                want[b, t] += w * SCALE * (x[b, t] @ A[j] @ B[j])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def per_token_formula(x, A, B, indices, weights, scale):
    """The definition, one token and one chosen expert at a time (fp64 accumulation)."""
    want = torch.zeros(*x.shape[:-1], B.shape[-1], dtype=torch.float64)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            for j, w in zip(indices[b, t].tolist(), weights[b, t].tolist(), strict=True):
                want[b, t] += w * scale * (x[b, t].double() @ A[j].double() @ B[j].double())
    return want


@pytest.mark.parametrize("grouped_kernel", [True, False], ids=["grouped-gemm", "loop"])
@pytest.mark.parametrize(("n", "k"), [(4, 1), (8, 2), (4, 2), (8, 3)])
def test_token_paths_equal_formula(n, k, grouped_kernel, monkeypatch):
    """Grouped (4k <= n: each token meets only its experts) and masked (4k > n) token paths both
    give the formula, with torch's grouped GEMM (16-byte aligned widths) and with the per-expert loop,
    including experts no token chose (an empty group)."""
    import instructmole.experts as experts

    if not grouped_kernel:
        monkeypatch.setattr(experts, "_grouped_gemm_fits", lambda a, b: False)
    g = torch.Generator().manual_seed(n * 10 + k)
    i, r, o = 32, 8, 16
    A, B = torch.randn(n, i, r, generator=g), torch.randn(n, r, o, generator=g)
    x = torch.randn(2, 9, i, generator=g)
    # each token picks k distinct experts among the first n-1: the last expert's group stays empty
    indices = torch.stack([torch.randperm(n - 1, generator=g)[:k] for _ in range(18)]).reshape(2, 9, k)
    weights = torch.rand(2, 9, k, generator=g)
    got = token_delta(x, A, B, indices, weights, SCALE)
    torch.testing.assert_close(got.double(), per_token_formula(x, A, B, indices, weights, SCALE), atol=1e-4, rtol=1e-5)


def test_grouped_token_path_uses_the_grouped_gemm_on_aligned_shapes(monkeypatch):
    """On CPU with 16-byte aligned widths the one-kernel grouped GEMM runs (no per-expert loop)."""
    import instructmole.experts as experts

    if not hasattr(torch.nn.functional, "grouped_mm"):
        pytest.skip("this torch has no grouped GEMM")
    calls = []
    real = torch.nn.functional.grouped_mm
    monkeypatch.setattr(torch.nn.functional, "grouped_mm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    A, B = torch.randn(4, 32, 8), torch.randn(4, 8, 16)
    x = torch.randn(1, 6, 32)
    _, indices, weights = token_route(x, torch.randn(4, 32), 1, renormalise=True)
    token_delta(x, A, B, indices, weights, 1.0)
    assert len(calls) == 2  # down and up
    assert not experts._grouped_gemm_fits(torch.randn(6, 20), torch.randn(4, 20, 3))  # 12-byte rows


def test_grouped_gemm_refused_by_the_build_falls_back_to_the_exact_loop(monkeypatch):
    """A torch whose grouped kernel rejects the layout (e.g. a CUDA build's stricter rules) warns
    once and gives the same result through one matmul per expert."""
    A, B = torch.randn(4, 32, 8), torch.randn(4, 8, 16)
    x = torch.randn(1, 6, 32)
    _, indices, weights = token_route(x, torch.randn(4, 32), 1, renormalise=True)
    want = per_token_formula(x, A, B, indices, weights, 1.0)

    def refuse(*args, **kwargs):
        raise RuntimeError("grouped gemm is not supported for this layout")

    monkeypatch.setattr(torch.nn.functional, "grouped_mm", refuse)
    with pytest.warns(UserWarning, match="one matmul per expert"):
        got = token_delta(x, A, B, indices, weights, 1.0)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)


def test_grouped_token_path_in_half_precision_is_close_to_fp32():
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(4, 64, 16, generator=g) / 8, torch.randn(4, 16, 32, generator=g) / 4
    x = torch.randn(1, 10, 64, generator=g)
    _, indices, weights = token_route(x, torch.randn(4, 64, generator=g), 1, renormalise=True)
    want = token_delta(x, A, B, indices, weights, 1.0)
    got = token_delta(x.bfloat16(), A.bfloat16(), B.bfloat16(), indices, weights, 1.0)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.05)


def test_layer_starts_as_identity_and_has_expected_shapes():
    layer = MoLELayer(I, O, num_experts=N, rank=R, gate_in=8)
    assert layer.A.shape == (N, I, R) and layer.B.shape == (N, R, O) and layer.gate.weight.shape == (N, 8)
    x = torch.randn(1, 3, I)
    assert torch.count_nonzero(council_delta(x, layer.A, layer.B, torch.tensor([0, 1]), torch.ones(2), 1.0)) == 0


def test_token_path_compiles_without_falling_back(caplog):
    """Under torch.compile (ComfyUI's TorchCompileModel) the fp32 token path traces cleanly: the
    traced grouped GEMM takes bf16 only, so fp32 takes the per-expert loop instead of an error."""
    import logging

    A, B, gate = torch.randn(4, 64, 32), torch.randn(4, 32, 64), torch.randn(4, 64)
    x = torch.randn(1, 50, 64)

    def routed(x):
        _, indices, weights = token_route(x, gate, 1, renormalise=True)
        return token_delta(x, A, B, indices, weights, 1.0)

    torch._dynamo.reset()
    with caplog.at_level(logging.ERROR):
        got = torch.compile(routed, backend="aot_eager")(x)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text[-2000:]
    torch.testing.assert_close(got, routed(x), atol=0, rtol=0)
