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

from tests.test_icedit import N, icedit_state_dict, moe_modules

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


def _record_routed_inputs(diffusion: Any) -> tuple[dict, list]:
    """Forward pre-hooks on ComfyUI's routed Linears (double: img_mlp.2, single: linear2): their inputs."""
    seen: dict[tuple[str, int], torch.Tensor] = {}
    hooks = []
    for kind, blocks in (("double", diffusion.double_blocks), ("single", diffusion.single_blocks)):
        for i, block in enumerate(blocks):
            module = block.img_mlp[2] if kind == "double" else block.linear2
            hooks.append(module.register_forward_pre_hook(lambda m, a, key=(kind, i): seen.__setitem__(key, a[0])))
    return seen, hooks


@pytest.mark.parametrize("selector", ["single", "double", "all"])
def test_token_expert_map_colours_each_region_by_its_first_choice(icedit, selector):
    """Each 16x16 patch of the map has the colour of the expert most of the selected layers ranked
    first for that token, computed here from the layer inputs and the file's own route weights."""
    from instructmole.viz import EXPERT_COLOURS

    nodes = icedit["nodes"]
    model = nodes.loaders.LoadAdapter.execute(icedit["base"], FILE, 1.0, 1.0).result[0]
    seen, hooks = _record_routed_inputs(icedit["base"].model.diffusion_model)
    x = fill_inputs()
    try:
        comfy_out(model, x)
    finally:
        for hook in hooks:
            hook.remove()
    h, w = x["latents"].shape[-2] // 2, x["latents"].shape[-1] // 2
    text = x["t5"].shape[1]
    votes = []
    for (kind, i), inp in sorted(seen.items()):
        if selector != "all" and kind != selector:
            continue
        name = f"transformer_blocks.{i}.ff.net.2" if kind == "double" else f"single_transformer_blocks.{i}.proj_out"
        start = text if kind == "single" else 0
        route = icedit["sd"][f"transformer.{name}.lora_route.weight"]
        votes.append((inp[:, start : start + h * w] @ route.t()).argmax(-1))  # [rows, tokens]
    votes = torch.stack(votes)
    assert len(votes) == (4 if selector == "all" else 2)  # tiny Flux: 2 double + 2 single blocks
    maps = nodes.token_map.TokenExpertMap.execute(model, {"samples": x["latents"]}, selector, None, 0.55).result[0]
    assert maps.shape[0] == 2 and maps.shape[2] == w * 16
    distinct = set()
    for row in range(2):
        counts = torch.nn.functional.one_hot(votes[:, row], N).sum(0)
        top = counts.argmax(-1)
        share = counts.max(-1).values / len(votes)
        for t in range(h * w):
            r, c = divmod(t, w)
            pixel = (maps[row, 18 + 16 * r + 8, 16 * c + 8] * 255).round().tolist()
            shade = 0.35 + 0.65 * float(share[t])
            want = [round(v * shade) for v in EXPERT_COLOURS[int(top[t])]]
            assert pixel == pytest.approx(want, abs=1), (row, t)
            distinct.add(int(top[t]))
    assert len(distinct) > 1  # the regions really differ


def test_token_expert_map_refuses_what_it_cannot_draw(icedit, setup):
    nodes = icedit["nodes"]
    TokenExpertMap, NodeInputError = nodes.token_map.TokenExpertMap, nodes.common.NodeInputError
    model = nodes.loaders.LoadAdapter.execute(icedit["base"], FILE, 1.0, 1.0).result[0]
    x = fill_inputs()
    with pytest.raises(NodeInputError, match="input 'samples': this MODEL has not sampled yet"):
        TokenExpertMap.execute(model, {"samples": x["latents"]}, "single", None, 0.5)
    with pytest.raises(NodeInputError, match="input 'model': this MODEL carries no InstructMoLE adapter"):
        TokenExpertMap.execute(icedit["base"], {"samples": x["latents"]}, "single", None, 0.5)
    kontext = setup["nodes"].loaders.LoadAdapter.execute(setup["base"], "tiny.safetensors", 1.0, 1.0).result[0]
    with pytest.raises(NodeInputError, match="routes per image, not per token"):
        TokenExpertMap.execute(kontext, {"samples": x["latents"]}, "single", None, 0.5)
    comfy_out(model, x)
    with pytest.raises(NodeInputError, match=r"input 'samples': this latent is 64x64 pixels.*was 48x64"):
        TokenExpertMap.execute(model, {"samples": torch.zeros(1, 16, 8, 8)}, "single", None, 0.5)
    with pytest.raises(NodeInputError, match="input 'layers': selector 'single:9' picks no layer"):
        TokenExpertMap.execute(model, {"samples": x["latents"]}, "single:9", None, 0.5)
    assert "input 'layers'" in TokenExpertMap.validate_inputs(layers="singel")
    assert "input 'opacity'" in TokenExpertMap.validate_inputs(opacity=float("nan"))
    assert TokenExpertMap.validate_inputs(layers="double:0-1", opacity=0.3) is True
    # over the decoded image: same size as the image, the map blended in
    image = torch.rand(1, 64, 48, 3)
    out = TokenExpertMap.execute(model, {"samples": x["latents"]}, "all", image, 1.0).result[0]
    alone = TokenExpertMap.execute(model, {"samples": x["latents"]}, "all", None, 0.5).result[0]
    assert out.shape[1:3] == alone.shape[1:3] and torch.equal(out[:1], alone[:1])  # opacity 1: the map alone


def test_token_expert_map_draws_the_positive_rows_of_a_cfg_batch(icedit):
    """Under CFG ComfyUI batches [negative, positive] rows and says so in ``transformer_options``,
    which its Flux passes to the DIFFUSION_MODEL wrapper positionally: the map shows the positive row."""
    nodes = icedit["nodes"]
    model = nodes.loaders.LoadAdapter.execute(icedit["base"], FILE, 1.0, 1.0).result[0]
    x = fill_inputs()
    comfy_out(model, x)  # rows not marked: the map draws both
    both = nodes.token_map.TokenExpertMap.execute(model, {"samples": x["latents"]}, "all", None, 1.0).result[0]
    assert both.shape[0] == 2 and not torch.equal(both[0], both[1])
    cfg = model.clone()
    cfg.model_options.setdefault("transformer_options", {})["cond_or_uncond"] = [1, 0]  # row 1 is the positive
    comfy_out(cfg, x)
    assert cfg.get_attachment("instructmole").last_layout.cond_or_uncond == (1, 0)
    positive = nodes.token_map.TokenExpertMap.execute(cfg, {"samples": x["latents"]}, "all", None, 1.0).result[0]
    assert positive.shape[0] == 1 and torch.equal(positive[0], both[1])


def test_token_expert_map_keeps_the_positive_pass_when_the_negative_runs_last(icedit):
    """Under CFG with conds that cannot batch, the negative runs in a forward of its own, after the
    positive: the map still shows the positive pass."""
    nodes = icedit["nodes"]
    model = nodes.loaders.LoadAdapter.execute(icedit["base"], FILE, 1.0, 1.0).result[0]
    positive, negative = model.clone(), model.clone()
    positive.model_options.setdefault("transformer_options", {})["cond_or_uncond"] = [0]
    negative.model_options.setdefault("transformer_options", {})["cond_or_uncond"] = [1]
    x, x_negative = fill_inputs(1), fill_inputs(7)
    comfy_out(positive, x)
    want = nodes.token_map.TokenExpertMap.execute(positive, {"samples": x["latents"]}, "all", None, 1.0).result[0]
    comfy_out(negative, x_negative)
    runtime = negative.get_attachment("instructmole")
    assert runtime is positive.get_attachment("instructmole") and runtime.last_layout.cond_or_uncond == (1,)
    got = nodes.token_map.TokenExpertMap.execute(negative, {"samples": x["latents"]}, "all", None, 1.0).result[0]
    assert torch.equal(got, want)
    comfy_out(positive, x_negative)  # a positive pass of other inputs: now that one is shown
    assert not torch.equal(
        nodes.token_map.TokenExpertMap.execute(positive, {"samples": x["latents"]}, "all", None, 1.0).result[0], want
    )


def test_token_layout_keeps_the_positive_rows_and_the_target_image_tokens(instructmole_pack):
    TokenLayout = instructmole_pack.nodes.runtime.TokenLayout
    choices = torch.arange(4 * 20).reshape(4, 20)  # rows [uncond, uncond, cond, cond], 5 text + 12 image + 3 ref
    layout = TokenLayout(text_tokens=5, grid=(3, 4), cond_or_uncond=(1, 0))
    single = layout.image_tokens("single_transformer_blocks.0.proj_out", choices)
    assert torch.equal(single, choices[2:, 5:17])
    double = layout.image_tokens("transformer_blocks.0.ff.net.2", choices)
    assert torch.equal(double, choices[2:, :12])


def test_diptych_and_right_half(instructmole_pack):
    icedit_nodes = instructmole_pack.nodes.icedit_nodes
    NodeInputError = instructmole_pack.nodes.common.NodeInputError
    image = torch.rand(2, 40, 50, 3)
    diptych, mask = icedit_nodes.ICEditDiptych.execute(image, 64).result
    assert diptych.shape == (2, 48, 128, 3)  # 40 * 64/50 = 51.2 -> 48, a multiple of 16
    assert diptych[:, :, 64:].abs().sum() == 0  # ICEdit's right half is black (masked: Fill never sees it)
    assert mask.shape == (2, 48, 128) and mask[:, :, :64].sum() == 0 and bool((mask[:, :, 64:] == 1).all())
    # the scaled image is the source's content: its mean colour is kept
    torch.testing.assert_close(diptych[:, :, :64].mean((1, 2)), image.mean((1, 2)), atol=0.02, rtol=0)
    (right,) = icedit_nodes.ICEditRightHalf.execute(diptych).result
    assert torch.equal(right, diptych[:, :, 64:])
    assert "multiple of 16" in icedit_nodes.ICEditDiptych.validate_inputs(width=500)
    with pytest.raises(NodeInputError, match="input 'image'"):
        icedit_nodes.ICEditDiptych.execute("not an image", 64)
    with pytest.raises(NodeInputError, match="input 'width'"):
        icedit_nodes.ICEditDiptych.execute(image, 100)
    with pytest.raises(NodeInputError, match="input 'image': at 512 pixels wide it would be 51200 pixels tall"):
        icedit_nodes.ICEditDiptych.execute(torch.rand(1, 1000, 10, 3), 512)
