"""An adapter straight out of the bundled trainer loads in the ComfyUI node and runs as in diffusers."""

from __future__ import annotations

import shutil

import torch

import instructmole as im

from .comfy_tiny import comfy_flux_from_diffusers, run_comfy, run_diffusers


def test_trainer_output_loads_in_the_node_with_no_conversion(setup, tmp_path):
    import folder_paths
    from diffusers import FluxTransformer2DModel

    from instructmole.tiny import save_tiny_kontext
    from training.config import load_config
    from training.loop import train
    from training.synthetic import all_phrasings, write_dataset

    from ..training.conftest import TINY_CONFIG, run_overrides

    tiny = {
        "model": save_tiny_kontext(tmp_path / "model", text_length=32, corpus=all_phrasings()),
        "manifest": write_dataset(tmp_path / "data", images=8, holdout_images=1),
    }
    overrides = run_overrides(tiny, tmp_path / "run", "save.report=false", "train.lr=1e-2", steps=4, every=4)
    result = train(load_config(TINY_CONFIG, overrides))
    name = "trained.safetensors"
    shutil.copy(result.adapter, folder_paths.get_folder_paths("instructmole")[0] + "/" + name)

    transformer = FluxTransformer2DModel.from_pretrained(tiny["model"] / "transformer").eval()
    base = comfy_flux_from_diffusers(transformer)
    model, adapter_out = setup["nodes"].loaders.LoadAdapter.execute(base, name, 1.0, 1.0).result
    adapter = im.load_adapter(result.adapter)
    assert adapter_out.config.to_dict() == adapter.config.to_dict()  # (the pack's own copy of the class)
    g = torch.Generator().manual_seed(3)
    x = {
        "latents": torch.randn(2, 16, 4, 4, generator=g),
        "sigma": torch.tensor([0.7, 0.4]),
        "t5": torch.randn(2, 32, 64, generator=g),
        "pooled": torch.randn(2, 32, generator=g),
        "guidance": torch.full((2,), 2.5),
        "ref_latent": torch.randn(2, 16, 4, 4, generator=g),
    }
    with im.attach(transformer, adapter):
        want = run_diffusers(transformer, **x)
    got = run_comfy(model, **x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert (got - run_diffusers(transformer, **x)).abs().max() > 1e-5  # the trained experts act


def test_councils_in_comfyui_equal_the_trainers(setup, tmp_path):
    """Train with the bundled trainer, export in bf16, load in the nodes: the councils that auto mode,
    Route from a conditioning and Route from text give for an instruction equal the council the
    trainer's own routing gives for it (its text encoding, its eval routing), bit for bit."""
    import folder_paths
    from diffusers import FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    from instructmole.runtime import MoLERuntime
    from instructmole.tiny import TinyTextEncoders, save_tiny_kontext
    from training.cache import encode_texts
    from training.config import load_config
    from training.loop import train
    from training.synthetic import all_phrasings, write_dataset

    from ..training.conftest import TINY_CONFIG, run_overrides
    from .tiny_clip import TinyCLIP

    length = 32  # not Text Encode's default (512): the adapter connected to Text Encode sets the length
    tiny = {
        "model": save_tiny_kontext(tmp_path / "model", text_length=length, corpus=all_phrasings()),
        "manifest": write_dataset(tmp_path / "data", images=8, holdout_images=1),
    }
    overrides = run_overrides(
        tiny,
        tmp_path / "run",
        "save.report=false",
        "train.lr=1e-2",
        f"adapter.text_length={length}",
        "save.dtype=bf16",
        steps=4,
        every=4,
    )
    result = train(load_config(TINY_CONFIG, overrides))
    name = "trained_bf16.safetensors"
    shutil.copy(result.adapter, folder_paths.get_folder_paths("instructmole")[0] + "/" + name)

    folder = tiny["model"]
    encoders = TinyTextEncoders(
        t5=T5EncoderModel.from_pretrained(folder / "text_encoder_2").eval(),
        t5_tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer_2"),
        clip=CLIPTextModel.from_pretrained(folder / "text_encoder").eval(),
        clip_tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"),
        text_length=length,
    )
    clip = object.__new__(TinyCLIP)  # ComfyUI's CLIP calls over the very encoders the trainer used
    clip.seed, clip.encoders = 0, encoders

    trainer = MoLERuntime(im.load_adapter(result.adapter).model)  # the trainer's eval routing of the export
    nodes = setup["nodes"]
    transformer = FluxTransformer2DModel.from_pretrained(folder / "transformer").eval()
    model, adapter = nodes.loaders.LoadAdapter.execute(comfy_flux_from_diffusers(transformer), name, 1.0, 1.0).result
    assert adapter.model.layer(adapter.config.layer_names[0]).A.dtype == torch.bfloat16
    instructions = ["invert the colours", "make it warmer", "turn the photo (black and white)"]
    for text in instructions:
        features: dict = {}
        encode_texts(
            [text],
            t5=encoders.t5,
            t5_tokenizer=encoders.t5_tokenizer,
            clip=encoders.clip,
            clip_tokenizer=encoders.clip_tokenizer,
            text_length=length,
            batch_size=1,
            write=lambda _, f, out=features: out.update(f),
        )
        want = trainer.route(features["t5"][None], features["pooled"][None])[0]  # probs [1, L, n]

        conditioning = nodes.routing_nodes.TextEncode.execute(clip, text, adapter).result[0]
        assert conditioning[0][0].shape[1] == length  # the model sees the tokens of training, too
        from_cond = nodes.routing_nodes.Route.execute(adapter, conditioning=conditioning).result[0]
        from_text = nodes.routing_nodes.Route.execute(adapter, clip=clip, text=text).result[0]
        cond, extras = conditioning[0]
        x = {
            "latents": torch.zeros(1, 16, 4, 4),
            "sigma": torch.tensor([0.5]),
            "t5": cond,
            "pooled": extras["pooled_output"],
            "guidance": 1.0,
            "ref_latent": torch.zeros(1, 16, 4, 4),
        }
        run_comfy(model, **x, extra={k: v.cond for k, v in extras["model_conds"].items()})
        runtime = model.get_attachment("instructmole")
        assert runtime.last_exact is True
        for council in (from_cond, from_text, runtime.last_council):
            assert torch.equal(council.probs, want), text

        # Without the adapter, Text Encode pads to 512: routed from that signal, never called exact.
        default = nodes.routing_nodes.TextEncode.execute(clip, text).result[0]
        assert default[0][0].shape[1] == 512
        approximate = nodes.routing_nodes.Route.execute(adapter, conditioning=default).result[0]
        assert approximate.label == ("conditioning (approximate)",) and from_cond.label == ("conditioning",)
        cond, extras = default[0]
        run_comfy(model, **{**x, "t5": cond}, extra={k: v.cond for k, v in extras["model_conds"].items()})
        assert runtime.last_exact is False
