"""The trainer's ComfyUI-file loader against names made by ComfyUI's own maps, and ComfyUI's tokenizers.

``tests/training/test_loading.py`` makes the BFL/LDM names with inverse maps written from diffusers'
converters; here ComfyUI writes them (``comfy.utils.flux_to_diffusers`` through ``comfy_tiny``,
``comfy.diffusers_convert.convert_vae_state_dict``), so the two sides are independent. The
tokenizers are the real ones of the ComfyUI checkout at COMFYUI_PATH.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from .comfy_tiny import comfy_unet_config, diffusers_to_comfy_state_dict

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def kontext_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from instructmole.tiny import save_tiny_kontext

    return save_tiny_kontext(tmp_path_factory.mktemp("kontext") / "tiny-kontext")


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_transformer_in_comfyui_names(tmp_path: Path, kontext_dir: Path) -> None:
    from instructmole.tiny import tiny_flux
    from training.loading import load_comfyui_files

    flux = tiny_flux(0)
    path = tmp_path / "flux1-kontext-dev.safetensors"
    save_file(diffusers_to_comfy_state_dict(flux, comfy_unet_config(flux)), str(path))
    parts = load_comfyui_files(transformer=path, config_folder=kontext_dir, dtype=torch.float32, parts=("transformer",))
    _same_state(parts.transformer, flux)


def test_vae_in_comfyui_names(tmp_path: Path, kontext_dir: Path) -> None:
    import comfy.diffusers_convert
    import comfy.sd

    from instructmole.tiny import tiny_vae
    from training.loading import load_comfyui_files

    vae = tiny_vae(0)
    ldm = comfy.diffusers_convert.convert_vae_state_dict(vae.state_dict())
    assert "encoder.mid.attn_1.q.weight" in ldm and "decoder.up.3.upsample.conv.weight" in ldm
    path = tmp_path / "ae.safetensors"
    save_file({k: v.contiguous() for k, v in ldm.items()}, str(path))
    parts = load_comfyui_files(vae=path, config_folder=kontext_dir, dtype=torch.float32, parts=("vae",))
    _same_state(parts.vae, vae)


def _write_tiny_text_configs(folder: Path) -> None:
    """Small T5 / CLIP configs with the real vocabularies, so the checkout's tokenizers fit them."""
    (folder / "text_encoder_2").mkdir(parents=True)
    (folder / "text_encoder").mkdir(parents=True)
    t5 = {
        "model_type": "t5", "vocab_size": 32128, "d_model": 16, "d_kv": 4, "d_ff": 32, "num_layers": 1,
        "num_heads": 4, "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6, "pad_token_id": 0, "eos_token_id": 1,
    }  # fmt: skip
    clip = {
        "model_type": "clip_text_model", "vocab_size": 49408, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
        "projection_dim": 16, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    }  # fmt: skip
    (folder / "text_encoder_2" / "config.json").write_text(json.dumps(t5))
    (folder / "text_encoder" / "config.json").write_text(json.dumps(clip))


def test_text_encoders_with_comfyui_tokenizers(tmp_path: Path) -> None:
    """The checkout's T5 and CLIP tokenizers load and give ComfyUI's own ids; CLIP is capped to 77."""
    from comfy.sd1_clip import SDTokenizer
    from comfy.text_encoders.sd3_clip import T5XXLTokenizer
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from training.loading import load_comfyui_files

    configs = tmp_path / "configs"
    _write_tiny_text_configs(configs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        t5 = T5EncoderModel(T5Config.from_json_file(str(configs / "text_encoder_2" / "config.json"))).eval()
        clip = CLIPTextModel(CLIPTextConfig.from_json_file(str(configs / "text_encoder" / "config.json"))).eval()
    save_file({k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}, str(tmp_path / "t5.st"))
    clip_sd = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in clip.state_dict().items()}
    clip_sd["text_projection.weight"] = torch.zeros(16, 16)
    save_file(clip_sd, str(tmp_path / "clip.st"))
    comfyui_path = os.environ["COMFYUI_PATH"]
    parts = load_comfyui_files(
        t5=tmp_path / "t5.st",
        clip=tmp_path / "clip.st",
        comfyui_path=comfyui_path,
        config_folder=configs,
        dtype=torch.float32,
        parts=("t5", "clip"),
    )
    _same_state(parts.t5, t5)
    _same_state(parts.clip, clip)
    assert parts.clip_tokenizer.model_max_length == 77
    prompt = "Turn the cat into a watercolor painting, keep the red hat"
    comfy_t5 = T5XXLTokenizer().tokenizer(prompt)["input_ids"]
    comfy_clip = SDTokenizer().tokenizer(prompt)["input_ids"]
    assert parts.t5_tokenizer(prompt).input_ids == comfy_t5
    assert parts.clip_tokenizer(prompt).input_ids == comfy_clip
    assert comfy_clip[0] == 49406 and comfy_clip[-1] == 49407 and comfy_t5[-1] == 1
    assert set(parts.identity) == {"t5", "clip"}
