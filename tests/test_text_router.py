"""The text router (``router_pool="text"``): the instruction's tokens alone decide the council.

FLUX.2 and Qwen-Image have no pooled vector; their router pools the masked-in text itself and
attends only to it. The claims tested: what the mask leaves out (template, padding) never changes a
council, however long or whatever it holds; an empty mask still routes; the masked Perceiver is the
Perceiver of the kept tokens; the config counts, stores and defaults the setting right.
"""

from __future__ import annotations

import json

import pytest
import torch

import instructmole as im
from instructmole.config import MoLEConfig
from instructmole.model import make_router
from instructmole.tiny import tiny_flux, tiny_mole_config
from instructmole.tiny_families import TINY_FLUX2, tiny_family_config, tiny_flux2, tiny_qwen_image
from tests.test_families import family_adapter, instruction, run, setup

TEXT = TINY_FLUX2["joint_attention_dim"]


@pytest.fixture(scope="module")
def adapter() -> im.Adapter:
    return family_adapter(tiny_flux2())


def same_council(a: im.Council, b: im.Council) -> None:
    assert torch.equal(a.weights, b.weights) and torch.equal(a.probs, b.probs)


def test_masked_out_tokens_never_change_the_council(adapter):
    text, _, mask = instruction(batch=3, length=16, text_dim=TEXT)
    want = adapter.route(text, None, mask=mask)
    g = torch.Generator().manual_seed(3)
    for scale in (1.0, 1e3):  # other values, and huge ones like an LLM's outlier activations
        other = torch.where(mask[..., None], text, torch.randn(text.shape, generator=g) * scale)
        assert not torch.equal(other, text)
        same_council(adapter.route(other, None, mask=mask), want)
    # Without the mask those tokens do count: the test would notice a router that ignored them anyway.
    assert not torch.equal(adapter.route(other, None).probs, adapter.route(text, None).probs)


@pytest.mark.parametrize("extra", [1, 7, 40])
def test_padding_length_does_not_change_the_council(adapter, extra):
    text, _, mask = instruction(batch=3, length=16, text_dim=TEXT)
    want = adapter.route(text, None, mask=mask)
    g = torch.Generator().manual_seed(extra)
    longer = torch.cat([text, torch.randn(3, extra, TEXT, generator=g)], 1)
    longer_mask = torch.cat([mask, torch.zeros(3, extra, dtype=torch.bool)], 1)
    got = adapter.route(longer, None, mask=longer_mask)
    assert torch.equal(got.weights > 0, want.weights > 0)
    torch.testing.assert_close(got.probs, want.probs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["qwen_image", "flux2"])
def test_a_row_with_an_empty_mask_routes_to_finite_councils(family):
    transformer, adapter, inputs, text, mask = setup(family)
    mask[1] = False
    council = adapter.route(text, None, mask=mask)
    assert torch.isfinite(council.probs).all() and torch.isfinite(council.weights).all()
    assert ((council.weights > 0).sum(-1) == adapter.config.top_k).all()
    with im.attach(transformer, adapter) as handle:
        handle.set_signal(text, mask=mask)
        assert torch.isfinite(run(transformer, inputs)).all()
        assert torch.equal(handle.last_council.weights, council.weights)
    # Row 1 routes from the text adapter's bias and the latent alone, whatever its tokens hold.
    same_council(adapter.route(torch.randn_like(text), None, mask=mask).row(1), council.row(1))


def test_masked_perceiver_equals_the_perceiver_of_the_kept_tokens(adapter):
    """The claim itself: masking is the same as removing the tokens (pooled mean and attention)."""
    router = adapter.model.router.eval()
    text, _, mask = instruction(batch=3, length=16, text_dim=TEXT)
    mask[0, 8] = False  # a gap inside the instruction, too
    with torch.no_grad():
        masked = router(text, None, mask=mask)
        for b in range(3):
            kept = text[b : b + 1, mask[b]]
            torch.testing.assert_close(masked[b : b + 1], router(kept, None), atol=1e-6, rtol=0)
            torch.testing.assert_close(
                router.text_pooled(text[b : b + 1], mask[b : b + 1]),
                router.pool_proj(router.pool_norm(kept).mean(1)),
                atol=1e-6,
                rtol=0,
            )


@pytest.mark.parametrize("build", [tiny_flux2, tiny_qwen_image])
def test_parameter_count_of_a_text_router(build):
    config = tiny_family_config(build())
    assert config.router_pool == "text"
    model = im.InstructMoLE(config)
    assert config.parameter_count() == sum(p.numel() for p in model.parameters())
    clip = tiny_mole_config(tiny_flux())
    assert clip.parameter_count() == sum(p.numel() for p in im.InstructMoLE(clip).parameters())
    # The text pool adds a LayerNorm over the text width and its projection to the router width.
    d, t = config.router_dim, config.text_dim
    same_router = tiny_family_config(build(), router_pool="clip")
    assert config.parameter_count() - same_router.parameter_count() == 2 * t + t * d + d
    assert {n for n, _ in make_router(config).named_parameters()} - {
        n for n, _ in make_router(same_router).named_parameters()
    } == {"pool_norm.weight", "pool_norm.bias", "pool_proj.weight", "pool_proj.bias"}


def test_config_json_round_trip_keeps_router_pool(tmp_path, adapter):
    config = adapter.config
    assert json.loads(config.to_json())["router_pool"] == "text"
    assert MoLEConfig.from_json(config.to_json()) == config
    # Through an adapter file too: the loaded router pools the text and routes the same.
    path = adapter.save(tmp_path / "klein.safetensors")
    loaded = im.load_adapter(path)
    assert loaded.config.router_pool == "text"
    text, _, mask = instruction(batch=2, text_dim=TEXT)
    same_council(loaded.route(text, None, mask=mask), adapter.route(text, None, mask=mask))


def test_an_old_config_without_the_key_loads_as_clip():
    data = tiny_mole_config(tiny_flux()).to_dict()
    del data["router_pool"]
    old = MoLEConfig.from_dict(data)
    assert old.router_pool == "clip"
    assert MoLEConfig.from_json(json.dumps(data)).router_pool == "clip"
    with pytest.raises(im.ConfigError, match="router_pool"):
        MoLEConfig.from_dict({**data, "router_pool": "t5"})


def test_a_text_router_refuses_a_pooled_vector_and_an_additive_mask(adapter):
    """A CLIP vector handed to a text router, or a 0/-inf attention mask (which would read inverted),
    is one sentence, in the runtime (every host) and in ``Adapter.route``."""
    from instructmole.runtime import MoLERuntime, RoutingError

    text = torch.randn(1, 6, adapter.config.text_dim)
    runtime = MoLERuntime(adapter.model, adapter_id=adapter.adapter_id)
    with pytest.raises(RoutingError, match="routes from the text alone, but a pooled vector was given"):
        runtime.begin(text, torch.randn(1, adapter.config.router_dim), rows=1)
    additive = torch.zeros(1, 6)
    additive[0, 4:] = float("-inf")
    with pytest.raises(RoutingError, match="a bool \\(or 0/1 integer\\) mask"):
        runtime.begin(text, None, rows=1, mask=additive)
    with pytest.raises(im.AdapterError, match=r"mask is torch\.float32"):
        adapter.route(text, None, mask=additive)
    integer = torch.ones(1, 6, dtype=torch.long)
    integer[0, 4:] = 0
    same_council(adapter.route(text, None, mask=integer), adapter.route(text, None, mask=integer.bool()))
