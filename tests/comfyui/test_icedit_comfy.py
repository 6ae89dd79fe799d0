"""ICEdit's MoE-LoRA in ComfyUI: the file in models/loras, our Load node, a Fill-shaped Flux.

The ComfyUI twin is FLUX.1 Fill shaped: ComfyUI counts 96 input channels before its 2x2 patchify
(16 noisy latent + 16 masked image + 64 mask = 384 per token, as the diffusers model reads), and
the conditioning image arrives as ``c_concat``, which ``BaseModel._apply_model`` concatenates to
the latent, as ComfyUI's inpaint conditioning does.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import pytest
import torch

from tests.test_icedit import icedit_state_dict, moe_modules

from .comfy_tiny import comfy_flux_from_diffusers, pack_latents, run_comfy, unpack_latents

FILE = "icedit_moe_lora.safetensors"


def fill_twin(transformer: Any) -> Any:
    """A CPU ComfyUI FLUX.1 Fill (``FluxInpaint``) in a ModelPatcher with the diffusers twin's weights."""
    return comfy_flux_from_diffusers(transformer, model_config="FluxInpaint")


def fill_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(2, 16, 8, 6, generator=g),
        "concat": torch.randn(2, 80, 8, 6, generator=g),  # masked image latent + 8x8-folded mask
        "sigma": torch.tensor([0.83, 0.31]),
        "t5": torch.randn(2, 12, 64, generator=g),
        "pooled": torch.randn(2, 32, generator=g),
        "guidance": torch.tensor([50.0, 30.0]),
    }


def comfy_out(patcher: Any, x: dict) -> torch.Tensor:
    return run_comfy(
        patcher, x["latents"], x["sigma"], x["t5"], x["pooled"], x["guidance"], extra={"c_concat": x["concat"]}
    )


@torch.no_grad()
def diffusers_out(transformer: Any, x: dict) -> torch.Tensor:
    """The diffusers Fill forward as ComfyUI's denoised prediction (see comfy_tiny.run_diffusers)."""
    latents = x["latents"]
    b, _, h, w = latents.shape
    n = (h // 2) * (w // 2)
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    ids = torch.stack([torch.zeros(n), rows.flatten().float(), cols.flatten().float()], -1)
    v = transformer(
        hidden_states=pack_latents(torch.cat([latents, x["concat"]], 1)),
        encoder_hidden_states=x["t5"],
        pooled_projections=x["pooled"],
        timestep=x["sigma"],
        img_ids=ids,
        txt_ids=torch.zeros(x["t5"].shape[1], 3),
        guidance=x["guidance"],
        return_dict=False,
    )[0]
    return latents - x["sigma"].reshape(b, 1, 1, 1) * unpack_latents(v, h, w)


@pytest.fixture(scope="module")
def icedit(instructmole_pack: Any) -> dict[str, Any]:
    import folder_paths
    from safetensors.torch import save_file

    from instructmole.tiny import tiny_flux

    transformer = tiny_flux(0, in_channels=384, out_channels=64)
    sd = icedit_state_dict(transformer)
    folder = folder_paths.get_folder_paths("loras")[0]
    os.makedirs(folder, exist_ok=True)
    save_file(sd, os.path.join(folder, FILE), metadata={"format": "pt"})
    return {"nodes": instructmole_pack.nodes, "transformer": transformer, "sd": sd, "base": fill_twin(transformer)}


def test_fill_twin_matches_diffusers(icedit):
    x = fill_inputs()
    torch.testing.assert_close(comfy_out(icedit["base"], x), diffusers_out(icedit["transformer"], x), atol=1e-4, rtol=0)


def test_icedit_file_through_the_load_node_equals_the_diffusers_path(icedit):
    import instructmole as im

    nodes = icedit["nodes"]
    assert FILE in nodes.common.adapter_files()
    model, adapter = nodes.loaders.LoadAdapter.execute(icedit["base"], FILE, 1.0, 1.0).result
    assert adapter.config.base_model == "flux.1-fill-dev"
    assert adapter.config.layer_names == moe_modules(icedit["transformer"])
    x = fill_inputs()
    got = comfy_out(model, x)
    core = im.load_adapter(os.path.join(os.path.dirname(nodes.common.adapter_path(FILE)), FILE))
    with im.attach(icedit["transformer"], core):
        want = diffusers_out(icedit["transformer"], x)
    base = comfy_out(icedit["base"], x)
    assert (want - base).abs().max() > 1e-3  # the adapter really changes the output
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # Experts only (plain part off) still match: the routed experts themselves run in ComfyUI.
    experts_only = nodes.loaders.LoadAdapter.execute(icedit["base"], FILE, 0.0, 1.0).result[0]
    with im.attach(icedit["transformer"], core, lora_strength=0.0):
        want_experts = diffusers_out(icedit["transformer"], x)
    torch.testing.assert_close(comfy_out(experts_only, x), want_experts, atol=1e-4, rtol=0)
    torch.testing.assert_close(comfy_out(icedit["base"], x), base)  # the base MODEL is untouched


def test_plain_part_goes_through_comfyui_lora_loader_with_no_key_left(icedit, caplog):
    import comfy.lora

    plain = {k: v for k, v in icedit["sd"].items() if ".expert_" not in k and "lora_route" not in k}
    assert plain
    key_map = comfy.lora.model_lora_keys_unet(icedit["base"].model, {})
    with caplog.at_level(logging.WARNING):
        loaded = comfy.lora.load_lora(plain, key_map)
    assert "not loaded" not in caplog.text
    used = set().union(*(getattr(v, "loaded_keys", set()) for v in loaded.values()))
    assert used == set(plain)


def test_icedit_on_a_kontext_model_is_refused(icedit, setup):
    nodes = icedit["nodes"]
    with pytest.raises(nodes.common.NodeInputError, match=r"input 'model'.*FLUX\.1 Fill \[dev\] \(384\)"):
        nodes.loaders.LoadAdapter.execute(setup["base"], FILE, 1.0, 1.0)
