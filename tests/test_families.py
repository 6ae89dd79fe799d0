"""The families beyond FLUX.1 through ``attach``: detection, refusals, and every path's exactness.

Tiny random Qwen-Image-Edit-2511 and FLUX.2 [klein] transformers (``tiny_families``) get the
forward kwargs their edit pipelines give with one reference image; the adapters route from the
text alone (``router_pool="text"``) with an instruction mask that leaves out the chat template and
the padding, as ``handle.set_signal`` passes it.
"""

from __future__ import annotations

import re

import pytest
import torch

import instructmole as im
from instructmole.families import FAMILIES, architecture_of, block_counts, family_of, reference_layers
from instructmole.tiny import tiny_flux
from instructmole.tiny_families import (
    TINY_FLUX2,
    TINY_QWEN_IMAGE,
    flux2_edit_inputs,
    qwen_edit_inputs,
    tiny_family_config,
    tiny_flux2,
    tiny_qwen_image,
)
from tests.helpers import random_adapter, randomize

ATOL = 1e-5  # fp32: the merged weights round once more than W x + term (measured below 1e-6)


# ---- shared helpers (test_text_router imports them) ------------------------------------------------


def family_adapter(transformer, seed: int = 1, **overrides) -> im.Adapter:
    """A random adapter of the transformer's family with non-zero experts and decisive gates."""
    torch.manual_seed(seed)
    return randomize(im.Adapter(im.InstructMoLE(tiny_family_config(transformer, **overrides), init="lora")), seed=seed)


def instruction(batch: int = 2, length: int = 12, seed: int = 0, text_dim: int = 48):
    """Pipeline-like text features with, per row, a padding mask and an instruction mask.

    Row r has ``length - 3 r`` real tokens: 3 template tokens first (the image placeholder), then the
    instruction, then 2 template tokens (the assistant turn), then padding. ``pad`` marks the real
    tokens (what the pipeline's mask marks), ``mask`` only the instruction's.
    """
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, length, text_dim, generator=g)
    pad = torch.zeros(batch, length, dtype=torch.bool)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for r in range(batch):
        real = length - 3 * r
        pad[r, :real] = True
        mask[r, 3 : real - 2] = True
    return text, pad, mask


def setup(family: str, batch: int = 2, seed: int = 0):
    """(transformer, adapter, forward kwargs, instruction text, instruction mask) of one family."""
    if family == "qwen_image":
        transformer = tiny_qwen_image()
        text, pad, mask = instruction(batch, seed=seed, text_dim=TINY_QWEN_IMAGE["joint_attention_dim"])
        inputs = qwen_edit_inputs(text, pad, seed=seed)
    else:
        transformer = tiny_flux2()
        text, _, mask = instruction(batch, seed=seed, text_dim=TINY_FLUX2["joint_attention_dim"])
        inputs = flux2_edit_inputs(text, seed=seed)
    return transformer, family_adapter(transformer), inputs, text, mask


def row_of(inputs: dict, b: int) -> dict:
    """The forward kwargs of row ``b`` alone (ids and shapes are per row too)."""
    out = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) or key == "img_shapes":
            out[key] = value[b : b + 1]
        else:
            out[key] = value
    return out


def run(transformer, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**inputs)[0]


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_untouched(transformer, before) -> None:
    after = transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not transformer._forward_hooks and not transformer._forward_pre_hooks
    assert all(not m._forward_hooks for m in transformer.modules())
    assert getattr(transformer, "_instructmole_attached", None) is None


def one_sentence(message: str) -> bool:
    """No second sentence: no full stop followed by more words (``FLUX.1`` and ``t = 0`` are fine)."""
    return re.search(r"[.;!?]\s+[A-Z]", message) is None and "\n" not in message


FAMILY_KEYS = ["qwen_image", "flux2"]


# ---- detection ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "arch", "blocks", "layers"),
    [
        (tiny_flux, "flux1", (2, 2), ["transformer_blocks.0.ff.net.2", "single_transformer_blocks.1.proj_out"]),
        (tiny_qwen_image, "qwen_image", (2, 0), ["transformer_blocks.0.img_mlp.net.2"]),
        (
            tiny_flux2,
            "flux2",
            (2, 2),
            ["transformer_blocks.1.ff.linear_out", "single_transformer_blocks.0.attn.to_out"],
        ),
    ],
)
def test_detection_of_the_tiny_families(build, arch, blocks, layers):
    model = build()
    assert architecture_of(model).key == arch
    assert block_counts(model) == blocks
    names = reference_layers(model)
    assert set(layers) <= set(names)
    assert len(names) == blocks[0] + blocks[1]
    assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in names)
    assert family_of(model) == []  # resized test widths match no released model


def test_family_of_real_widths_on_the_meta_device():
    from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel, QwenImageTransformer2DModel

    with torch.device("meta"):
        qwen_2511 = QwenImageTransformer2DModel(
            num_layers=2, joint_attention_dim=3584, num_attention_heads=24, attention_head_dim=128, zero_cond_t=True
        )
        qwen_2509 = QwenImageTransformer2DModel(num_layers=2, zero_cond_t=False)
        klein_4b = Flux2Transformer2DModel(
            num_layers=5,
            num_single_layers=20,
            num_attention_heads=24,
            attention_head_dim=128,
            joint_attention_dim=7680,
            guidance_embeds=False,
        )
        klein_9b = Flux2Transformer2DModel(
            num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288, guidance_embeds=False
        )
        flux2_dev = Flux2Transformer2DModel(num_layers=1, num_single_layers=1)
        kontext = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
    assert next(qwen_2511.parameters()).is_meta
    assert [f.key for f in family_of(qwen_2511)] == ["qwen-image-edit-2511"]
    assert [f.key for f in family_of(qwen_2509)] == ["qwen-image-edit-2509"]
    assert [f.key for f in family_of(klein_4b)] == ["flux.2-klein-4b"]
    assert block_counts(klein_4b) == FAMILIES["flux.2-klein-4b"].blocks
    assert [f.key for f in family_of(klein_9b)] == ["flux.2-klein-9b"]
    assert [f.key for f in family_of(flux2_dev)] == ["flux.2-dev"]
    assert {f.key for f in family_of(kontext)} == {"flux.1-kontext-dev", "flux.1-dev"}  # only the adapter tells


# ---- refusals at attach ---------------------------------------------------------------------------


def refused(transformer, adapter, message: str, **kwargs) -> str:
    before = snapshot(transformer)
    with pytest.raises(im.AttachError, match=message) as err:
        im.attach(transformer, adapter, **kwargs)
    assert one_sentence(str(err.value)), str(err.value)
    assert_untouched(transformer, before)
    return str(err.value)


def test_kontext_adapter_refused_on_qwen_and_flux2():
    kontext = random_adapter(tiny_flux())
    refused(tiny_qwen_image(), kontext, re.escape("this is a Qwen-Image model, but the adapter was made for FLUX.1"))
    refused(tiny_flux2(), kontext, re.escape("this is a FLUX.2 model, but the adapter was made for FLUX.1 Kontext"))


def test_flux2_adapter_refused_on_flux1():
    klein = family_adapter(tiny_flux2())
    refused(tiny_flux(), klein, re.escape("this is a FLUX.1 model, but the adapter was made for FLUX.2 [klein] 4B"))


def test_2511_adapter_refused_on_a_qwen_without_zero_cond_t():
    adapter = family_adapter(tiny_qwen_image())
    message = refused(tiny_qwen_image(zero_cond_t=False), adapter, "does not modulate its reference images")
    assert "Qwen-Image-Edit-2509" in message and "load Qwen-Image-Edit-2511" in message
    # A 2509 adapter on the 2511 model (zero_cond_t on) is the mirror refusal.
    old = family_adapter(tiny_qwen_image(), base_model="qwen-image-edit-2509")
    assert "load Qwen-Image-Edit-2509" in refused(tiny_qwen_image(), old, "modulates its reference images")


def test_text_width_mismatch_refused_on_flux2():
    adapter = family_adapter(tiny_flux2())  # reads text width 96
    message = refused(tiny_flux2(joint_attention_dim=48), adapter, "text features of width 48")
    assert "router reads width 96" in message


def test_router_pool_inconsistent_with_the_family_refused():
    clip_on_flux2 = family_adapter(tiny_flux2(), router_pool="clip")
    refused(tiny_flux2(), clip_on_flux2, re.escape("adds a 'clip' pooled vector, but FLUX.2 models route from 'text'"))
    text_on_flux1 = random_adapter(tiny_flux(), router_pool="text")
    refused(tiny_flux(), text_on_flux1, re.escape("adds a 'text' pooled vector, but FLUX.1 models route from 'clip'"))


# ---- the signal -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILY_KEYS)
def test_auto_routing_reads_each_familys_own_signal(family):
    """Without set_signal: Qwen routes from its features and their padding mask, FLUX.2 from every token."""
    transformer, adapter, inputs, text, mask = setup(family)
    own_mask = inputs.get("encoder_hidden_states_mask")
    assert (own_mask is not None) == (family == "qwen_image")
    want = adapter.route(text, None, mask=own_mask)
    with im.attach(transformer, adapter) as handle:
        run(transformer, inputs)
        assert torch.equal(handle.last_council.weights, want.weights)
        handle.set_signal(text, mask=mask)  # the instruction alone routes otherwise
        run(transformer, inputs)
        instruction_only = adapter.route(text, None, mask=mask)
        assert torch.equal(handle.last_council.weights, instruction_only.weights)
        assert not torch.equal(instruction_only.probs, want.probs)
        handle.set_signal(None)
        run(transformer, inputs)
        assert torch.equal(handle.last_council.weights, want.weights)
        # A positional call reads the same arguments.
        args = [inputs["hidden_states"], inputs["encoder_hidden_states"]]
        if family == "qwen_image":
            args.append(inputs["encoder_hidden_states_mask"])
        rest = {k: v for k, v in inputs.items() if k not in ("hidden_states", "encoder_hidden_states")}
        rest.pop("encoder_hidden_states_mask", None)
        with torch.no_grad():
            transformer(*args, **rest)
        assert torch.equal(handle.last_council.weights, want.weights)


@pytest.mark.parametrize("family", FAMILY_KEYS)
def test_set_signal_mistakes_are_one_sentence(family):
    transformer, adapter, inputs, text, mask = setup(family)
    cases = [
        ((text[:1],), {"mask": mask[:1]}, "has 1 rows, but this forward's batch has 2 images"),
        ((text,), {"pooled": torch.randn(2, 32), "mask": mask}, "route from the text alone; pass pooled=None"),
        ((text,), {"mask": mask[:, :5]}, re.escape("mask must be a tensor [rows, tokens] = (2, 12)")),
        ((text,), {"mask": mask.float()}, "mask must be bool or 0/1 integers"),
        ((text[..., :8],), {}, re.escape(f"router reads [rows, tokens, {text.shape[-1]}]")),
        ((text.long(),), {}, "text must be a float tensor"),
        ((None,), {"mask": mask}, re.escape("set_signal(None) clears the signal")),
    ]
    with im.attach(transformer, adapter) as handle:
        for args, kwargs, message in cases:
            with pytest.raises(im.AttachError, match=message) as err:
                handle.set_signal(*args, **kwargs)
                run(transformer, inputs)  # the rows are checked against the forward's batch
            assert one_sentence(str(err.value)), str(err.value)
            handle.set_signal(None)
        del inputs["encoder_hidden_states"]
        with pytest.raises(im.AttachError, match=r"needs encoder_hidden_states in the forward call.*set_signal"):
            run(transformer, inputs)
    council = adapter.route(text, None, mask=mask).row(0)
    with (
        im.attach(transformer, adapter, mode="merged", council=council) as handle,
        pytest.raises(im.AttachError, match="a merged handle does not route"),
    ):
        handle.set_signal(text, mask=mask)


# ---- exactness per family -------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILY_KEYS)
def test_fixed_council_equals_auto_routing_with_the_same_signal(family):
    transformer, adapter, inputs, text, mask = setup(family)
    council = adapter.route(text, None, mask=mask)
    assert not torch.equal(council.weights[0], council.weights[1])  # the rows really differ
    with im.attach(transformer, adapter, council=council):
        fixed = run(transformer, inputs)
    with im.attach(transformer, adapter) as handle:
        handle.set_signal(text, mask=mask)
        auto = run(transformer, inputs)
        assert torch.equal(handle.last_council.weights, council.weights)
    assert torch.equal(fixed, auto)  # the same council through the same term: bit for bit


@pytest.mark.parametrize("family", FAMILY_KEYS)
def test_merged_equals_fixed(family):
    transformer, adapter, inputs, text, mask = setup(family)
    council = adapter.route(text, None, mask=mask).row(1)
    with im.attach(transformer, adapter, council=council):
        fixed = run(transformer, inputs)
    with im.attach(transformer, adapter, mode="merged", council=council):
        merged = run(transformer, inputs)
    torch.testing.assert_close(merged, fixed, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("family", FAMILY_KEYS)
def test_strength_zero_is_the_base_and_one_is_not(family):
    transformer, adapter, inputs, text, mask = setup(family)
    base = run(transformer, inputs)
    with im.attach(transformer, adapter, expert_strength=0.0) as handle:
        handle.set_signal(text, mask=mask)
        assert torch.equal(run(transformer, inputs), base)
    with im.attach(transformer, adapter) as handle:
        handle.set_signal(text, mask=mask)
        changed = (run(transformer, inputs) - base).abs().amax(dim=(1, 2))
    assert (changed > 1e-3).all()  # every row


@pytest.mark.parametrize("family", FAMILY_KEYS)
def test_mixed_batch_routes_each_row_like_its_single_row_run(family):
    transformer, adapter, inputs, text, mask = setup(family)
    with im.attach(transformer, adapter) as handle:
        handle.set_signal(text, mask=mask)
        together = run(transformer, inputs)
        councils = handle.last_council
        members = councils.weights > 0
        assert not torch.equal(members[0], members[1])  # two instructions, two councils
        for b in range(2):
            handle.set_signal(text[b : b + 1], mask=mask[b : b + 1])
            alone = run(transformer, row_of(inputs, b))
            assert torch.equal(handle.last_council.weights[0] > 0, members[b])
            torch.testing.assert_close(handle.last_council.weights[0], councils.weights[b], atol=1e-6, rtol=0)
            torch.testing.assert_close(together[b : b + 1], alone, atol=ATOL, rtol=ATOL)


def add_lora(adapter: im.Adapter, transformer, module: str, rank: int = 3) -> im.Adapter:
    g = torch.Generator().manual_seed(5)
    linear = transformer.get_submodule(module)
    adapter.lora[f"transformer.{module}.lora_A.weight"] = torch.randn(rank, linear.in_features, generator=g) * 0.1
    adapter.lora[f"transformer.{module}.lora_B.weight"] = torch.randn(linear.out_features, rank, generator=g) * 0.1
    adapter.lora[f"transformer.{module}.alpha"] = torch.tensor(6.0)
    return adapter


@pytest.mark.parametrize("mode", ["dynamic", "merged"])
@pytest.mark.parametrize("family", FAMILY_KEYS)
def test_detach_restores_bit_for_bit(family, mode):
    transformer, adapter, inputs, text, mask = setup(family)
    add_lora(adapter, transformer, "transformer_blocks.0.attn.to_q")
    before = snapshot(transformer)
    base = run(transformer, inputs)
    council = adapter.route(text, None, mask=mask).row(0)
    handle = im.attach(transformer, adapter, mode=mode, council=council if mode == "merged" else None)
    if mode == "dynamic":
        handle.set_signal(text, mask=mask)
    assert not torch.equal(run(transformer, inputs), base)
    handle.detach()
    assert_untouched(transformer, before)
    assert torch.equal(run(transformer, inputs), base)


# ---- training through attach ----------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILY_KEYS)
def test_training_gives_gradients_to_pool_gates_and_experts(family):
    transformer, adapter, inputs, text, mask = setup(family)
    transformer.requires_grad_(False)
    mole = adapter.model.train()
    with im.attach(transformer, adapter, training=True) as handle:
        handle.set_signal(text, mask=mask)
        out = transformer(**inputs)[0]
        aux = handle.runtime.aux_losses()
        loss = out.square().mean() + 0.01 * aux.load_balance + 0.01 * aux.orthogonality
        loss.backward()
    pool = mole.router.pool_proj.weight.grad
    grads = {"pool_proj": pool, "pool_norm": mole.router.pool_norm.weight.grad}
    for name, layer in mole.named_layers():
        grads.update({f"{name}.gate": layer.gate.weight.grad, f"{name}.A": layer.A.grad, f"{name}.B": layer.B.grad})
    for name, grad in grads.items():
        assert grad is not None, name
        assert torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name
    assert all(p.grad is None for p in transformer.parameters())
