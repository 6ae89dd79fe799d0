"""The patched ComfyUI model computes what the core's diffusers path computes, in every mode.

The tiny ComfyUI Flux and the tiny diffusers Flux share their weights (test_comfy_tiny.py), so
any difference here comes from the pack's patching: per-row routing, object-patched forwards,
merged weight patches, the plain-LoRA part through ComfyUI's LoRA code.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

import instructmole as im

from .comfy_tiny import comfy_flux_from_diffusers, run_comfy, run_diffusers

ATOL = 1e-4


def inputs(batch: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(batch, 16, 8, 6, generator=g),
        "sigma": torch.linspace(0.9, 0.3, batch),
        "t5": torch.randn(batch, 20, 64, generator=g),
        "pooled": torch.randn(batch, 32, generator=g),
        "guidance": torch.full((batch,), 2.5),
        "ref_latent": torch.randn(batch, 16, 6, 8, generator=g),
    }


def signal_kwargs(t5: torch.Tensor, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
    """The carried exact signal as it reaches the model after cond_cat (int32 bit-cast)."""
    return {
        "instructmole_t5": t5.contiguous().view(torch.int32),
        "instructmole_pooled": pooled.contiguous().view(torch.int32),
    }


def load(setup: dict[str, Any], name: str = "tiny.safetensors", lora: float = 1.0, experts: float = 1.0) -> tuple:
    out = setup["nodes"].loaders.LoadAdapter.execute(setup["base"], name, lora, experts)
    return out.result


def diffusers_out(setup, adapter, x, **attach_kwargs) -> torch.Tensor:
    with im.attach(setup["transformer"], adapter, **attach_kwargs):
        return run_diffusers(setup["transformer"], **x)


def test_auto_routes_every_row_from_its_own_conditioning(setup):
    model, _ = load(setup)
    x = inputs(4)  # e.g. [negative, negative', positive, positive'] rows of one CFG batch: all differ
    want = diffusers_out(setup, setup["adapter"], x)
    got = run_comfy(model, **x)  # no carried signal: routed from the model's own T5 features
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    runtime = model.get_attachment("instructmole")
    assert runtime.last_exact is False and runtime.last_council.batch_size == 4
    assert len({tuple(runtime.last_council.compact()[0][b].flatten().tolist()) for b in range(4)}) > 1
    assert (got - run_comfy(setup["base"], **x)).abs().max() > 1e-3  # the adapter really acts


def test_auto_uses_the_carried_exact_signal(setup):
    model, _ = load(setup)
    x = inputs(2, seed=4)
    exact_t5, exact_pooled = torch.randn(2, 512, 64), torch.randn(2, 32)  # T5 padded to the training length
    got = run_comfy(model, **x, extra=signal_kwargs(exact_t5, exact_pooled))
    council = setup["adapter"].route(exact_t5, exact_pooled)
    with im.attach(setup["transformer"], setup["adapter"]) as handle:
        handle.council = council  # the diffusers path with the very councils the exact signal gives
        want = run_diffusers(setup["transformer"], **x)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    runtime = model.get_attachment("instructmole")
    assert runtime.last_exact is True
    assert torch.equal(runtime.last_council.weights, council.weights)


@pytest.mark.parametrize("mode", ["fixed", "merged"])
def test_fixed_and_merged_apply_one_council_to_every_row(setup, mode):
    model, adapter = load(setup)
    x = inputs(2, seed=5)
    council = (
        setup["nodes"]
        .routing_nodes.Route.execute(adapter, conditioning=[[x["t5"][1:], {"pooled_output": x["pooled"][1:]}]])
        .result[0]
    )
    applied = setup["nodes"].council_nodes.ApplyCouncil.execute(model, council, mode).result[0]
    core_council = im.Council.from_dict(council.to_dict())
    want = diffusers_out(
        setup, setup["adapter"], x, council=core_council, mode="merged" if mode == "merged" else "dynamic"
    )
    torch.testing.assert_close(run_comfy(applied, **x), want, atol=ATOL, rtol=0)
    if mode == "merged":  # the instruction layers cost nothing per step: no forward of theirs is replaced
        assert applied.get_attachment("instructmole").dynamic_placements == []
        assert len([k for k in applied.patches if "img_mlp.2" in k or "linear2" in k]) == 4


def test_override_chain_and_mode_switches_replace_not_stack(setup):
    model, adapter = load(setup)
    x = inputs(2, seed=6)
    nodes = setup["nodes"]
    council = nodes.routing_nodes.Route.execute(
        adapter, conditioning=[[x["t5"][:1], {"pooled_output": x["pooled"][:1]}]]
    ).result[0]
    forced = nodes.council_nodes.OverrideCouncil.execute(council, "single force 3; double ban 0").result[0]
    merged = nodes.council_nodes.ApplyCouncil.execute(model, council, "merged").result[0]
    then_fixed = nodes.council_nodes.ApplyCouncil.execute(merged, forced, "fixed").result[0]
    direct = nodes.council_nodes.ApplyCouncil.execute(model, forced, "fixed").result[0]
    torch.testing.assert_close(run_comfy(then_fixed, **x), run_comfy(direct, **x), atol=ATOL, rtol=0)
    assert not any(getattr(p[1], "instructmole", False) for ps in then_fixed.patches.values() for p in ps)


def test_strengths_and_lora_part(setup):
    x = inputs(2, seed=7)
    model, _ = load(setup, lora=0.5, experts=2.0)
    want = diffusers_out(setup, setup["adapter"], x, lora_strength=0.5, expert_strength=2.0)
    torch.testing.assert_close(run_comfy(model, **x), want, atol=ATOL, rtol=0)
    off, _ = load(setup, lora=0.0, experts=0.0)
    torch.testing.assert_close(run_comfy(off, **x), run_comfy(setup["base"], **x), atol=ATOL, rtol=0)


def test_two_adapters_on_two_clones_never_share_state_and_base_is_restored(setup):
    x = inputs(2, seed=8)
    before = run_comfy(setup["base"], **x)
    first, _ = load(setup)
    second, _ = load(setup, "second.safetensors")
    solo_first = run_comfy(first, **x)
    solo_second = run_comfy(second, **x)
    assert (solo_first - solo_second).abs().max() > 1e-3
    torch.testing.assert_close(run_comfy(first, **x), solo_first, atol=0, rtol=0)
    torch.testing.assert_close(run_comfy(second, **x), solo_second, atol=0, rtol=0)
    torch.testing.assert_close(solo_second, diffusers_out(setup, setup["second"], x), atol=ATOL, rtol=0)
    assert first.get_attachment("instructmole") is not second.get_attachment("instructmole")
    # The base MODEL, loaded again after its patched clones, is bit for bit what it was.
    assert torch.equal(run_comfy(setup["base"], **x), before)


def test_lowvram_offloaded_model_gives_the_same_result(setup):
    import comfy.model_management

    model, _ = load(setup)
    x = inputs(2, seed=10)
    full = run_comfy(model, **x)
    comfy.model_management.unload_all_models()
    model.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1, load_weights=True)
    try:
        lin = model.get_model_object("diffusion_model.double_blocks.0.img_attn.qkv")
        assert getattr(lin, "comfy_cast_weights", False)  # really offloaded: weights cast per forward
        transformer_options = {"wrappers": dict(model.wrappers), "cond_or_uncond": [0], "sigmas": x["sigma"]}
        low = model.model.apply_model(
            x["latents"],
            x["sigma"],
            c_crossattn=x["t5"],
            y=x["pooled"],
            guidance=x["guidance"],
            ref_latents=[x["ref_latent"]],
            transformer_options=transformer_options,
        )
    finally:
        model.unpatch_model()
    torch.testing.assert_close(low, full, atol=ATOL, rtol=0)


def test_token_routed_layers_match_the_diffusers_path(setup):
    import folder_paths

    from tests.helpers import random_adapter

    adapter = random_adapter(setup["transformer"], seed=13, token_routed=("single_transformer_blocks.0.proj_out",))
    path = adapter.save(os.path.join(folder_paths.get_folder_paths("instructmole")[0], "token.safetensors"))
    model, _ = load(setup, "token.safetensors")
    x = inputs(2, seed=12)
    want = diffusers_out(setup, im.load_adapter(path), x)
    torch.testing.assert_close(run_comfy(model, **x), want, atol=ATOL, rtol=0)
    council = model.get_attachment("instructmole").last_council
    assert "single_transformer_blocks.0.proj_out" not in council.layers and len(council.layers) == 3


def test_fp8_weights_keep_working(setup):
    """A MODEL stored in fp8 (manual-cast Linears): the experts still act, as much as on fp32."""
    fp8 = comfy_flux_from_diffusers(setup["transformer"], weight_dtype=torch.float8_e4m3fn)
    lin = fp8.get_model_object("diffusion_model.single_blocks.0.linear2")
    assert lin.weight.dtype == torch.float8_e4m3fn
    x = inputs(2, seed=14)
    nodes = setup["nodes"]
    auto8, adapter = nodes.loaders.LoadAdapter.execute(fp8, "tiny.safetensors", 0.0, 1.0).result
    auto32, _ = load(setup, lora=0.0)
    effect8 = run_comfy(auto8, **x) - run_comfy(fp8, **x)
    effect32 = run_comfy(auto32, **x) - run_comfy(setup["base"], **x)
    assert torch.isfinite(effect8).all()
    assert (effect8 - effect32).norm() / effect32.norm() < 0.1
    council = nodes.routing_nodes.Route.execute(
        adapter, conditioning=[[x["t5"][:1], {"pooled_output": x["pooled"][:1]}]]
    )
    merged8 = nodes.council_nodes.ApplyCouncil.execute(auto8, council.result[0], "merged").result[0]
    fixed8 = nodes.council_nodes.ApplyCouncil.execute(auto8, council.result[0], "fixed").result[0]
    base8 = run_comfy(fp8, **x)
    merged_effect, fixed_effect = run_comfy(merged8, **x) - base8, run_comfy(fixed8, **x) - base8
    # Merging into fp8 weights rounds W0 + ΔW to fp8 (stochastically): the same effect, coarser.
    assert torch.nn.functional.cosine_similarity(merged_effect.flatten(), fixed_effect.flatten(), dim=0) > 0.9


def test_bf16_adapter_routes_alike_in_route_and_auto(setup):
    """The trainer exports bf16: the Route node and auto mode both run the router maths in fp32 on the
    same copy, so they give the same council bit for bit (before: up to 0.023 apart in probability)."""
    import folder_paths

    path = os.path.join(folder_paths.get_folder_paths("instructmole")[0], "bf16.safetensors")
    setup["adapter"].save(path, dtype=torch.bfloat16)
    nodes = setup["nodes"]
    model, adapter = nodes.loaders.LoadAdapter.execute(setup["base"], "bf16.safetensors", 1.0, 1.0).result
    assert adapter.model.layer(adapter.config.layer_names[0]).gate.weight.dtype == torch.bfloat16
    for seed in range(3):  # one row per forward: a batch's matmuls may round other than a single row's
        x = inputs(1, seed=15 + seed)
        exact_t5, exact_pooled = torch.randn(1, 512, 64), torch.randn(1, 32)
        run_comfy(model, **x, extra=signal_kwargs(exact_t5, exact_pooled))
        auto = model.get_attachment("instructmole").last_council
        cond = nodes.signal.attach_signal([[x["t5"], {"pooled_output": x["pooled"]}]], exact_t5, exact_pooled)
        routed = nodes.routing_nodes.Route.execute(adapter, conditioning=cond).result[0]
        assert torch.equal(routed.probs, auto.probs) and torch.equal(routed.weights, auto.weights)


def test_a_signal_of_another_text_length_is_not_called_exact(setup):
    """The adapter was trained on T5 padded to its ``text_length``: a signal encoded for another
    length is used (it is still closer than ComfyUI's own features) but labelled approximate."""
    model, _ = load(setup)
    x = inputs(1, seed=16)
    run_comfy(model, **x, extra=signal_kwargs(torch.randn(1, 40, 64), torch.randn(1, 32)))
    runtime = model.get_attachment("instructmole")
    assert runtime.adapter.config.text_length == 512 and runtime.last_exact is False
    run_comfy(model, **x, extra=signal_kwargs(torch.randn(1, 512, 64), torch.randn(1, 32)))
    assert runtime.last_exact is True


def test_a_failing_forward_leaves_no_term_installed(setup):
    """The wrapper's forwards live for one forward: an error inside the model (here a latent of the
    wrong width) still gives every module its own forward back, and the next run is the base's."""
    model, _ = load(setup)
    x = inputs(1, seed=17)
    bad = dict(x, latents=torch.randn(1, 15, 8, 6))
    with pytest.raises(RuntimeError):
        run_comfy(model, **bad)
    assert not [n for n, mod in model.model.named_modules() if "forward" in mod.__dict__]
    torch.testing.assert_close(run_comfy(model, **x), diffusers_out(setup, setup["adapter"], x), atol=ATOL, rtol=0)
