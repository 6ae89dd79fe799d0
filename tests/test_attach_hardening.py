"""attach/detach under bad input: clear errors at attach time, never a late failure, never a changed model."""

from __future__ import annotations

import math
import re

import pytest
import torch

import instructmole as im
from instructmole.runtime import RoutingError
from instructmole.tiny import tiny_flux
from tests.helpers import flux_inputs, random_adapter


@pytest.fixture(scope="module")
def transformer():
    return tiny_flux()


@pytest.fixture(scope="module")
def adapter(transformer):
    return random_adapter(transformer)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_untouched(transformer, before) -> None:
    """Same weights bit for bit, no hooks left, no attachment mark."""
    after = transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not transformer._forward_hooks and not transformer._forward_pre_hooks
    assert all(not m._forward_hooks for m in transformer.modules())
    assert getattr(transformer, "_instructmole_attached", None) is None


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 1e308, 10**400, 11.0, "1.0", None, True])
@pytest.mark.parametrize("which", ["expert_strength", "lora_strength"])
def test_strengths_are_checked(transformer, adapter, which, value):
    before = snapshot(transformer)
    with pytest.raises(im.AttachError, match=which) as err:
        im.attach(transformer, adapter, **{which: value})
    assert "from -10 to 10" in str(err.value)
    assert_untouched(transformer, before)


def test_wrong_argument_types(transformer, adapter):
    with pytest.raises(im.AttachError, match="transformer must be a torch module"):
        im.attach("flux", adapter)
    with pytest.raises(im.AttachError, match="adapter must be an InstructMoLE Adapter"):
        im.attach(transformer, adapter.model)
    with pytest.raises(im.AttachError, match="council must be a Council"):
        im.attach(transformer, adapter, council={"layers": []})


@pytest.mark.parametrize("first", ["dynamic", "merged"])
@pytest.mark.parametrize("second", ["dynamic", "merged"])
def test_second_attach_is_refused_and_detach_restores(transformer, adapter, first, second):
    """A re-run notebook cell must not double the experts, nor break the merged restore."""
    council = adapter.route(torch.randn(1, 32, 64), torch.randn(1, 32))
    inputs = flux_inputs(batch=1)
    before = snapshot(transformer)
    with torch.no_grad():
        base_out = transformer(**inputs)[0]
    handle = im.attach(transformer, adapter, mode=first, council=council if first == "merged" else None)
    with torch.no_grad():
        once = transformer(**inputs)[0]
    with pytest.raises(im.AttachError, match="already carries an attached InstructMoLE adapter"):
        im.attach(transformer, adapter, mode=second, council=council)
    with torch.no_grad():
        torch.testing.assert_close(transformer(**inputs)[0], once, atol=0, rtol=0)  # effect not doubled
    handle.detach()
    assert_untouched(transformer, before)
    with torch.no_grad():
        torch.testing.assert_close(transformer(**inputs)[0], base_out, atol=0, rtol=0)
    with im.attach(transformer, adapter, mode=second, council=council):  # free again after detach
        pass
    handle.detach()  # a second detach of an old handle changes nothing
    assert_untouched(transformer, before)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"in_channels": 384}, "384 image input channels \\(like FLUX.1 Fill \\[dev\\]\\)"),
        ({"in_channels": 128}, "128 image input channels"),
        ({"joint_attention_dim": 48}, "T5 text features of width 48"),
        ({"pooled_projection_dim": 16}, "CLIP pooled vectors of width 16"),
    ],
)
def test_other_family_or_text_widths_refused_at_attach(adapter, overrides, message):
    other = tiny_flux(**overrides)
    before = snapshot(other)
    with pytest.raises(im.AttachError, match=message):
        im.attach(other, adapter)
    assert_untouched(other, before)


def test_adapter_for_another_family_refused(transformer):
    fill = random_adapter(transformer, base_model="flux.1-fill-dev")
    with pytest.raises(im.AttachError, match=re.escape("made for FLUX.1 Fill [dev] (384)")):
        im.attach(transformer, fill)
    unknown = random_adapter(transformer, base_model="sdxl")
    with pytest.raises(im.AttachError, match="'sdxl', a base model this InstructMoLE does not know"):
        im.attach(transformer, unknown)


def test_lora_part_that_does_not_fit_its_layer(transformer, adapter):
    bad = im.Adapter(adapter.model, dict(adapter.lora))
    linear = transformer.get_submodule("transformer_blocks.0.attn.to_q")
    bad.lora["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"] = torch.randn(4, linear.in_features + 1)
    bad.lora["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"] = torch.randn(linear.out_features, 4)
    before = snapshot(transformer)
    for mode in ("dynamic", "merged"):
        council = adapter.route(torch.randn(1, 32, 64), torch.randn(1, 32))
        with pytest.raises(im.AttachError, match=re.escape("LoRA part for 'transformer_blocks.0.attn.to_q' is 33->32")):
            im.attach(transformer, bad, mode=mode, council=council)
        assert_untouched(transformer, before)


def test_signal_of_another_width_or_batch_fails_before_any_layer(transformer, adapter):
    inputs = flux_inputs(batch=2)
    with im.attach(transformer, adapter) as handle:
        with pytest.raises(RoutingError, match="router reads \\[rows, tokens, 64\\]"):
            handle.runtime.begin(torch.randn(2, 8, 48), torch.randn(2, 32), rows=2)
        with pytest.raises(RoutingError, match="2 text rows and 1 pooled rows"):
            handle.runtime.begin(torch.randn(2, 8, 64), torch.randn(1, 32), rows=2)
        with pytest.raises(im.AttachError, match="for a batch of 2 images"):
            transformer(
                **{
                    **inputs,
                    "encoder_hidden_states": inputs["encoder_hidden_states"][:1],
                    "pooled_projections": inputs["pooled_projections"][:1],
                }
            )


def test_negative_expert_strength_merged_equals_fixed(transformer, adapter):
    """Council weights are never negative, but a negative strength (inverting the experts) still folds."""
    council = adapter.route(torch.randn(1, 32, 64), torch.randn(1, 32))
    inputs = flux_inputs(batch=1)
    with torch.no_grad():
        base = transformer(**inputs)[0]
        with im.attach(transformer, adapter, council=council, expert_strength=-1.0):
            fixed = transformer(**inputs)[0]
        with im.attach(transformer, adapter, mode="merged", council=council, expert_strength=-1.0):
            merged = transformer(**inputs)[0]
    assert (fixed - base).abs().max() > 1e-3
    torch.testing.assert_close(merged, fixed, atol=1e-5, rtol=1e-5)
