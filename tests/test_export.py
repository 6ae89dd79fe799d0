"""A council exported as a plain LoRA: exact to fp32 rounding, SVD errors as stated, diffusers loads it."""

from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import instructmole as im
from instructmole.cli import main
from instructmole.export import ExportError, council_lora, export_council_lora, parse_rank
from instructmole.fold import iter_fold
from instructmole.tiny import tiny_flux
from tests.helpers import flux_inputs, random_adapter

LORA_MODULES = (
    "transformer_blocks.0.attn.to_q",
    "single_transformer_blocks.1.proj_out",
    "transformer_blocks.1.ff.net.2",
)


def with_lora(adapter: im.Adapter, transformer) -> im.Adapter:
    """A plain-LoRA part: a fused-row module (to_q) and two Linears the council also targets."""
    g = torch.Generator().manual_seed(9)
    for name in LORA_MODULES:
        mod = transformer.get_submodule(name)
        adapter.lora[f"transformer.{name}.lora_A.weight"] = torch.randn(2, mod.in_features, generator=g) * 0.2
        adapter.lora[f"transformer.{name}.lora_B.weight"] = torch.randn(mod.out_features, 2, generator=g) * 0.2
        adapter.lora[f"transformer.{name}.alpha"] = torch.tensor(4.0)
    return adapter


@pytest.fixture
def lora_adapter(transformer) -> im.Adapter:
    return with_lora(random_adapter(transformer, seed=3), transformer)


def routed(adapter: im.Adapter, seed: int = 0, batch: int = 1) -> im.Council:
    g = torch.Generator().manual_seed(seed)
    return adapter.route(
        torch.randn(batch, 12, 64, generator=g), torch.randn(batch, 32, generator=g), ["a cat"] * batch
    )


def delta(tensors: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    base = f"transformer.{module}"
    down, up = tensors[f"{base}.lora_A.weight"].double(), tensors[f"{base}.lora_B.weight"].double()
    return float(tensors[f"{base}.alpha"]) / down.shape[0] * (up @ down)


def test_exact_export_is_the_folded_update(adapter):
    council = im.force(routed(adapter), [3])  # a hand-forced council: 3 joins every layer's council
    out = council_lora(adapter, council, expert_strength=0.7)
    strong = im.overrides.with_strength(council, 0.7)
    want = {name: dw for name, dw in iter_fold(adapter.model, strong)}
    assert {layer.module for layer in out.layers} == set(want)
    for name, dw in want.items():
        torch.testing.assert_close(delta(out.tensors, name).float(), dw, atol=1e-6, rtol=1e-5)
        layer = next(x for x in out.layers if x.module == name)
        members = int((council.weights[0, council.layers.index(name)] != 0).sum())
        assert layer.rank == layer.full_rank == members * adapter.config.rank and layer.error == 0


def test_svd_error_is_the_measured_error_and_falls_with_rank(lora_adapter):
    council = routed(lora_adapter)
    exact = council_lora(lora_adapter, council, rank="exact", with_lora=True)
    errors = []
    for rank in (1, 2, 4, 6):
        out = council_lora(lora_adapter, council, rank=rank, with_lora=True)
        for layer in out.layers:
            assert layer.rank == min(rank, layer.full_rank)
            want, got = delta(exact.tensors, layer.module), delta(out.tensors, layer.module)
            measured = float((got - want).norm() / want.norm())
            assert abs(measured - layer.error) < 1e-5, (layer, measured)
        errors.append([layer.error for layer in out.layers])
    for low, high in itertools.pairwise(errors):
        assert all(b <= a + 1e-9 for a, b in zip(low, high, strict=True))
    assert max(errors[0]) > 0.05 and max(errors[-1]) < max(errors[0])
    # Where the plain LoRA shares a Linear with the council, the pair holds both (rank k·r + 2).
    both = next(x for x in exact.layers if x.module == "transformer_blocks.1.ff.net.2")
    assert both.parts == "council+lora" and both.full_rank == 2 * lora_adapter.config.rank + 2


def kontext_pipe(transformer):
    """A FluxKontextPipeline around a copy of ``transformer`` (no text encoders or VAE: only LoRA
    loading and the transformer are used)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline

    from instructmole.kontext import FLUX_SCHEDULER

    return FluxKontextPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=copy.deepcopy(transformer),
    )


def test_diffusers_load_lora_weights_equals_fixed_mode(transformer, lora_adapter, tmp_path):
    council = routed(lora_adapter, seed=2)
    x = flux_inputs(batch=2, seed=3)
    with torch.no_grad():
        base = transformer(**x)[0]
        with im.attach(transformer, lora_adapter, council=council, lora_strength=0.5, expert_strength=1.5):
            want = transformer(**x)[0]
    path = tmp_path / "council.safetensors"
    export_council_lora(lora_adapter, council, path, with_lora=True, lora_strength=0.5, expert_strength=1.5)
    pipe = kontext_pipe(transformer)
    pipe.load_lora_weights(str(path), adapter_name="council")
    with torch.no_grad():
        got = pipe.transformer(**x)[0]
    assert (want - base).abs().max() > 1e-3  # the council really acts
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_file_metadata_and_no_overwrite(adapter, tmp_path):
    council = routed(adapter)
    path = tmp_path / "c.safetensors"
    out = export_council_lora(adapter, council, path, rank=3)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["instructmole_adapter_id"] == adapter.adapter_id and meta["instructmole_rank"] == "3"
    assert meta["instructmole_council_label"] == "a cat"
    assert json.loads(meta["instructmole_errors"]) == {x.module: x.error for x in out.layers}
    assert im.Council.from_dict(json.loads(meta["instructmole_council"])).weights.equal(council.weights)
    assert set(load_file(str(path))) == set(out.tensors)
    with pytest.raises(ExportError, match="exists already"):
        export_council_lora(adapter, council, path)
    export_council_lora(adapter, council, path, overwrite=True, rank="exact")
    assert "largest relative error" in out.report()
    half = council_lora(adapter, council, dtype="bf16")
    assert {v.dtype for k, v in half.tensors.items() if not k.endswith(".alpha")} == {torch.bfloat16}


def test_bad_inputs_are_one_sentence(adapter, transformer, tmp_path):
    council = routed(adapter)
    other = random_adapter(transformer, seed=5)
    with pytest.raises(im.InstructMoLEError, match="different adapter"):
        council_lora(other, council)
    with pytest.raises(ExportError, match=r"council.row\(i\)"):
        council_lora(adapter, routed(adapter, batch=2))
    for bad in (0, -1, "0", "big", 2.5, True, 5000):
        with pytest.raises(ExportError, match="rank"):
            council_lora(adapter, council, rank=bad)
    assert parse_rank("exact") is None and parse_rank(" 8 ") == 8
    with pytest.raises(ExportError, match="nothing to export"):
        council_lora(adapter, council, expert_strength=0.0)
    with pytest.raises(ExportError, match=r"\.safetensors"):
        export_council_lora(adapter, council, tmp_path / "c.pt")
    with pytest.raises(ExportError, match="dtype"):
        council_lora(adapter, council, dtype="int8")


def test_cli_export_lora(lora_adapter, tmp_path, capsys):
    adapter_path, council_path, out = tmp_path / "a.safetensors", tmp_path / "c.json", tmp_path / "o.safetensors"
    lora_adapter.save(adapter_path)
    council = routed(lora_adapter)
    council_path.write_text(json.dumps(council.to_dict()))
    args = ["export-lora", str(adapter_path), str(council_path), str(out), "--rank", "3", "--with-lora"]
    assert main([*args, "--strength", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "transformer_blocks.1.ff.net.2" in printed and "largest relative error" in printed
    want = council_lora(lora_adapter, council, rank=3, with_lora=True, lora_strength=0.5)
    got = load_file(str(out))
    for key, value in want.tensors.items():
        torch.testing.assert_close(got[key], value)
    assert main(args) == 2  # exists already
    assert "exists already" in capsys.readouterr().err
    assert (
        main(["export-lora", str(adapter_path), str(council_path), str(tmp_path / "p.safetensors"), "--rank", "0"]) == 2
    )


def test_reference_shapes_stay_small():
    """A FLUX-sized layer is compressed without building out x in: only QR of the factors."""
    down, up = torch.randn(32, 15360), torch.randn(3072, 32)
    from instructmole.export import _compress

    d, u, err = _compress(down, up, 8)
    assert d.shape == (8, 15360) and u.shape == (3072, 8) and 0 < err < 1


def test_tiny_flux_fixture_is_fp32():
    assert next(tiny_flux(0).parameters()).dtype == torch.float32


def fused_row_adapter(transformer) -> im.Adapter:
    """Experts on Linears ComfyUI fuses (a double block's to_q, a single block's to_k): both loaders
    know them by their diffusers names, ComfyUI as rows of ``qkv``/``linear1``."""
    from dataclasses import replace

    from instructmole.config import LayerSpec
    from instructmole.tiny import tiny_mole_config
    from tests.helpers import randomize

    cfg = tiny_mole_config(transformer)
    extra = (
        LayerSpec("transformer_blocks.0.attn.to_q", 32, 32),
        LayerSpec("single_transformer_blocks.0.attn.to_k", 32, 32),
    )
    torch.manual_seed(4)
    return randomize(im.Adapter(im.InstructMoLE(replace(cfg, layers=cfg.layers + extra), init="lora")), seed=4)


def test_fused_row_targets_export_by_name_and_diffusers_loads_them(transformer, tmp_path):
    adapter = fused_row_adapter(transformer)
    council = routed(adapter, seed=6)
    x = flux_inputs(batch=1, seed=4)
    with torch.no_grad(), im.attach(transformer, adapter, council=council):
        want = transformer(**x)[0]
    path = tmp_path / "fused.safetensors"
    out = export_council_lora(adapter, council, path)
    assert {"transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k"} <= {x.module for x in out.layers}
    pipe = kontext_pipe(transformer)
    pipe.load_lora_weights(str(path))
    with torch.no_grad():
        got = pipe.transformer(**x)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_token_routed_layers_are_refused(transformer):
    from instructmole.tiny import tiny_mole_config

    cfg = tiny_mole_config(transformer, token_routed=("single_transformer_blocks.1.proj_out",))
    adapter = im.Adapter(im.InstructMoLE(cfg))
    with pytest.raises(ExportError, match="per token"):
        council_lora(adapter, routed(adapter))
