"""A council saved as a plain LoRA loads in core ComfyUI (LoraLoader) and equals the pack's fixed mode."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from safetensors import safe_open

from .comfy_tiny import run_comfy
from .test_patched_model import inputs, load

ATOL = 1e-4


def council_of(adapter, seed: int) -> Any:
    g = torch.Generator().manual_seed(seed)
    return adapter.route(torch.randn(1, 20, 64, generator=g), torch.randn(1, 32, generator=g), ["a red hat"])


def save(setup, adapter, council, prefix="instructmole/test", rank="exact", lora=True, ls=1.0, es=1.0) -> tuple:
    node = setup["nodes"].export_nodes.SaveCouncilLora
    return node.execute(adapter, council, prefix, rank, lora, ls, es, "fp32").result


def core_lora_loader(base, name: str, strength: float = 1.0):
    """ComfyUI's own LoraLoaderModelOnly node, reading the file from models/loras by name."""
    import nodes as comfy_nodes

    return comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(base, name, strength)[0]


@pytest.mark.parametrize(("include_lora", "lora_strength", "expert_strength"), [(True, 0.5, 1.5), (False, 1.0, 1.0)])
def test_core_lora_loader_equals_fixed_mode(setup, include_lora, lora_strength, expert_strength):
    model, adapter = load(setup, lora=lora_strength if include_lora else 0.0, experts=expert_strength)
    council = council_of(adapter, seed=3)
    fixed = setup["nodes"].council_nodes.ApplyCouncil.execute(model, council, "fixed").result[0]
    x = inputs(2, seed=9)
    want = run_comfy(fixed, **x)
    name, report = save(setup, adapter, council, lora=include_lora, ls=lora_strength, es=expert_strength)
    assert name.startswith("instructmole/test_") and name.endswith("_.safetensors")
    assert "largest relative error 0.000e+00" in report
    got = run_comfy(core_lora_loader(setup["base"], name), **x)
    assert (want - run_comfy(setup["base"], **x)).abs().max() > 1e-3  # the council really acts
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_load_lora_for_models_with_an_svd_file_is_close_and_states_its_error(setup):
    import comfy.sd
    import comfy.utils
    import folder_paths

    model, adapter = load(setup, lora=0.0)
    council = council_of(adapter, seed=4)
    fixed = setup["nodes"].council_nodes.ApplyCouncil.execute(model, council, "fixed").result[0]
    x = inputs(2, seed=10)
    want, base = run_comfy(fixed, **x), run_comfy(setup["base"], **x)
    name, report = save(setup, adapter, council, prefix="svd/one", rank="2", lora=False)
    path = folder_paths.get_full_path("loras", name)
    with safe_open(path, "pt") as f:
        assert f.metadata()["instructmole_rank"] == "2"
    assert "2/8" in report  # rank 2 of the exact k·r = 2·4
    lora = comfy.utils.load_torch_file(path)
    got = run_comfy(comfy.sd.load_lora_for_models(setup["base"], None, lora, 1.0, 0.0)[0], **x)
    # Compressed: nearer the fixed mode than the base is, but not equal.
    assert 0 < (got - want).abs().max() < (want - base).abs().max()


def test_the_node_never_overwrites_and_stays_in_loras(setup):
    import folder_paths

    _, adapter = load(setup)
    council = council_of(adapter, seed=5)
    InputError = setup["nodes"].common.NodeInputError  # the pack's class (ComfyUI imports it by path)
    first, _ = save(setup, adapter, council, prefix="keep/mine")
    second, _ = save(setup, adapter, council, prefix="keep/mine")
    assert first != second
    root = folder_paths.get_folder_paths("loras")[0]
    user = os.path.join(root, "keep", "mine_00003_.safetensors")
    with open(user, "wb") as f:
        f.write(b"the user's own file")
    third, _ = save(setup, adapter, council, prefix="keep/mine")
    assert third == "keep/mine_00004_.safetensors"
    with open(user, "rb") as f:
        assert f.read() == b"the user's own file"
    assert first in folder_paths.get_filename_list("loras")
    with pytest.raises(InputError, match="outside the loras folder"):
        save(setup, adapter, council, prefix="../../escape")
    with pytest.raises(InputError, match="input 'rank'"):
        save(setup, adapter, council, rank="0")
    node = setup["nodes"].export_nodes.SaveCouncilLora
    assert "input 'rank'" in node.validate_inputs(rank="many")
    assert node.validate_inputs(rank=" 16 ") is True
    with pytest.raises(InputError, match="different adapter"):
        save(setup, load(setup, "second.safetensors")[1], council)


def test_fused_row_targets_load_as_rows_of_qkv_and_linear1(setup):
    """Experts on to_q (double) and to_k (single): ComfyUI's LoraLoader maps them onto rows of the
    fused ``qkv``/``linear1`` weights, as the pack's fixed mode does."""
    import folder_paths

    from tests.test_export import fused_row_adapter

    folder = folder_paths.get_folder_paths("instructmole")[0]
    fused_row_adapter(setup["transformer"]).save(os.path.join(folder, "fused.safetensors"))
    model, adapter = load(setup, "fused.safetensors")
    council = council_of(adapter, seed=6)
    fixed = setup["nodes"].council_nodes.ApplyCouncil.execute(model, council, "fixed").result[0]
    x = inputs(2, seed=11)
    name, report = save(setup, adapter, council, prefix="fused/council")
    assert "transformer_blocks.0.attn.to_q" in report and "single_transformer_blocks.0.attn.to_k" in report
    got = run_comfy(core_lora_loader(setup["base"], name), **x)
    torch.testing.assert_close(got, run_comfy(fixed, **x), atol=ATOL, rtol=0)
