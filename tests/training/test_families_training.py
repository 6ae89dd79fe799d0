"""The trainer on the chat-LLM families (Qwen-Image-Edit-2511, FLUX.2 [klein] 4B) with tiny pipeline folders:
a few steps from the tiny recipe's YAML train, export an adapter of the family that loads, attaches and routes
in a host like the trainer's own evaluation routes it, the cached router signal masks out the template, a
resumed run ends with the weights of an uninterrupted one, and the plain LoRA goes on the family's own layers."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import instructmole as im
from instructmole.families import reference_layers
from instructmole.instruction import split_template
from instructmole.tiny_families import flux2_edit_inputs, qwen_edit_inputs
from instructmole.tiny_llm import tiny_chat_encoder
from instructmole.tiny_pipelines import TINY_FAMILIES, save_tiny_family
from tests.training.conftest import ROOT
from training.config import load_config
from training.errors import ConfigError
from training.evaluate import eval_mode
from training.families import recipe_for
from training.loop import train
from training.synthetic import all_phrasings, write_dataset

CONFIG = ROOT / "training" / "configs" / "tiny_families.yaml"
FAMILIES = list(TINY_FAMILIES)  # qwen-image-edit-2511, flux.2-klein-4b


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny pipeline folder per family and a small synthetic edit data set (24 training, 12 held-out rows)."""
    root = tmp_path_factory.mktemp("tiny_families")
    folders = {f: save_tiny_family(root / f, f, seed=0, corpus=all_phrasings()) for f in FAMILIES}
    return {**folders, "manifest": write_dataset(root / "data", images=4, holdout_images=1), "root": root}


def run(tiny, family: str, out: Path, *extra: str, steps: int = 3, every: int = 3, resume: str | None = None):
    overrides = [
        f"model.pretrained={tiny[family]}",
        f"data.manifest={tiny['manifest']}",
        f"train.output_dir={out}",
        f"train.max_steps={steps}",
        f"save.every={every}",
        "train.batch_size=8",
        "save.report_rows=6",
        "log.every=1",
        "log.progress=false",
        *extra,
    ]
    return train(load_config(CONFIG, overrides), resume=resume)


@pytest.fixture(scope="module", params=FAMILIES)
def trained(request, tiny, tmp_path_factory):
    """A 3-step run of each family (its family told from the folder's transformer), with its routing report."""
    family = request.param
    return family, run(tiny, family, tmp_path_factory.mktemp(f"run-{family}"))


def _transformer(tiny, family: str):
    from diffusers import Flux2Transformer2DModel, QwenImageTransformer2DModel

    cls = QwenImageTransformer2DModel if family.startswith("qwen") else Flux2Transformer2DModel
    return cls.from_pretrained(str(tiny[family] / "transformer")).eval()


def _encoder(family: str):
    """The chat encoder a host builds: the tiny folder's own (same seed, corpus and width)."""
    return tiny_chat_encoder(family, TINY_FAMILIES[family][1], seed=0, corpus=all_phrasings())


def test_a_run_trains_and_exports_an_adapter_of_the_family(trained, tiny):
    family, result = trained
    lines = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert all(math.isfinite(line["flow"]) and line["flow"] > 0 for line in lines)
    tensors = load_file(str(result.adapter))
    experts_b = [k for k in tensors if k.endswith(".B")]
    assert experts_b and all(tensors[k].abs().sum() > 0 for k in experts_b)  # B starts at zero: it trained
    adapter = im.load_adapter(result.adapter)
    cfg = adapter.config
    assert (cfg.base_model, cfg.router_pool, cfg.router_dim) == (family, "text", 32)
    assert cfg.text_dim == TINY_FAMILIES[family][1]  # the LLM features' width (FLUX.2: three stacked layers)
    assert list(cfg.layer_names) == reference_layers(_transformer(tiny, family))
    assert json.loads(adapter.metadata["training"])["config"]["model"]["family"] is None  # told from the folder
    report = json.loads((result.output_dir / "reports" / "step-0000003.json").read_text())
    assert math.isfinite(report["metrics"]["heldout_flow"]) and report["metrics"]["flow_vs_base"] != 0


def test_the_exported_adapter_routes_in_a_host_like_the_trainers_evaluation(trained, tiny):
    family, result = trained
    instructions = sorted(set(all_phrasings()))[:6]
    with eval_mode(result.model):
        indices, weights = result.evaluator.councils(instructions)  # the routing report's councils
    adapter = im.load_adapter(result.adapter)
    dense = torch.zeros(*indices.shape[:2], adapter.config.num_experts).scatter_(-1, indices, weights.float())
    transformer = _transformer(tiny, family)
    features, mask = _encoder(family).encode(instructions)  # padded to the longest, not to text_length
    text = torch.randn(len(instructions), 5, adapter.config.text_dim)
    inputs = qwen_edit_inputs(text, None, size=2) if family.startswith("qwen") else flux2_edit_inputs(text, size=2)
    with torch.no_grad():
        base = transformer(**inputs)[0]
    with im.attach(transformer, adapter) as handle:
        council = handle.route(features, mask=mask)
        assert torch.equal(council.weights != 0, dense != 0)  # the same experts
        torch.testing.assert_close(council.weights, dense, atol=1e-5, rtol=0)
        handle.set_signal(features, None, mask)  # a forward routes from the same signal
        with torch.no_grad():
            edited = transformer(**inputs)[0]
        assert torch.equal(handle.last_council.weights != 0, dense != 0)
    assert (edited - base).abs().max() > 1e-6  # the experts changed the output


def test_the_cached_routing_signal_masks_out_the_template(trained):
    family, result = trained
    cache, encoder = result.evaluator.data.cache, _encoder(family)
    prefix, _ = split_template(encoder.template)
    head = len(encoder.tokenize(prefix))
    for instruction in [*sorted(set(all_phrasings()))[:3], ""]:
        entry = cache.read(cache.text_key(instruction))
        body = len(encoder.tokenize(instruction))
        assert body or not instruction
        positions = entry["route_mask"].nonzero().flatten().tolist()
        assert positions == list(range(head, head + body))  # the instruction's own tokens, nothing of the template
        ids, keep = encoder.ids(instruction)
        features, mask = encoder.encode([instruction])
        assert mask[0].tolist() == keep and len(keep) == len(ids)
        signal = entry["route"] if family.startswith("qwen") else entry["text"]
        torch.testing.assert_close(signal[: len(ids)][mask[0]], features[0][mask[0]], atol=1e-5, rtol=0)
        if family.startswith("qwen"):  # conditioning: the prompt after the template's prefix (the pipeline's drop)
            assert signal.shape[0] == len(ids) and torch.equal(entry["text"], signal[head:])
        else:  # conditioning = the router's features: padded to adapter.text_length, no mask passed
            assert entry["text"].shape[0] == entry["route_mask"].shape[0] == 32 and "route" not in entry


def test_a_resumed_qwen_edit_run_ends_with_the_weights_of_an_uninterrupted_one(tiny, tmp_path):
    family, out = "qwen-image-edit-2511", tmp_path / "run"
    first = run(tiny, family, out, "save.report=false", every=1)
    trained = load_file(str(first.adapter))
    shutil.rmtree(out / "checkpoints" / "step-0000003")  # the last checkpoint lost: resume from step 2
    first.adapter.unlink()
    resumed = run(tiny, family, out, "save.report=false", every=1, resume="latest")
    assert resumed.steps == 3
    again = load_file(str(resumed.adapter))
    assert again.keys() == trained.keys() and all(torch.equal(again[k], trained[k]) for k in trained)


def test_the_plain_lora_goes_on_the_familys_reference_layers(tiny, tmp_path):
    family = "flux.2-klein-4b"
    extra = ("save.report=false", "adapter.lora.rank=4", "model.gradient_checkpointing=true", f"model.family={family}")
    result = run(tiny, family, tmp_path / "run", *extra, steps=2, every=2)
    adapter = im.load_adapter(result.adapter)
    modules = {part.module for part in adapter.lora_parts()}
    suffixes = {"x_embedder", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.linear_in"}
    suffixes.add("attn.to_qkv_mlp_proj")  # FLUX.2's fused single-block input (families.ARCHITECTURES)
    assert modules and all(any(m == s or m.endswith("." + s) for s in suffixes) for m in modules)
    assert any(m.endswith("to_qkv_mlp_proj") for m in modules) and any(m.endswith("ff.linear_in") for m in modules)
    transformer = _transformer(tiny, family)
    features, mask = _encoder(family).encode(["make it brighter"])
    inputs = flux2_edit_inputs(torch.randn(1, 5, adapter.config.text_dim), size=2)
    with torch.no_grad():
        base = transformer(**inputs)[0]
        with im.attach(transformer, adapter) as handle:
            handle.set_signal(features, None, mask)
            assert (transformer(**inputs)[0] - base).abs().max() > 1e-6


def test_family_mistakes_are_one_sentence(tiny):
    def config(*extra: str):
        return load_config(
            CONFIG, [f"model.pretrained={tiny['qwen-image-edit-2511']}", f"data.manifest={tiny['manifest']}", *extra]
        )

    assert recipe_for(config()).key == "qwen-image-edit-2511"  # told from the transformer
    assert recipe_for(config("model.family=qwen-image-edit-2509")).key == "qwen-image-edit-2509"
    with pytest.raises(ConfigError, match=r"model.family=flux.2-klein-4b, but the transformer is a Qwen-Image model"):
        recipe_for(config("model.family=flux.2-klein-4b"))
    with pytest.raises(ConfigError, match=r"sample.items renders FLUX.1 Kontext edits only"):
        recipe_for(config(f"sample.items=[{{instruction: x, references: [{tiny['manifest']}]}}]"))
    with pytest.raises(ConfigError, match=r"ComfyUI single files are read for FLUX.1 Kontext only"):
        load_config(CONFIG, [
            "model.pretrained=null", f"model.diffusion_model={tiny['manifest']}", f"model.t5={tiny['manifest']}",
            f"model.clip={tiny['manifest']}", f"model.vae={tiny['manifest']}", f"model.comfyui_path={tiny['root']}",
            f"data.manifest={tiny['manifest']}", "model.family=flux.2-klein-4b",
        ])  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_latents_are_normalised_and_packed_as_the_pipeline_does(tiny, family):
    """The trainer's posterior, normalisation and tokens equal the diffusers pipeline's own
    ``_encode_vae_image`` and ``_pack_latents`` (called on a stand-in for the pipeline object)."""
    from types import SimpleNamespace

    from diffusers import Flux2KleinPipeline, QwenImageEditPlusPipeline

    from training.families import load_family_folder, recipe_of

    recipe = recipe_of(family)
    vae = load_family_folder(tiny[family], recipe, parts=("vae",), dtype=torch.float32).vae
    config = load_config(CONFIG, [f"model.pretrained={tiny[family]}", f"data.manifest={tiny['manifest']}"])
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        mean, _ = recipe.posterior(vae, pixels)
        ours = recipe.tokens(recipe.latent_norm(config)(mean[0].float()))
        if family.startswith("qwen"):
            pipe = SimpleNamespace(vae=vae, latent_channels=16)
            latents = QwenImageEditPlusPipeline._encode_vae_image(pipe, pixels[:, :, None], None)
            theirs = QwenImageEditPlusPipeline._pack_latents(latents, 1, 16, *latents.shape[3:])
        else:
            pipe = SimpleNamespace(vae=vae, _patchify_latents=Flux2KleinPipeline._patchify_latents)
            theirs = Flux2KleinPipeline._pack_latents(Flux2KleinPipeline._encode_vae_image(pipe, pixels, None))
    torch.testing.assert_close(ours, theirs[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_transformer_is_called_as_the_edit_pipeline_calls_it(tiny, family):
    """The trainer's target + reference layout and keyword arguments give the transformer's output for
    the pipeline's own inputs (``tiny_families.qwen_edit_inputs`` / ``flux2_edit_inputs``), bit for bit."""
    from training.families import recipe_of

    recipe, transformer = recipe_of(family), _transformer(tiny, family)
    text = torch.randn(2, 5, TINY_FAMILIES[family][1])
    if family.startswith("qwen"):
        mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
        theirs = qwen_edit_inputs(text, mask, size=2)
    else:
        mask, theirs = None, flux2_edit_inputs(text, size=2)
    layout = recipe.layout((32, 32), 1, text.shape[1])  # 32 px: a 2x2 token grid, as size=2
    ours = recipe.transformer_kwargs(
        hidden_states=theirs["hidden_states"],
        text=text,
        pooled=None,
        sigma=theirs["timestep"],
        img_ids=layout.get("img_ids"),
        txt_ids=layout.get("txt_ids"),
        guidance=None,
        text_mask=mask,
        img_shapes=layout.get("img_shapes"),
    )
    with torch.no_grad():
        assert torch.equal(transformer(**ours)[0], transformer(**theirs)[0])
