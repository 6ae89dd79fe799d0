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
