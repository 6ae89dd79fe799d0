"""A tiny adapter of each chat-LLM family, trained by the bundled trainer, in real ComfyUI (v0.33).

Issue 22's "done": for Qwen-Image-Edit-2511 and FLUX.2 [klein] an adapter trains (three steps of the
tiny recipe), saves, loads through InstructMoLE Load Adapter on ComfyUI's own model of the family,
and routes an instruction encoded by InstructMoLE Text Encode to the councils the trainer's own
evaluation routes; auto (the carried signal) = fixed (Apply Council) = merged (folded into weights).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from .comfy_tiny_families import comfy_flux2_from_diffusers, comfy_qwen_from_diffusers, family_missing, run_comfy_family
from .tiny_chat_clip import TinyChatCLIP

FAMILIES = {"qwen-image-edit-2511": "qwen_image", "flux.2-klein-4b": "flux2"}
ATOL = 1e-4  # merged folds the council into fp32 weights: rounding of the sum, not of the method


@pytest.fixture(scope="module", params=list(FAMILIES))
def trained(request: pytest.FixtureRequest, instructmole_pack: Any, tmp_path_factory: pytest.TempPathFactory):
    why = family_missing(FAMILIES[request.param])
    if why is not None:
        pytest.skip(why)
    from instructmole.tiny_pipelines import save_tiny_family
    from training.config import load_config
    from training.loop import train
    from training.synthetic import all_phrasings, write_dataset

    family = request.param
    root = tmp_path_factory.mktemp(f"trained-{family}")
    folder = save_tiny_family(root / "model", family, seed=0, corpus=all_phrasings())
    manifest = write_dataset(root / "data", images=4, holdout_images=1)
    config = Path(__file__).resolve().parents[2] / "training" / "configs" / "tiny_families.yaml"
    overrides = [
        f"model.pretrained={folder}",
        f"data.manifest={manifest}",
        f"train.output_dir={root / 'run'}",
        "train.max_steps=3",
        "save.every=3",
        "train.batch_size=8",
        "save.report_rows=6",
        "log.progress=false",
    ]
    result = train(load_config(config, overrides))
    return family, folder, result, tuple(all_phrasings())


def _comfy_model(family: str, folder: Path) -> Any:
    from diffusers import Flux2Transformer2DModel, QwenImageTransformer2DModel

    if family.startswith("qwen"):
        transformer = QwenImageTransformer2DModel.from_pretrained(str(folder / "transformer")).eval()
        return comfy_qwen_from_diffusers(transformer)
    return comfy_flux2_from_diffusers(Flux2Transformer2DModel.from_pretrained(str(folder / "transformer")).eval())


def _latents(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if family.startswith("qwen"):
        shape, ref = (1, 16, 1, 4, 4), (1, 16, 1, 4, 4)
    else:
        shape, ref = (1, 128, 2, 2), (1, 128, 2, 2)
    return {"latents": torch.randn(shape, generator=g), "ref_latent": torch.randn(ref, generator=g), "sigma": 0.7}


def test_a_trained_adapter_loads_in_comfyui_and_routes_as_in_training(trained: Any, instructmole_pack: Any) -> None:
    import folder_paths

    family, folder, result, corpus = trained
    nodes = instructmole_pack.nodes
    nodes.common.register_folder()
    target = folder_paths.get_folder_paths("instructmole")[0]
    os.makedirs(target, exist_ok=True)
    name = f"trained_{family}.safetensors"
    shutil.copyfile(result.adapter, os.path.join(target, name))

    base = _comfy_model(family, folder)
    model, adapter = nodes.loaders.LoadAdapter.execute(base, name, 1.0, 1.0).result
    assert adapter.config.base_model == family and adapter.config.router_pool == "text"
    clip = TinyChatCLIP(family, 0, corpus)

    from training.evaluate import eval_mode

    instructions = sorted(set(corpus))[:2]  # phrasings of the data set: the trainer has them cached
    with eval_mode(result.model):
        indices, weights = result.evaluator.councils(instructions)
    expected = torch.zeros(*indices.shape[:2], adapter.config.num_experts).scatter_(-1, indices, weights.float())
    for row, text in enumerate(instructions):
        conditioning = nodes.routing_nodes.TextEncode.execute(clip, text, adapter).args[0]
        council = nodes.routing_nodes.Route.execute(adapter, conditioning=conditioning).args[0]
        assert torch.equal(council.weights[0] != 0, expected[row] != 0), text  # the trainer's experts
        torch.testing.assert_close(council.weights[0], expected[row], atol=1e-5, rtol=0)

        cond, extras = conditioning[0]
        carried = {k: v.cond for k, v in extras["model_conds"].items()}
        mask = extras.get("attention_mask")
        x = _latents(family, row)
        auto = run_comfy_family(model, text=cond, mask=mask, extra=carried, **x)
        runtime = model.get_attachment("instructmole")
        assert runtime.last_exact is True
        assert torch.equal(runtime.last_council.weights != 0, council.weights != 0)
        fixed_model = nodes.council_nodes.ApplyCouncil.execute(model, council, "fixed").result[0]
        merged_model = nodes.council_nodes.ApplyCouncil.execute(model, council, "merged").result[0]
        fixed = run_comfy_family(fixed_model, text=cond, mask=mask, **x)
        merged = run_comfy_family(merged_model, text=cond, mask=mask, **x)
        plain = run_comfy_family(base, text=cond, mask=mask, **x)
        torch.testing.assert_close(auto, fixed, atol=1e-6, rtol=0)
        torch.testing.assert_close(merged, fixed, atol=ATOL, rtol=0)
        assert (fixed - plain).abs().max() > 1e-6  # the trained experts change the prediction
