"""Bad input at the loader and routing nodes, inside a real ComfyUI: each is the node's one-line message.

What ComfyUI's own validation cannot catch (NaN passes its min/max check; a model of another
family or a LoRA part that does not fit its layer loads fine and fails, or is silently skipped,
only at sampling) is refused when the node runs, naming the input.
"""

from __future__ import annotations

import math
import os
from typing import Any

import pytest
import torch

from .test_nodes import error_of

NODE = "InstructMoLE Load Adapter"


def comfy_flux(unet_overrides: dict[str, Any]) -> Any:
    """A ComfyUI Flux of the tiny twin's size with other fields (weights left uninitialised: shapes only)."""
    import comfy.model_patcher
    import comfy.supported_models

    from instructmole.tiny import tiny_flux

    from .comfy_tiny import comfy_unet_config

    unet_config = {**comfy_unet_config(tiny_flux(0)), **unet_overrides}
    model = comfy.supported_models.Flux(unet_config).get_model({}, device=torch.device("cpu"))
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 1e308])
@pytest.mark.parametrize("which", ["lora_strength", "expert_strength"])
def test_non_finite_strength_names_the_input(setup, which, value):
    strengths = {"lora_strength": 1.0, "expert_strength": 1.0, which: value}
    msg = error_of(setup["nodes"].loaders.LoadAdapter.execute, setup["base"], "tiny.safetensors", **strengths)
    assert msg.startswith(f"{NODE}, input '{which}': {which}=")
    assert msg.endswith("choose a finite number from -10 to 10")


@pytest.mark.parametrize(
    ("overrides", "want"),
    [
        ({"in_channels": 96}, "the model takes 384 image input channels (like FLUX.1 Fill [dev])"),
        ({"context_in_dim": 48}, "the model reads T5 text features of width 48"),
        ({"vec_in_dim": 16}, "the model reads CLIP pooled vectors of width 16"),
    ],
)
def test_model_of_another_family_or_text_width(setup, overrides, want):
    msg = error_of(setup["nodes"].loaders.LoadAdapter.execute, comfy_flux(overrides), "tiny.safetensors", 1.0, 1.0)
    assert msg.startswith(f"{NODE}, input 'model': {want}")


def test_adapter_for_another_family(setup):
    import folder_paths

    from tests.helpers import random_adapter

    folder = folder_paths.get_folder_paths("instructmole")[0]
    random_adapter(setup["transformer"], base_model="flux.1-fill-dev").save(os.path.join(folder, "fill.safetensors"))
    msg = error_of(setup["nodes"].loaders.LoadAdapter.execute, setup["base"], "fill.safetensors", 1.0, 1.0)
    assert msg.startswith(f"{NODE}, input 'model': the model takes 64 image input channels")
    assert "made for FLUX.1 Fill [dev] (384)" in msg


@pytest.mark.parametrize("module", ["transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.proj_out"])
def test_lora_part_that_does_not_fit_its_layer(setup, module):
    """ComfyUI itself would log the shape mismatch at sampling and skip the patch: a silent change."""
    import folder_paths

    import instructmole as im

    folder = folder_paths.get_folder_paths("instructmole")[0]
    adapter = im.Adapter(setup["adapter"].model, dict(setup["adapter"].lora))
    linear = setup["transformer"].get_submodule(module)
    adapter.lora[f"transformer.{module}.lora_A.weight"] = torch.randn(2, linear.in_features + 3)
    adapter.lora[f"transformer.{module}.lora_B.weight"] = torch.randn(linear.out_features, 2)
    adapter.save(os.path.join(folder, "bad_lora_shape.safetensors"))
    msg = error_of(setup["nodes"].loaders.LoadAdapter.execute, setup["base"], "bad_lora_shape.safetensors", 1.0, 1.0)
    assert msg.startswith(f"{NODE}, input 'model': the adapter's LoRA part 'transformer.{module}' is ")
    assert f"is {linear.in_features + 3}->{linear.out_features} but its layer in this model is " in msg


def test_load_kontext_bad_file_and_dtype(setup):
    import folder_paths

    loaders = setup["nodes"].loaders
    node = "InstructMoLE Load Kontext + Adapter"
    folder = folder_paths.get_folder_paths("diffusion_models")[0]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "not_a_model.safetensors"), "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + b" " * 14)
    msg = error_of(loaders.LoadKontext.execute, "not_a_model.safetensors", "default", "tiny.safetensors", 1.0, 1.0)
    assert msg.startswith(f"{node}, input 'unet_name': ComfyUI could not load 'not_a_model.safetensors'")
    msg = error_of(loaders.LoadKontext.execute, "not_a_model.safetensors", "fp4", "tiny.safetensors", 1.0, 1.0)
    assert msg == f"{node}, input 'weight_dtype': 'fp4' is not one of default, fp8_e4m3fn, fp8_e4m3fn_fast, fp8_e5m2"


class NoPooledClip:
    """A text encoder without a pooled output (as a T5-only CLIP loader gives)."""

    def tokenize(self, text: str, **_: Any) -> dict:
        return {"t5xxl": [[(0, 1.0)]]}

    def encode_from_tokens(self, tokens: dict, return_pooled: bool = False) -> tuple:
        return torch.zeros(1, 4, 64), None


def test_text_encoder_without_pooled_output(setup):
    nodes = setup["nodes"].routing_nodes
    want = "this text encoder gives no pooled output; load the FLUX text encoders (T5-XXL + CLIP-L)"
    assert error_of(nodes.TextEncode.execute, NoPooledClip(), "make it red") == (
        f"InstructMoLE Text Encode, input 'clip': {want}"
    )
    msg = error_of(nodes.Route.execute, setup["adapter"], clip=NoPooledClip(), text="make it red")
    assert msg == f"InstructMoLE Route, input 'clip': {want}"


def _save_variant(setup, name: str, edit) -> str:
    """The tiny adapter file with one edit to its tensors, saved under ``name`` in models/instructmole."""
    import folder_paths
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    folder = folder_paths.get_folder_paths("instructmole")[0]
    source = os.path.join(folder, "tiny.safetensors")
    with safe_open(source, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(source)
    edit(tensors)
    save_file(tensors, os.path.join(folder, name), metadata=metadata)
    return name


def test_adapter_file_with_nan_names_the_tensor(setup):
    key = "mole.transformer_blocks.1.ff.net.2.B"

    def poison(tensors):
        tensors[key][0, 0, 0] = float("nan")

    name = _save_variant(setup, "nan.safetensors", poison)
    msg = error_of(setup["nodes"].loaders.LoadAdapter.execute, setup["base"], name, 1.0, 1.0)
    assert msg.startswith(f"{NODE}, input 'adapter': nan.safetensors: tensor '{key}' holds NaN")


def test_fp8_adapter_file_loads_and_equals_its_upcast(setup):
    """An fp8 export is cast at load (never a RuntimeError at the first forward) and computes what its
    bf16 upcast computes."""
    from .comfy_tiny import run_comfy
    from .test_patched_model import inputs

    def to_fp8(tensors):
        for k, v in tensors.items():
            if k.startswith("mole."):
                tensors[k] = v.to(torch.float8_e4m3fn)

    def via_fp8(tensors):
        to_fp8(tensors)
        for k, v in tensors.items():
            if k.startswith("mole."):
                tensors[k] = v.to(torch.bfloat16)

    loaders = setup["nodes"].loaders
    outs = []
    for name, edit in (("fp8.safetensors", to_fp8), ("fp8_upcast.safetensors", via_fp8)):
        model, adapter = loaders.LoadAdapter.execute(setup["base"], _save_variant(setup, name, edit), 1.0, 1.0).result
        assert adapter.model.layer("transformer_blocks.0.ff.net.2").A.dtype == torch.float32  # the widest present
        outs.append(run_comfy(model, **inputs(2)))
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
