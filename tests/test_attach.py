"""diffusers integration: every path equals the plain formula on a tiny Kontext-shaped Flux."""

from __future__ import annotations

import copy

import pytest
import torch

import instructmole as im
from instructmole.experts import dense_delta, token_delta, token_route
from instructmole.tiny import tiny_flux
from tests.helpers import flux_inputs, random_adapter

ATOL = 1e-5


def run(transformer, inputs):
    with torch.no_grad():
        return transformer(**inputs)[0]


def with_reference_hooks(transformer, adapter, council, lora=True):
    """The reference formula, hand-wired: every expert materialised, weighted densely per row."""
    hooks = []
    scale = adapter.config.scale

    def add(module, fn):
        hooks.append(module.register_forward_hook(lambda _m, inp, out: out + fn(inp[0])))

    for row, name in enumerate(council.layers):
        layer = adapter.model.layer(name)
        add(
            transformer.get_submodule(name),
            lambda x, layer=layer, row=row: dense_delta(x, layer.A, layer.B, council.weights[:, row], scale),
        )
    if lora:
        for part in adapter.lora_parts():
            add(transformer.get_submodule(part.module), lambda x, p=part: (x @ p.down.t() @ p.up.t()) * p.scale)
    return hooks


def add_lora(adapter, transformer, modules=("attn.to_q", "ff.net.0.proj", "proj_mlp"), rank=3, alpha=6.0):
    g = torch.Generator().manual_seed(5)
    for name, mod in transformer.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.endswith(modules) and "blocks.0." in name:
            adapter.lora[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, mod.in_features, generator=g) * 0.1
            adapter.lora[f"transformer.{name}.lora_B.weight"] = torch.randn(mod.out_features, rank, generator=g) * 0.1
            adapter.lora[f"transformer.{name}.alpha"] = torch.tensor(alpha)
    assert adapter.lora_parts()
    return adapter


def test_dynamic_routes_each_row_and_equals_dense_formula(transformer, adapter):
    inputs = flux_inputs(batch=3)
    council = adapter.route(inputs["encoder_hidden_states"], inputs["pooled_projections"])
    assert not torch.equal(council.weights[0], council.weights[1])  # rows really differ
    hooks = with_reference_hooks(transformer, adapter, council)
    want = run(transformer, inputs)
    for h in hooks:
        h.remove()
    with im.attach(transformer, adapter) as handle:
        got = run(transformer, inputs)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)
    assert torch.equal(handle.last_council.weights, council.weights)


def test_mixed_batch_equals_separate_runs(transformer, adapter):
    inputs = flux_inputs(batch=3)
    with im.attach(transformer, adapter):
        together = run(transformer, inputs)
        for b in range(3):
            alone = {
                k: v[b : b + 1]
                if k in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")
                else v
                for k, v in inputs.items()
            }
            torch.testing.assert_close(together[b : b + 1], run(transformer, alone), atol=ATOL, rtol=ATOL)


def test_fixed_and_merged_equal_the_routed_row(transformer, adapter):
    inputs = flux_inputs(batch=2)
    council = adapter.route(inputs["encoder_hidden_states"], inputs["pooled_projections"])
    with im.attach(transformer, adapter):
        dynamic = run(transformer, inputs)
    row = council.row(1)
    with im.attach(transformer, adapter, council=row):
        fixed = run(transformer, inputs)
    with im.attach(transformer, adapter, mode="merged", council=row):
        merged = run(transformer, inputs)
    torch.testing.assert_close(fixed[1], dynamic[1], atol=ATOL, rtol=ATOL)
    assert not torch.allclose(fixed[0], dynamic[0], atol=1e-4)  # row 0 now uses row 1's council
    torch.testing.assert_close(merged, fixed, atol=ATOL, rtol=ATOL)


def test_lora_part_unmerged_and_merged_equal_formula(transformer, adapter):
    add_lora(adapter, transformer)
    inputs = flux_inputs(batch=2)
    council = adapter.route(inputs["encoder_hidden_states"], inputs["pooled_projections"]).row(0)
    hooks = with_reference_hooks(transformer, adapter, council.expand(2))
    want = run(transformer, inputs)
    for h in hooks:
        h.remove()
    with im.attach(transformer, adapter, council=council):
        fixed = run(transformer, inputs)
    with im.attach(transformer, adapter, mode="merged", council=council):
        merged = run(transformer, inputs)
    torch.testing.assert_close(fixed, want, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(merged, want, atol=ATOL, rtol=ATOL)


def test_strengths(transformer, adapter):
    add_lora(adapter, transformer)
    inputs = flux_inputs(batch=2)
    base = run(transformer, inputs)
    with im.attach(transformer, adapter, expert_strength=0.0, lora_strength=0.0):
        torch.testing.assert_close(run(transformer, inputs), base, atol=ATOL, rtol=ATOL)
    council = adapter.route(inputs["encoder_hidden_states"], inputs["pooled_projections"])
    with im.attach(transformer, adapter, council=im.scale(council, 2.0), lora_strength=0.0):
        doubled = run(transformer, inputs)
    with im.attach(transformer, adapter, expert_strength=2.0, lora_strength=0.0):
        torch.testing.assert_close(run(transformer, inputs), doubled, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("mode", ["dynamic", "merged"])
def test_detach_restores_bit_for_bit(transformer, adapter, mode):
    add_lora(adapter, transformer)
    inputs = flux_inputs(batch=2)
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    base = run(transformer, inputs)
    council = adapter.route(inputs["encoder_hidden_states"], inputs["pooled_projections"]).row(0)
    handle = im.attach(transformer, adapter, mode=mode, council=council if mode == "merged" else None)
    assert not torch.equal(run(transformer, inputs), base)
    handle.detach()
    assert all(torch.equal(before[k], v) for k, v in transformer.state_dict().items())
    assert torch.equal(run(transformer, inputs), base)
    assert not transformer._forward_hooks and not transformer._forward_pre_hooks


def test_two_transformers_never_share_routing(transformer, adapter):
    other_tf = copy.deepcopy(transformer)
    other = random_adapter(transformer, seed=7)
    a_in, b_in = flux_inputs(batch=2, seed=1), flux_inputs(batch=1, seed=2)
    with im.attach(transformer, adapter):
        solo_a = run(transformer, a_in)
    with im.attach(other_tf, other):
        solo_b = run(other_tf, b_in)
    with im.attach(transformer, adapter) as ha, im.attach(other_tf, other) as hb:
        # Interleave calls; each handle keeps its own councils.
        out_a1 = run(transformer, a_in)
        out_b = run(other_tf, b_in)
        out_a2 = run(transformer, a_in)
        assert ha.last_council.batch_size == 2 and hb.last_council.batch_size == 1
    torch.testing.assert_close(out_a1, solo_a, atol=0, rtol=0)
    torch.testing.assert_close(out_a2, solo_a, atol=0, rtol=0)
    torch.testing.assert_close(out_b, solo_b, atol=0, rtol=0)


def test_token_routed_layer(transformer):
    name = "single_transformer_blocks.1.proj_out"
    adapter = random_adapter(transformer, token_routed=(name,))
    assert adapter.config.layer(name).routing == "token" and name not in adapter.config.instruction_layers
    inputs = flux_inputs(batch=2)
    council = adapter.route(inputs["encoder_hidden_states"], inputs["pooled_projections"])
    hooks = with_reference_hooks(transformer, adapter, council)
    layer = adapter.model.layer(name)

    def token_hook(_m, inp, out):
        x = inp[0]
        _, idx, w = token_route(x, layer.gate.weight, adapter.config.top_k)
        expected = torch.zeros_like(out)
        for j in range(adapter.config.num_experts):  # the plain formula, expert by expert
            wj = (w * (idx == j)).sum(-1, keepdim=True)
            expected += wj * adapter.config.scale * (x @ layer.A[j] @ layer.B[j])
        torch.testing.assert_close(
            token_delta(x, layer.A, layer.B, idx, w, adapter.config.scale), expected, atol=ATOL, rtol=ATOL
        )
        return out + expected

    hooks.append(transformer.get_submodule(name).register_forward_hook(token_hook))
    want = run(transformer, inputs)
    for h in hooks:
        h.remove()
    with im.attach(transformer, adapter):
        torch.testing.assert_close(run(transformer, inputs), want, atol=ATOL, rtol=ATOL)


def test_attach_errors(transformer, adapter):
    bigger = random_adapter(tiny_flux(num_attention_heads=4))
    with pytest.raises(im.AttachError, match="expects 256->64"):
        im.attach(transformer, bigger)
    with pytest.raises(im.AttachError, match="merged mode folds one council"):
        im.attach(transformer, adapter, mode="merged")
    text, pooled = torch.randn(1, 32, 64), torch.randn(1, 32)
    with pytest.raises(im.CouncilMismatchError, match="routed by a different adapter file"):
        im.attach(transformer, adapter, council=bigger.route(text, pooled))
    two = adapter.route(torch.randn(2, 32, 64), torch.randn(2, 32))
    with im.attach(transformer, adapter, council=two), pytest.raises(im.AttachError, match="holds 2 instances"):
        run(transformer, flux_inputs(batch=3))
    six = random_adapter(transformer, num_experts=6)
    with pytest.raises(im.CouncilMismatchError, match="made for another adapter"):
        im.attach(transformer, adapter, council=six.route(text, pooled))
    assert not transformer._forward_hooks and not transformer._forward_pre_hooks
