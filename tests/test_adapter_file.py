"""The adapter file: round trips, reference import, and clear errors for every bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import instructmole as im
from instructmole.adapter import FORMAT_VERSION
from instructmole.experts import council_delta
from instructmole.fold import fold_council
from instructmole.reference import write_reference_layout
from tests.helpers import random_adapter
from tests.test_attach import add_lora


def same_adapter(a: im.Adapter, b: im.Adapter) -> None:
    ta, tb = a.tensors(), b.tensors()
    assert set(ta) == set(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert a.config == b.config


def test_round_trip_keeps_everything(tmp_path, transformer, adapter):
    add_lora(adapter, transformer)
    adapter.metadata["note"] = "hello"
    path = adapter.save(tmp_path / "sub" / "a.safetensors")
    back = im.load_adapter(path)
    same_adapter(adapter, back)
    assert back.metadata == {"note": "hello"} and back.adapter_id == adapter.adapter_id
    assert [p.module for p in back.lora_parts()] == [p.module for p in adapter.lora_parts()]
    assert sorted(os.listdir(tmp_path / "sub")) == ["a.safetensors"]  # no temp files left


def test_adapter_loaded_under_inference_mode_routes_anywhere(tmp_path, adapter):
    """ComfyUI runs every node under torch.inference_mode(): loading there must not break routing."""
    path = adapter.save(tmp_path / "a.safetensors")
    with torch.inference_mode():
        loaded = im.load_adapter(path)
    text, pooled = torch.randn(1, 32, 64), torch.randn(1, 32)
    assert torch.equal(loaded.route(text, pooled).weights, adapter.route(text, pooled).weights)
    with torch.inference_mode():
        assert loaded.route(text, pooled).adapter_id == adapter.adapter_id


def test_file_layout_is_canonical_and_comfy_mappable(tmp_path, transformer, adapter):
    add_lora(adapter, transformer)
    keys = set(load_file(str(adapter.save(tmp_path / "a.safetensors"))))
    assert "mole.transformer_blocks.0.ff.net.2.A" in keys
    assert "mole.single_transformer_blocks.1.proj_out.gate" in keys
    assert "router.layers.1.0.to_kv.weight" in keys and "router.latents" in keys
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys
    assert "transformer.transformer_blocks.0.attn.to_q.alpha" in keys


def test_save_is_atomic_when_writing_fails(tmp_path, adapter, monkeypatch):
    path = adapter.save(tmp_path / "a.safetensors")
    before = path.read_bytes()

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr("instructmole.adapter.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        adapter.save(path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["a.safetensors"]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("missing", "does not exist; put it in models/instructmole or models/loras"),
        ("truncated", "is not a readable .safetensors file (truncated or corrupt?)"),
        ("foreign", "is a safetensors file but not an InstructMoLE adapter"),
        ("version", "has adapter format version '99', but this InstructMoLE reads version 1; update"),
        ("shape", "has shape (4, 128, 5) but the config needs (4, 128, 4)"),
        ("missing_tensor", "the adapter lacks tensor 'mole.transformer_blocks.0.ff.net.2.B'"),
        ("dtype", "has dtype torch.int64; adapter tensors must be floating point"),
        ("config", "carries an invalid config: top_k=9 cannot exceed num_experts=4"),
        ("lora", "has no matching 'transformer.x.lora_B.weight'"),
        ("family", "was made for 'flux.1-kontext-dev', not 'sdxl'; pick an adapter for this model"),
    ],
)
def test_bad_files_fail_with_one_clear_sentence(tmp_path, adapter, damage, message):
    path = adapter.save(tmp_path / "a.safetensors")
    tensors, meta = load_file(str(path)), _meta(path)
    expect = None
    if damage == "missing":
        path = tmp_path / "nope.safetensors"
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "foreign":
        save_file({"lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, str(path))
    elif damage == "version":
        save_file(tensors, str(path), metadata={**meta, "format_version": "99"})
    elif damage == "shape":
        tensors["mole.transformer_blocks.0.ff.net.2.A"] = torch.zeros(4, 128, 5)
        save_file(tensors, str(path), metadata=meta)
    elif damage == "missing_tensor":
        del tensors["mole.transformer_blocks.0.ff.net.2.B"]
        save_file(tensors, str(path), metadata=meta)
    elif damage == "dtype":
        tensors["router.latents"] = torch.zeros(1, 1, 32, dtype=torch.long)
        save_file(tensors, str(path), metadata=meta)
    elif damage == "config":
        cfg = json.loads(meta["config"])
        cfg["top_k"] = 9
        save_file(tensors, str(path), metadata={**meta, "config": json.dumps(cfg)})
    elif damage == "lora":
        tensors["transformer.x.lora_A.weight"] = torch.zeros(2, 3)
        save_file(tensors, str(path), metadata=meta)
    elif damage == "family":
        expect = "sdxl"
    with pytest.raises(im.AdapterError) as err:
        im.load_adapter(path, expect_base=expect)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def _meta(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_import_reference_checkpoint(tmp_path, transformer):
    adapter = random_adapter(transformer, token_routed=("single_transformer_blocks.1.proj_out",))
    lora_keys = {}
    add_lora(adapter, transformer)
    for k, v in adapter.lora.items():
        if not k.endswith(".alpha"):
            lora_keys[k] = v
    folder = write_reference_layout(im.Adapter(adapter.model, lora_keys), tmp_path / "ckpt", lora_alpha=6.0)
    # The reference folder holds exactly the documented files and key names.
    experts = torch.load(folder / "mole_experts.pt", weights_only=True)
    assert experts["transformer_blocks.0.ff.net.2.experts.3.left"].shape == (128, 4)
    assert experts["single_transformer_blocks.1.proj_out.gate.weight"].shape == (4, 160)  # token gate
    assert (
        "layers.0.1.3.weight"
        in torch.load(folder / "condition_type_embedder.pt", weights_only=True)["condition_type_embedder"]
    )
    imported = im.import_reference(folder)
    assert imported.config.layer("single_transformer_blocks.1.proj_out").routing == "token"
    assert imported.config.layer("transformer_blocks.0.ff.net.2").routing == "instruction"
    for name, layer in adapter.model.named_layers():
        assert torch.equal(imported.model.layer(name).A, layer.A)
        assert torch.equal(imported.model.layer(name).gate.weight, layer.gate.weight)
    assert set(imported.lora) == set(adapter.lora)  # alpha restored from the config
    text, pooled = torch.randn(2, 32, 64), torch.randn(2, 32)
    assert torch.equal(imported.route(text, pooled).weights, adapter.route(text, pooled).weights)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_import_refuses_pickles_that_are_not_plain_tensors(tmp_path, adapter):
    folder = write_reference_layout(adapter, tmp_path / "ckpt")
    torch.save({"x.experts.0.left": Evil()}, folder / "mole_experts.pt")
    with pytest.raises(
        im.AdapterError,
        match="refused 'mole_experts.pt': it holds objects other than plain tensors "
        r"\(it asks for posix.system\)",
    ):
        im.import_reference(folder)
    (folder / "mole_experts.pt").write_bytes(b"not a zip")
    with pytest.raises(im.AdapterError, match="not a readable torch file"):
        im.import_reference(folder)
    with pytest.raises(im.AdapterError, match="does not exist"):
        im.import_reference(tmp_path / "nowhere")


def test_fold_equals_council_path(adapter):
    council = adapter.route(torch.randn(1, 32, 64), torch.randn(1, 32))
    council = im.force(council, {1: 0.7}, where="single:0")  # uneven councils fold too
    deltas = fold_council(adapter.model, council)
    idx, w = council.compact()
    x = torch.randn(1, 9, 160)
    for row, name in enumerate(council.layers):
        layer = adapter.model.layer(name)
        xin = x[..., : layer.A.shape[1]]
        want = council_delta(xin, layer.A, layer.B, idx[0, row], w[0, row], adapter.config.scale)
        torch.testing.assert_close(xin @ deltas[name].t(), want, atol=1e-5, rtol=1e-5)
    assert "single_transformer_blocks.0.proj_out" in deltas
    assert not fold_council(adapter.model, im.scale(council, 0.0))  # empty councils fold to nothing


def test_config_validation_quotes_bad_values():
    with pytest.raises(im.ConfigError, match="top_k=9 cannot exceed num_experts=8"):
        im.MoLEConfig.for_flux(1, 1, 64, top_k=9)
    with pytest.raises(im.ConfigError, match="rank=0 must be a positive integer"):
        im.MoLEConfig.for_flux(1, 1, 64, rank=0)
    with pytest.raises(im.ConfigError, match="unknown key 'num_expert'"):
        im.MoLEConfig.from_dict({"layers": [], "num_expert": 8})
    with pytest.raises(ValueError, match="not inside a transformer block"):
        im.LayerSpec("x_embedder", 4, 4)
    cfg = im.MoLEConfig.for_flux(2, 3, 64, token_routed=("single_transformer_blocks.2.proj_out",))
    assert im.MoLEConfig.from_json(cfg.to_json()) == cfg
    assert cfg.instruction_layers[-1] == "single_transformer_blocks.1.proj_out" and FORMAT_VERSION == 1


def test_saved_files_get_the_ordinary_mode_not_the_temp_files(tmp_path, adapter):
    """The atomic save goes through a private temp file; the adapter itself must be readable by
    others as any new file (a ComfyUI running as another user loads it)."""
    import os

    mask = os.umask(0o022)
    try:
        path = adapter.save(tmp_path / "a.safetensors")
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temp file left behind


def test_a_loaded_adapter_keeps_its_weights_when_the_file_is_overwritten_in_place(tmp_path):
    """``cp new.safetensors adapter.safetensors`` writes into the same file: a loaded adapter must not
    see the new bytes (it would change, or crash if the file shrank, under a running ComfyUI)."""
    import shutil

    path = random_adapter(seed=41).save(tmp_path / "a.safetensors")
    loaded = im.load_adapter(path)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    shutil.copyfile(random_adapter(seed=42).save(tmp_path / "b.safetensors"), path)  # same inode, new bytes
    assert im.load_adapter(path).adapter_id != random_adapter(seed=41).adapter_id  # the file did change
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
