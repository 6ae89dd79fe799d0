"""The instruction router: Perceiver against a hand-written attention, councils, noise only in training."""

from __future__ import annotations

import torch

from instructmole import Adapter, InstructMoLE
from instructmole.routing import PerceiverResampler, route_instances
from instructmole.runtime import MoLERuntime
from instructmole.tiny import tiny_mole_config


def manual_perceiver(m: PerceiverResampler, text: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    x = m.proj_in(text)
    lat = m.latents.expand(x.shape[0], -1, -1)
    for attn, ff in m.layers:
        t, q_in = attn.norm1(x), attn.norm2(lat)
        q = attn.to_q(q_in)
        k, v = attn.to_kv(torch.cat([t, q_in], 1)).chunk(2, -1)
        q, k, v = (z.reshape(z.shape[0], z.shape[1], attn.heads, -1).transpose(1, 2) for z in (q, k, v))
        w = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
        out = (w @ v).transpose(1, 2).reshape(x.shape[0], 1, -1)
        lat = lat + attn.to_out(out)
        lat = lat + ff(lat)
    return m.norm_out(m.proj_out(lat))[:, 0] + pooled


def test_perceiver_matches_hand_written_attention():
    torch.manual_seed(0)
    m = PerceiverResampler(text_dim=24, dim=16, depth=2, heads=2, head_dim=8, ff_mult=4, dropout=0.1).eval()
    text, pooled = torch.randn(3, 10, 24), torch.randn(3, 16)
    torch.testing.assert_close(m(text, pooled), manual_perceiver(m, text, pooled), atol=1e-5, rtol=1e-5)


def test_route_instances_top_k_unnormalised():
    signal = torch.randn(2, 8)
    gates = torch.randn(3, 5, 8)
    probs, _, weights = route_instances(signal, gates, 2)
    want = torch.einsum("bd,lnd->bln", signal, gates).softmax(-1)
    torch.testing.assert_close(probs, want)
    torch.testing.assert_close(weights, want.topk(2, -1).values)  # not renormalised
    assert weights.sum(-1).max() < 1


def _route(model: InstructMoLE, text: torch.Tensor, pooled: torch.Tensor, *, training: bool) -> torch.Tensor:
    """The runtime's routing (the one function every host calls): its probabilities."""
    return MoLERuntime(model, training=training).route(text, pooled)[0]


def test_noise_and_dropout_only_in_training():
    torch.manual_seed(0)
    model = InstructMoLE(tiny_mole_config())
    text, pooled = torch.randn(4, 32, 64), torch.randn(4, 32)
    model.eval()
    a, b = _route(model, text, pooled, training=True), _route(model, text, pooled, training=True)
    assert torch.equal(a, b)  # the live module in eval mode: no noise, no dropout
    torch.testing.assert_close(_route(model, text, pooled, training=False), a, rtol=0, atol=1e-6)  # cached copy
    model.train()
    assert model.gate_noise_std == 1 / model.config.num_experts
    c = _route(model, text, pooled, training=True)
    assert not torch.equal(a, c)
    assert torch.equal(_route(model, text, pooled, training=False), _route(model, text, pooled, training=False))


def test_training_routing_carries_gradients_and_inference_none():
    model = InstructMoLE(tiny_mole_config()).eval()
    text, pooled = torch.randn(2, 32, 64), torch.randn(2, 32)
    weights = MoLERuntime(model, training=True).route(text, pooled)[2]  # the council weights: top-k probabilities
    weights.sum().backward()
    gate = next(iter(model.experts.values())).gate.weight
    assert model.router.proj_in.weight.grad.abs().sum() > 0 and gate.grad.abs().sum() > 0
    assert not MoLERuntime(model).route(text, pooled)[2].requires_grad


def test_council_rows_follow_instructions():
    torch.manual_seed(0)
    model = InstructMoLE(tiny_mole_config()).eval()
    text, pooled = torch.randn(2, 32, 64), torch.randn(2, 32)
    both = Adapter(model).route(text, pooled)
    for b in range(2):
        alone = Adapter(model).route(text[b : b + 1], pooled[b : b + 1])
        torch.testing.assert_close(both.probs[b], alone.probs[0])
    assert both.weights.shape == (2, 4, 4) and int((both.weights[0] != 0).sum(-1).max()) == 2
