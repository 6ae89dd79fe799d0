"""Loading FLUX.1 Kontext parts: the tiny pipeline folder, diffusers folders, ComfyUI single files.

Everything is local (HF_HUB_OFFLINE=1). The ComfyUI/BFL names of the transformer and the VAE are
produced here by small inverse maps written from the names diffusers' own converters read
(``convert_flux_transformer_checkpoint_to_diffusers``, ``convert_ldm_vae_checkpoint``); the
transformer converter of ``training.loading`` is also compared with diffusers' on the real widths.
``tests/comfyui/test_training_loading.py`` repeats the transformer/VAE loads with names made by
ComfyUI's own maps.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import save_file

from instructmole.tiny import TINY_FLUX, kontext_inputs, save_tiny_kontext, tiny_flux, tiny_text_encoders, tiny_vae
from training.errors import ModelLoadError
from training.loading import (
    PARTS,
    SHIPPED_CONFIGS,
    KontextParts,
    bfl_to_diffusers_flux,
    fingerprint,
    load_comfyui_files,
    load_diffusers_folder,
)

PROMPTS = ["make the sky a stormy purple", "add a red hat to the dog", "words never seen before", ""]


# --------------------------------------------------------------------------------------------
# Inverse maps: diffusers -> BFL transformer names, diffusers -> LDM VAE names (test helpers).


def diffusers_to_bfl_flux(sd: dict[str, torch.Tensor], num_layers: int, num_single: int) -> dict[str, torch.Tensor]:
    """BFL names for a diffusers Flux state dict: the inverse of diffusers' single-file converter."""
    out: dict[str, torch.Tensor] = {}
    top = {
        "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
        "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
        "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
        "txt_in": "context_embedder",
        "img_in": "x_embedder",
        "final_layer.linear": "proj_out",
    }
    for s in ("weight", "bias"):
        for bfl, dif in top.items():
            out[f"{bfl}.{s}"] = sd[f"{dif}.{s}"]
        shift_scale = sd[f"norm_out.linear.{s}"].chunk(2, dim=0)  # diffusers: (scale, shift)
        out[f"final_layer.adaLN_modulation.1.{s}"] = torch.cat([shift_scale[1], shift_scale[0]])
    for i in range(num_layers):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for s in ("weight", "bias"):
            for bfl, dif in {
                "img_mod.lin": "norm1.linear",
                "txt_mod.lin": "norm1_context.linear",
                "img_attn.proj": "attn.to_out.0",
                "txt_attn.proj": "attn.to_add_out",
                "img_mlp.0": "ff.net.0.proj",
                "img_mlp.2": "ff.net.2",
                "txt_mlp.0": "ff_context.net.0.proj",
                "txt_mlp.2": "ff_context.net.2",
            }.items():
                out[f"{b}{bfl}.{s}"] = sd[f"{d}{dif}.{s}"]
            out[f"{b}img_attn.qkv.{s}"] = torch.cat([sd[f"{d}attn.to_{x}.{s}"] for x in "qkv"])
            out[f"{b}txt_attn.qkv.{s}"] = torch.cat([sd[f"{d}attn.add_{x}_proj.{s}"] for x in "qkv"])
        out[f"{b}img_attn.norm.query_norm.scale"] = sd[f"{d}attn.norm_q.weight"]
        out[f"{b}img_attn.norm.key_norm.scale"] = sd[f"{d}attn.norm_k.weight"]
        out[f"{b}txt_attn.norm.query_norm.scale"] = sd[f"{d}attn.norm_added_q.weight"]
        out[f"{b}txt_attn.norm.key_norm.scale"] = sd[f"{d}attn.norm_added_k.weight"]
    for i in range(num_single):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for s in ("weight", "bias"):
            out[f"{b}modulation.lin.{s}"] = sd[f"{d}norm.linear.{s}"]
            out[f"{b}linear2.{s}"] = sd[f"{d}proj_out.{s}"]
            out[f"{b}linear1.{s}"] = torch.cat([sd[f"{d}attn.to_{x}.{s}"] for x in "qkv"] + [sd[f"{d}proj_mlp.{s}"]])
        out[f"{b}norm.query_norm.scale"] = sd[f"{d}attn.norm_q.weight"]
        out[f"{b}norm.key_norm.scale"] = sd[f"{d}attn.norm_k.weight"]
    assert sum(v.numel() for v in out.values()) == sum(v.numel() for v in sd.values())
    return out


def diffusers_to_ldm_vae(sd: dict[str, torch.Tensor], num_blocks: int) -> dict[str, torch.Tensor]:
    """LDM/BFL names for a diffusers AutoencoderKL (no quant convs), attention weights as 1x1 convs."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        k = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        for stem in ("encoder.", "decoder."):
            if k.startswith(stem + "mid_block.resnets."):
                j = int(k.split(".")[3])
                k = f"{stem}mid.block_{j + 1}." + k.split(".", 4)[4]
            elif k.startswith(stem + "mid_block.attentions.0."):
                rest = k[len(stem + "mid_block.attentions.0.") :]
                rest = (
                    {
                        "group_norm": "norm",
                        "to_q": "q",
                        "to_k": "k",
                        "to_v": "v",
                        "to_out.0": "proj_out",
                    }[rest.rsplit(".", 1)[0]]
                    + "."
                    + rest.rsplit(".", 1)[1]
                )
                k = f"{stem}mid.attn_1.{rest}"
                if value.ndim == 2:
                    value = value[:, :, None, None]
        if k.startswith("encoder.down_blocks."):
            _, _, i, kind, rest = k.split(".", 4)
            k = (
                f"encoder.down.{i}.block.{rest}"
                if kind == "resnets"
                else f"encoder.down.{i}.downsample.{rest.split('.', 1)[1]}"
            )
        elif k.startswith("decoder.up_blocks."):
            _, _, i, kind, rest = k.split(".", 4)
            j = num_blocks - 1 - int(i)
            k = (
                f"decoder.up.{j}.block.{rest}"
                if kind == "resnets"
                else f"decoder.up.{j}.upsample.{rest.split('.', 1)[1]}"
            )
        out[k] = value
    return out


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def kontext_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_kontext(tmp_path_factory.mktemp("kontext") / "tiny-kontext")


@pytest.fixture(scope="module")
def text():
    return tiny_text_encoders(seed=0)


@pytest.fixture(scope="module")
def comfy_files(tmp_path_factory: pytest.TempPathFactory, text, kontext_dir: Path) -> dict[str, Path]:
    """The tiny parts as a ComfyUI install would hold them, plus a fake ComfyUI checkout."""
    root = tmp_path_factory.mktemp("comfy")
    models = root / "models"
    files = {
        "transformer": models / "diffusion_models" / "flux1-kontext-dev.safetensors",
        "t5": models / "text_encoders" / "t5xxl_fp16.safetensors",
        "clip": models / "text_encoders" / "clip_l.safetensors",
        "vae": models / "vae" / "ae.safetensors",
    }
    for p in files.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    flux = tiny_flux(0)
    save_file(
        diffusers_to_bfl_flux(flux.state_dict(), TINY_FLUX["num_layers"], TINY_FLUX["num_single_layers"]),
        str(files["transformer"]),
    )
    save_file(diffusers_to_ldm_vae(tiny_vae(0).state_dict(), 4), str(files["vae"]))
    t5 = {k: v.clone() for k, v in text.t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(t5, str(files["t5"]))
    # HF names of CLIP-L files ("text_model." is gone from CLIPTextModel in transformers 5).
    clip = {
        k if k.startswith("text_model.") else f"text_model.{k}": v.clone() for k, v in text.clip.state_dict().items()
    }
    clip["text_model.embeddings.position_ids"] = torch.arange(16)[None]
    g = torch.Generator().manual_seed(1)
    clip["text_projection.weight"] = torch.randn(32, 32, generator=g)
    clip["logit_scale"] = torch.tensor(4.6055)
    save_file(clip, str(files["clip"]))
    checkout = root / "ComfyUI"
    text.t5_tokenizer.save_pretrained(str(checkout / "comfy" / "text_encoders" / "t5_tokenizer"))
    text.clip_tokenizer.save_pretrained(str(checkout / "comfy" / "sd1_tokenizer"))
    return {**files, "comfyui_path": checkout, "config_folder": kontext_dir}


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def _encode(t5, t5_tok, clip, clip_tok, prompts=PROMPTS, length=32):
    """T5 features and CLIP pooled output as the trainer computes them (padded, no mask)."""
    with torch.no_grad():
        ids = t5_tok(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        cids = clip_tok(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
        return t5(input_ids=ids.input_ids).last_hidden_state, clip(input_ids=cids.input_ids).pooler_output


def _run_kontext(pipe) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    image = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8"))
    out = pipe(
        image=image,
        prompt="make the sky a stormy purple",
        height=32,
        width=32,
        max_area=32 * 32,
        _auto_resize=False,
        num_inference_steps=2,
        max_sequence_length=512,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert out.shape == (1, 3, 32, 32)
    assert torch.isfinite(out).all()
    return out


# --------------------------------------------------------------------------------------------
# The tiny Kontext folder and diffusers-folder loading


def test_save_tiny_kontext_is_a_kontext_pipeline(tmp_path: Path, kontext_dir: Path):
    from diffusers import FluxKontextPipeline

    start = time.perf_counter()
    folder = save_tiny_kontext(tmp_path / "again")
    assert time.perf_counter() - start < 3.0
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "FluxKontextPipeline"
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert {k: scheduler[k] for k in ("shift", "use_dynamic_shifting", "base_shift", "max_shift")} == {
        "shift": 3.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
    }
    assert (scheduler["base_image_seq_len"], scheduler["max_image_seq_len"]) == (256, 4096)
    pipe = FluxKontextPipeline.from_pretrained(str(kontext_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 8 and pipe.vae.config.latent_channels == 16
    _run_kontext(pipe)


def test_tiny_vae_is_flux_like_and_nearly_deterministic():
    vae = tiny_vae(0)
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (0.3611, 0.1159)
    assert vae.quant_conv is None and vae.post_quant_conv is None
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    assert dist.mean.shape == (2, 16, 4, 4)
    assert dist.std.max() < 0.003
    assert (dist.sample() - dist.mean).abs().max() < 0.02


def test_load_diffusers_folder_round_trip(kontext_dir: Path, text):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline

    parts = load_diffusers_folder(kontext_dir, dtype=torch.float32)
    _same_state(parts.transformer, tiny_flux(0))
    _same_state(parts.vae, tiny_vae(0))
    _same_state(parts.t5, text.t5)
    _same_state(parts.clip, text.clip)
    for prompt in PROMPTS:
        assert parts.t5_tokenizer(prompt).input_ids == text.t5_tokenizer(prompt).input_ids
        assert parts.clip_tokenizer(prompt).input_ids == text.clip_tokenizer(prompt).input_ids
    assert parts.clip_tokenizer.model_max_length == 16
    assert set(parts.identity) == set(PARTS)
    assert all(len(v) == 16 and int(v, 16) >= 0 for v in parts.identity.values())
    # The loaded parts make a working pipeline.
    pipe = FluxKontextPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(str(kontext_dir), subfolder="scheduler"),
        vae=parts.vae,
        text_encoder=parts.clip,
        tokenizer=parts.clip_tokenizer,
        text_encoder_2=parts.t5,
        tokenizer_2=parts.t5_tokenizer,
        transformer=parts.transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    _run_kontext(pipe)


def test_load_diffusers_folder_only_asked_parts_and_dtype(kontext_dir: Path):
    parts = load_diffusers_folder(kontext_dir, parts=("t5", "clip"))
    assert parts.transformer is None and parts.vae is None
    assert parts.t5.dtype == torch.bfloat16 and parts.clip.dtype == torch.bfloat16
    assert parts.t5_tokenizer is not None and parts.clip_tokenizer is not None
    full = load_diffusers_folder(kontext_dir, parts=("transformer",))
    assert full.t5 is None and full.transformer.dtype == torch.bfloat16
    assert parts.identity == full.identity  # every present part is fingerprinted, loaded or not


def test_identity_is_about_content(tmp_path: Path, kontext_dir: Path):
    same = load_diffusers_folder(save_tiny_kontext(tmp_path / "a", seed=0), parts=()).identity
    other = load_diffusers_folder(save_tiny_kontext(tmp_path / "b", seed=1), parts=()).identity
    ours = load_diffusers_folder(kontext_dir, parts=()).identity
    assert same == ours
    assert all(same[p] != other[p] for p in PARTS)


# --------------------------------------------------------------------------------------------
# ComfyUI single files


def test_comfyui_text_encoders(comfy_files: dict[str, Path], text):
    parts = load_comfyui_files(
        t5=comfy_files["t5"],
        clip=comfy_files["clip"],
        comfyui_path=comfy_files["comfyui_path"],
        config_folder=comfy_files["config_folder"],
        dtype=torch.float32,
        parts=("t5", "clip"),
    )
    assert isinstance(parts, KontextParts) and parts.transformer is None and parts.vae is None
    _same_state(parts.t5, text.t5)
    _same_state(parts.clip, text.clip)
    assert parts.t5.encoder.embed_tokens.weight is parts.t5.shared.weight
    assert not any(t.is_meta for t in [*parts.t5.state_dict().values(), *parts.clip.buffers()])
    for prompt in PROMPTS:
        assert parts.t5_tokenizer(prompt).input_ids == text.t5_tokenizer(prompt).input_ids
        assert parts.clip_tokenizer(prompt).input_ids == text.clip_tokenizer(prompt).input_ids
    got = _encode(parts.t5, parts.t5_tokenizer, parts.clip, parts.clip_tokenizer)
    want = _encode(text.t5, text.t5_tokenizer, text.clip, text.clip_tokenizer)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    bf16 = load_comfyui_files(
        t5=comfy_files["t5"],
        comfyui_path=comfy_files["comfyui_path"],
        config_folder=comfy_files["config_folder"],
        parts=("t5",),
    )
    assert bf16.t5.dtype == torch.bfloat16


def test_comfyui_bfl_transformer_and_ldm_vae(tmp_path: Path, comfy_files: dict[str, Path]):
    parts = load_comfyui_files(
        transformer=comfy_files["transformer"],
        vae=comfy_files["vae"],
        config_folder=comfy_files["config_folder"],
        dtype=torch.float32,
        parts=("transformer", "vae"),
    )
    flux, vae = tiny_flux(0), tiny_vae(0)
    _same_state(parts.transformer, flux)
    _same_state(parts.vae, vae)
    g = torch.Generator().manual_seed(0)
    inputs = kontext_inputs(torch.randn(1, 8, 64, generator=g), torch.randn(1, 32, generator=g))
    with torch.no_grad():
        torch.testing.assert_close(parts.transformer(**inputs)[0], flux(**inputs)[0], rtol=0, atol=0)
        x = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
        torch.testing.assert_close(parts.vae.encode(x).latent_dist.mean, vae.encode(x).latent_dist.mean)
    # ComfyUI-saved checkpoints put the model under "model.diffusion_model."
    from safetensors.torch import load_file

    prefixed = tmp_path / "prefixed.safetensors"
    save_file(
        {f"model.diffusion_model.{k}": v for k, v in load_file(str(comfy_files["transformer"])).items()}, str(prefixed)
    )
    again = load_comfyui_files(transformer=prefixed, config_folder=comfy_files["config_folder"], parts=("transformer",))
    assert again.transformer.dtype == torch.bfloat16
    assert (
        set(parts.identity) == {"transformer", "vae"} and again.identity["transformer"] != parts.identity["transformer"]
    )


def test_converter_matches_diffusers_at_real_width():
    """Our BFL->diffusers map gives diffusers' own converter's tensors for the 3072-wide FLUX.

    diffusers hard-codes the widths only in the split of ``linear1``; thin tensors (few columns)
    keep the check fast while the row splits are those of the real model.
    """
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    config = json.loads((SHIPPED_CONFIGS / "transformer" / "config.json").read_text())
    g = torch.Generator().manual_seed(0)
    rows = {"qkv": 3 * 3072, "linear1": 3 * 3072 + 4 * 3072, "adaLN_modulation": 2 * 3072}
    names = [
        "time_in.in_layer",
        "time_in.out_layer",
        "vector_in.in_layer",
        "vector_in.out_layer",
        "guidance_in.in_layer",
        "guidance_in.out_layer",
        "txt_in",
        "img_in",
        "final_layer.linear",
        "final_layer.adaLN_modulation.1",
        *(
            f"double_blocks.0.{n}"
            for n in (
                "img_mod.lin",
                "txt_mod.lin",
                "img_attn.qkv",
                "txt_attn.qkv",
                "img_attn.proj",
                "txt_attn.proj",
                "img_mlp.0",
                "img_mlp.2",
                "txt_mlp.0",
                "txt_mlp.2",
            )
        ),
        *(f"single_blocks.0.{n}" for n in ("modulation.lin", "linear1", "linear2")),
    ]
    bfl = {}
    for n in names:
        r = next((v for k, v in rows.items() if k in n), 6)
        bfl[f"{n}.weight"] = torch.randn(r, 2, generator=g)
        bfl[f"{n}.bias"] = torch.randn(r, generator=g)
    for n in ("double_blocks.0.img_attn", "double_blocks.0.txt_attn", "single_blocks.0"):
        for q in ("query_norm", "key_norm"):
            bfl[f"{n}.norm.{q}.scale"] = torch.randn(4, generator=g)
    want = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    got = bfl_to_diffusers_flux(dict(bfl), config)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # ComfyUI v0.33 saves the q/k norms as ``.weight`` where BFL files say ``.scale``: the same weights.
    renamed = {k.removesuffix(".scale") + ".weight" if "_norm." in k else k: v for k, v in bfl.items()}
    assert any(k.endswith("key_norm.weight") for k in renamed)
    got_v033 = bfl_to_diffusers_flux(renamed, config)
    assert got_v033.keys() == want.keys() and all(torch.equal(got_v033[k], want[k]) for k in want)


def test_shipped_configs_are_flux1_kontext_dev():
    """The shipped configs build models of the published sizes, and the BFL names of the real
    transformer and VAE (made on the meta device) convert onto them exactly (names and shapes)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import (
        convert_flux_transformer_checkpoint_to_diffusers,
        convert_ldm_vae_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    def config(sub):
        return json.loads((SHIPPED_CONFIGS / sub / "config.json").read_text())

    with init_empty_weights():
        flux = FluxTransformer2DModel.from_config(config("transformer"))
        vae = AutoencoderKL.from_config(config("vae"))
        t5 = T5EncoderModel(T5Config.from_dict(config("text_encoder_2")))
        clip = CLIPTextModel(CLIPTextConfig.from_dict(config("text_encoder")))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(flux) == 11_901_408_320
    assert count(vae) == 83_819_683
    untied = t5.encoder.embed_tokens.weight is not t5.shared.weight  # the loader ties them
    assert count(t5) - untied * t5.shared.weight.numel() == 4_762_310_656
    assert count(clip) == 123_060_480
    sd = flux.state_dict()
    bfl = diffusers_to_bfl_flux(sd, 19, 38)
    assert "double_blocks.18.img_attn.qkv.weight" in bfl and "single_blocks.37.linear1.weight" in bfl
    for converted in (
        bfl_to_diffusers_flux(dict(bfl), config("transformer")),
        convert_flux_transformer_checkpoint_to_diffusers(dict(bfl)),
    ):
        assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in sd.items()}
    vsd = vae.state_dict()
    ldm = diffusers_to_ldm_vae(vsd, 4)
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    converted = convert_ldm_vae_checkpoint(ldm, config("vae"))
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in vsd.items()}


# --------------------------------------------------------------------------------------------
# Errors: one sentence naming the file and the way out


def _load(comfy_files, **kw):
    args = {
        "comfyui_path": comfy_files["comfyui_path"],
        "config_folder": comfy_files["config_folder"],
        "dtype": torch.float32,
    }
    args.update(kw)
    return load_comfyui_files(**args)


def test_error_missing_and_not_safetensors(tmp_path: Path, comfy_files):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(
        ModelLoadError,
        match=r"T5-XXL text encoder file .*nope\.safetensors does not exist: point it "
        r"at <ComfyUI>/models/text_encoders/t5xxl_fp16\.safetensors",
    ):
        _load(comfy_files, t5=missing, parts=("t5",))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is a pickle, not safetensors" * 10)
    with pytest.raises(ModelLoadError, match=r"garbage\.safetensors is not a safetensors file .*use the \.safetensors"):
        _load(comfy_files, transformer=garbage, parts=("transformer",))
    with pytest.raises(
        ModelLoadError,
        match=r"No FLUX VAE file was given: pass vae=<ComfyUI>/models/vae/ae\.safetensors"
        r", or leave 'vae' out of parts",
    ):
        _load(comfy_files, parts=("vae",))


def test_error_not_flux_and_wrong_shapes(tmp_path: Path, comfy_files):
    with pytest.raises(
        ModelLoadError,
        match=r"ae\.safetensors is not a FLUX transformer \(it has no "
        r"double_blocks\.0\.img_attn\.qkv\.weight weight\): use the FLUX\.1 "
        r"Kontext \[dev\] diffusion model file",
    ):
        _load(comfy_files, transformer=comfy_files["vae"], parts=("transformer",))
    with pytest.raises(ModelLoadError, match=r"flux1-kontext-dev\.safetensors is not a VAE"):
        _load(comfy_files, vae=comfy_files["transformer"], parts=("vae",))
    with pytest.raises(ModelLoadError, match=r"clip_l\.safetensors is not a T5 encoder"):
        _load(comfy_files, t5=comfy_files["clip"], parts=("t5",))
    # The tiny files against the shipped (real-size) configs.
    with pytest.raises(
        ModelLoadError,
        match=r"flux1-kontext-dev\.safetensors does not fit the config .*transformer"
        r"/config\.json .*pass config_folder=",
    ):
        load_comfyui_files(transformer=comfy_files["transformer"], parts=("transformer",))
    with pytest.raises(
        ModelLoadError,
        match=r"t5xxl_fp16\.safetensors lacks 202 of the 220 weights of the T5-XXL "
        r"text encoder \(first: encoder\.block\.0\.layer\.1\.DenseReluDense\.wi_0"
        r"\.weight, .*\): it is not a complete T5-XXL text encoder of the model "
        r"the config .*text_encoder_2/config\.json describes; pick the right file, "
        r"or pass config_folder=",
    ):
        load_comfyui_files(t5=comfy_files["t5"], comfyui_path=comfy_files["comfyui_path"], parts=("t5",))
    # A FLUX of another width against the tiny config.
    other = tmp_path / "other.safetensors"
    save_file(diffusers_to_bfl_flux(tiny_flux(0, joint_attention_dim=48).state_dict(), 2, 2), str(other))
    with pytest.raises(
        ModelLoadError,
        match=r"other\.safetensors does not fit the config .*: 1 weight of other "
        r"shapes \(first: context_embedder\.weight is \[32, 48\], the config "
        r"expects \[32, 64\]\)",
    ):
        _load(comfy_files, transformer=other, parts=("transformer",))


def test_error_missing_and_unknown_weights(tmp_path: Path, comfy_files):
    from safetensors.torch import load_file

    sd = load_file(str(comfy_files["transformer"]))
    del sd["single_blocks.1.linear2.bias"]
    save_file(sd, str(tmp_path / "cut.safetensors"))
    with pytest.raises(
        ModelLoadError,
        match=r"cut\.safetensors lacks 1 of the \d+ weights of the FLUX\.1 Kontext "
        r"transformer \(first: single_transformer_blocks\.1\.proj_out\.bias\)",
    ):
        _load(comfy_files, transformer=tmp_path / "cut.safetensors", parts=("transformer",))
    sd = load_file(str(comfy_files["transformer"]))
    sd["double_blocks.0.img_attn.lora_up.weight"] = torch.zeros(2, 2)
    save_file(sd, str(tmp_path / "extra.safetensors"))
    with pytest.raises(
        ModelLoadError,
        match=r"extra\.safetensors holds a weight a FLUX transformer does not have "
        r"\(double_blocks\.0\.img_attn\.lora_up\.weight\)",
    ):
        _load(comfy_files, transformer=tmp_path / "extra.safetensors", parts=("transformer",))
    clip = load_file(str(comfy_files["clip"]))
    clip["text_model.something_else.weight"] = torch.zeros(2)
    save_file(clip, str(tmp_path / "clip_extra.safetensors"))
    with pytest.raises(
        ModelLoadError,
        match=r"clip_extra\.safetensors holds 1 weight the CLIP-L text encoder does "
        r"not have \(first: (text_model\.)?something_else\.weight\)",
    ):
        _load(comfy_files, clip=tmp_path / "clip_extra.safetensors", parts=("clip",))
    t5 = load_file(str(comfy_files["t5"]))
    t5["scaled_fp8"] = torch.zeros(0)
    save_file(t5, str(tmp_path / "t5_scaled.safetensors"))
    with pytest.raises(ModelLoadError, match=r"t5_scaled\.safetensors is a scaled-fp8 .*use the bf16/fp16 release"):
        _load(comfy_files, t5=tmp_path / "t5_scaled.safetensors", parts=("t5",))


def test_error_tokenizers_and_folders(tmp_path: Path, comfy_files, kontext_dir: Path):
    with pytest.raises(
        ModelLoadError,
        match=r"has no comfy/text_encoders/t5_tokenizer folder \(the T5 tokenizer\): "
        r"set comfyui_path to the ComfyUI folder",
    ):
        _load(comfy_files, t5=comfy_files["t5"], comfyui_path=tmp_path, parts=("t5",))
    with pytest.raises(ModelLoadError, match=r"has no comfy/sd1_tokenizer folder"):
        _load(comfy_files, clip=comfy_files["clip"], comfyui_path=tmp_path, parts=("clip",))
    with pytest.raises(
        ModelLoadError,
        match=r"The CLIP tokenizer comes from the ComfyUI checkout, but comfyui_path "
        r"is not set",
    ):
        _load(comfy_files, clip=comfy_files["clip"], comfyui_path=None, parts=("clip",))
    with pytest.raises(ModelLoadError, match=r"config folder .*nowhere does not exist"):
        _load(comfy_files, vae=comfy_files["vae"], config_folder=tmp_path / "nowhere", parts=("vae",))
    with pytest.raises(ModelLoadError, match=r"The model folder .*absent does not exist: point it at a diffusers"):
        load_diffusers_folder(tmp_path / "absent")
    partial = tmp_path / "partial"
    shutil.copytree(kontext_dir, partial)
    shutil.rmtree(partial / "vae")
    with pytest.raises(
        ModelLoadError,
        match=r"partial has no vae/ with config\.json and weights: .*or leave 'vae' "
        r"out of parts",
    ):
        load_diffusers_folder(partial)
    assert load_diffusers_folder(partial, parts=("clip",)).clip is not None
    from safetensors.torch import load_file

    weights = partial / "text_encoder" / "model.safetensors"
    cut = load_file(str(weights))
    del cut["final_layer_norm.bias"]
    save_file(cut, str(weights))
    with pytest.raises(
        ModelLoadError,
        match=r"The weights in .*text_encoder lack 1 weight of the CLIP-L text encoder \(first: final_layer_norm\.bias"
        r"\): replace that folder",
    ):
        load_diffusers_folder(partial, parts=("clip",))
    (partial / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"broken")
    with pytest.raises(
        ModelLoadError,
        match=r"Could not load the FLUX\.1 Kontext transformer from .*transformer "
        r"\(.*\): replace that folder",
    ):
        load_diffusers_folder(partial, parts=("transformer",))


# --------------------------------------------------------------------------------------------
# Fingerprints


def test_fingerprint(tmp_path: Path):
    small = tmp_path / "small.bin"
    small.write_bytes(bytes(range(256)) * 100)
    copy = tmp_path / "sub" / "copy.bin"
    copy.parent.mkdir()
    shutil.copy(small, copy)
    fp = fingerprint([small], {"a": 1})
    assert len(fp) == 16 and fp == fingerprint([copy], {"a": 1})
    assert fp != fingerprint([small], {"a": 2}) and fp != fingerprint([small], None)
    assert fingerprint([small], {"a": 1, "_diffusers_version": "x"}) == fp  # writer's version is ignored
    data = bytearray(small.read_bytes())
    data[12_345] ^= 1
    copy.write_bytes(data)
    assert fingerprint([copy], {"a": 1}) != fp
    # Large files: size, first and last MiB only.
    big = tmp_path / "big.bin"
    payload = bytearray(
        torch.randint(0, 256, (5 << 20,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
        .numpy()
        .tobytes()
    )
    big.write_bytes(payload)
    base = fingerprint([big], None)
    for index in (10, len(payload) - 10):
        changed = bytearray(payload)
        changed[index] ^= 1
        big.write_bytes(changed)
        assert fingerprint([big], None) != base
    changed = bytearray(payload)
    changed[len(payload) // 2] ^= 1  # the middle of a multi-GB file is not read (by design)
    big.write_bytes(changed)
    assert fingerprint([big], None) == base
    big.write_bytes(payload + b"x")
    assert fingerprint([big], None) != base
    assert fingerprint([small, big], None) != fingerprint([big, small], None)
    with pytest.raises(ModelLoadError, match=r"Cannot read .*gone\.bin to fingerprint it"):
        fingerprint([tmp_path / "gone.bin"], None)
