"""Issue 9 for the file side: bad configs, adapter files, reference folders, command lines and
interrupted saves never crash, poison or silently change anything.

Each class of bad input is checked at the API (one ``InstructMoLEError`` sentence naming the input)
and where it reaches the command line (exit 2 and one ``error:`` line, or 130 for Ctrl-C).
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import instructmole as im
from instructmole.cli import main
from instructmole.config import MAX_LAYERS
from instructmole.files import STALE_AFTER_S, _host_tag, atomic_path, remove_stale_temps
from instructmole.model import InstructMoLE
from instructmole.reference import write_reference_layout
from tests.helpers import random_adapter

LORA_MODULE = "transformer.transformer_blocks.0.attn.to_q"
TEXT, POOLED = torch.randn(3, 32, 64, generator=torch.Generator().manual_seed(0)), torch.randn(3, 32)


@pytest.fixture(scope="module")
def small() -> im.Adapter:
    """The tiny random adapter with a plain-LoRA pair, shared (tests copy before changing it)."""
    adapter = random_adapter()
    g = torch.Generator().manual_seed(3)
    adapter.lora[f"{LORA_MODULE}.lora_A.weight"] = torch.randn(3, 32, generator=g) * 0.1
    adapter.lora[f"{LORA_MODULE}.lora_B.weight"] = torch.randn(32, 3, generator=g) * 0.1
    adapter.lora[f"{LORA_MODULE}.alpha"] = torch.tensor(6.0)
    return adapter


def saved(adapter: im.Adapter, folder: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]]:
    path = adapter.save(folder / "a.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return path, load_file(str(path)), meta


def one_sentence(err: BaseException) -> str:
    text = str(err)
    assert isinstance(err, im.InstructMoLEError) and "\n" not in text and len(text) < 600, text
    return text


def cli(argv: list[str], capsys) -> tuple[int, str]:
    """Run the CLI in-process: (status, stderr), stderr checked to be one 'error:' line when failing."""
    status = main(argv)
    err = capsys.readouterr().err
    if status:
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return status, err


# ---- 1. config ------------------------------------------------------------------------------------


def base_config() -> dict:
    return json.loads(im.MoLEConfig.for_flux(1, 1, 32, num_experts=4, top_k=2, rank=4).to_json())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"router_dropout": "0.1"}, "router_dropout='0.1' must be a number"),
        ({"num_experts": 2**63}, "num_experts=9223372036854775808 is too large: it must be an integer from 1 to 256"),
        ({"router_depth": 20000}, "router_depth=20000 is too large"),
        ({"alpha": float("nan")}, "alpha=nan must be a finite number"),
        ({"alpha": float("inf")}, "alpha=inf must be a finite number"),
        ({"alpha": 1e308}, "alpha=1e+308 is too large: it must be a number greater than 0 and at most 1e+06"),
        ({"alpha": "8"}, "alpha='8' must be a number"),
        ({"alpha": True}, "alpha=True must be a number"),
        ({"rank": 4.0}, "rank=4.0 must be an integer from 1 to 4096"),
        ({"top_k": True}, "top_k=True must be an integer"),
        ({"gate_noise": 1}, "gate_noise=1 must be true or false"),
        ({"base_model": ""}, "base_model='' must be a non-empty string"),
        ({"extra": [1]}, "extra=[1] must be an object"),
        ({"layers": {"a": 1}}, "config 'layers' must be a list of layer objects, got dict"),
        ({"layers": [7]}, "config 'layers' entry 0 is 7, not an object"),
        ({"layers": [{"name": 3, "in_features": 4, "out_features": 4}]}, "layer name 3 must be a string"),
        ({"layers": [{"name": "transformer_blocks.0.x", "in_features": 4}]}, "entry 0 lacks 'out_features'"),
        (
            {"layers": [{"name": "transformer_blocks.0.x", "in_features": 4, "out_features": 4, "bias": 1}]},
            "entry 0 has unknown key 'bias'",
        ),
        (
            {"layers": [{"name": "x_embedder", "in_features": 4, "out_features": 4}]},
            "is not inside a transformer block",
        ),
        (
            {"layers": [{"name": "transformer_blocks.0.x", "in_features": 2**21, "out_features": 4}]},
            "in_features=2097152 is too large",
        ),
        ({"text_length": 0}, "text_length=0 must be a positive integer (from 1 to 65536)"),
    ],
)
def test_config_fields_are_checked_before_use(change, message):
    with pytest.raises(im.ConfigError) as err:
        im.MoLEConfig.from_dict({**base_config(), **change})
    assert message in one_sentence(err.value)


def test_extra_must_stay_small_and_flat():
    """A 900-deep ``extra`` parses, but copying or writing it would blow Python's recursion limit later."""
    text = json.dumps({**base_config(), "extra": {"a": 1}}).replace('{"a": 1}', '{"a": ' + "[" * 900 + "]" * 900 + "}")
    with pytest.raises(im.ConfigError, match="extra is nested more than 32 levels deep"):
        im.MoLEConfig.from_json(text)
    with pytest.raises(im.ConfigError, match="provenance notes may take"):
        im.MoLEConfig.from_dict({**base_config(), "extra": {"a": "x" * 2**21}})
    with pytest.raises(im.ConfigError, match="extra cannot be stored as JSON"):
        im.MoLEConfig.from_dict({**base_config(), "extra": {"a": {1, 2}}})
    with pytest.raises(im.ConfigError, match="num_experts=<an integer of 16610 bits> is too large"):
        im.MoLEConfig.from_dict({**base_config(), "num_experts": 10**5000})


def test_config_json_and_lookups_never_raise_foreign_errors():
    for text in ("", "{", "[1]", "[" * 100_000, b"\xff\xfe", "NaN", None, 3):
        with pytest.raises(im.ConfigError):
            im.MoLEConfig.from_json(text)
    cfg = im.MoLEConfig.from_dict(base_config())
    with pytest.raises(im.ConfigError, match="layer 'nope' is not in this adapter"):
        cfg.layer("nope")
    assert im.MoLEConfig.from_dict({**base_config(), "alpha": 8}).alpha == 8.0  # an int alpha is fine


def test_hostile_sizes_fail_fast():
    """Too many layers, or layers too big together: refused from the numbers, before anything is built."""
    many = [
        {"name": f"transformer_blocks.{i}.ff.net.2", "in_features": 2**20, "out_features": 2**20} for i in range(64)
    ]
    start = time.perf_counter()
    with pytest.raises(im.ConfigError, match="parameters, more than the 17,179,869,184 an adapter may hold"):
        im.MoLEConfig.from_dict({**base_config(), "layers": many, "rank": 4096})
    with pytest.raises(im.ConfigError, match=f"at most {MAX_LAYERS}"):
        im.MoLEConfig.from_dict({**base_config(), "layers": many * 70})
    assert time.perf_counter() - start < 0.5


def test_parameter_count_matches_the_model():
    cfg = im.MoLEConfig.for_flux(
        2,
        2,
        32,
        num_experts=4,
        top_k=2,
        rank=4,
        text_dim=64,
        router_dim=32,
        router_heads=2,
        router_head_dim=8,
        token_routed=("single_transformer_blocks.1.proj_out",),
    )
    with torch.device("meta"):
        counts = InstructMoLE(cfg).num_parameters()
    assert cfg.parameter_count() == sum(counts.values())


def test_many_big_layers_with_wrong_tensors_fail_in_milliseconds(tmp_path, small):
    """A file whose config asks for thousands of layers fails on the first missing tensor, without
    building the (meta) model first."""
    _, tensors, meta = saved(small, tmp_path)
    cfg = json.loads(meta["config"])
    cfg["layers"] = [
        {"name": f"transformer_blocks.{i}.ff.net.2", "in_features": 8192, "out_features": 3072} for i in range(3000)
    ]
    path = tmp_path / "big.safetensors"
    save_file(tensors, str(path), metadata={**meta, "config": json.dumps(cfg)})
    im.load_adapter(tmp_path / "a.safetensors")  # warm: the first meta module of a process costs ~1 s once
    start = time.perf_counter()
    with pytest.raises(
        im.AdapterError, match=r"lacks tensor 'mole\.transformer_blocks\.2\.ff\.net\.2\.A' \(and 8993 more\)"
    ):
        im.load_adapter(path)
    assert time.perf_counter() - start < 0.5  # ~0.03 s on an idle 2-core machine; margin for a busy one


# ---- 2. adapter files ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize(
    "key", ["mole.transformer_blocks.0.ff.net.2.B", "router.latents", f"{LORA_MODULE}.lora_B.weight"]
)
def test_non_finite_tensors_are_refused_by_name(tmp_path, small, capsys, key, value):
    path, tensors, meta = saved(small, tmp_path)
    bad = tensors[key].clone()
    bad.view(-1)[-1] = value  # the very last element: the check must read every one
    save_file({**tensors, key: bad}, str(path), metadata=meta)
    with pytest.raises(im.AdapterError) as err:
        im.load_adapter(path)
    text = one_sentence(err.value)
    assert f"tensor {key!r} holds {'NaN' if value != value else 'infinite values'}" in text
    status, stderr = cli(["inspect", str(path)], capsys)
    assert status == 2 and key in stderr


def test_absurd_magnitudes_are_refused(tmp_path, small):
    """Finite but huge (a flipped exponent bit): it would route every image to NaN."""
    path, tensors, meta = saved(small, tmp_path)
    key = "router.layers.0.0.to_out.weight"
    save_file({**tensors, key: tensors[key] * 1e30}, str(path), metadata=meta)
    with pytest.raises(im.AdapterError, match=re.escape(f"tensor {key!r} holds values up to")):
        im.load_adapter(path)


def test_nan_from_tensors_too(small):
    tensors = small.tensors()
    tensors["mole.single_transformer_blocks.0.proj_out.gate"] = torch.full_like(
        tensors["mole.single_transformer_blocks.0.proj_out.gate"], float("nan")
    )
    with pytest.raises(im.AdapterError, match=re.escape("'mole.single_transformer_blocks.0.proj_out.gate' holds NaN")):
        im.Adapter.from_tensors(small.config, tensors)


@pytest.mark.parametrize(
    ("dtypes", "want"),
    [
        ({"router.": torch.float8_e4m3fn}, torch.float32),  # fp8 router + fp32 experts -> fp32
        ({"": torch.float8_e4m3fn}, torch.bfloat16),  # all fp8 -> bf16
        ({"mole.": torch.float16, "router.": torch.bfloat16}, torch.float32),  # fp16 + bf16 -> fp32
        ({"mole.transformer_blocks.0": torch.bfloat16}, torch.float32),  # one layer differs
    ],
)
def test_fp8_and_mixed_dtypes_load_as_one_dtype_and_route_like_the_upcast(tmp_path, small, dtypes, want):
    _, tensors, meta = saved(small, tmp_path)
    mole = {k: v for k, v in tensors.items() if k.startswith(("mole.", "router."))}
    for k, v in mole.items():
        for prefix, dtype in dtypes.items():
            if k.startswith(prefix):
                mole[k] = v.to(dtype)
    mixed = tmp_path / "mixed.safetensors"
    save_file({**tensors, **mole}, str(mixed), metadata=meta)
    upcast = tmp_path / "upcast.safetensors"
    save_file({**tensors, **{k: v.to(want) for k, v in mole.items()}}, str(upcast), metadata=meta)
    a, b = im.load_adapter(mixed), im.load_adapter(upcast)
    assert {p.dtype for p in a.model.parameters()} == {want}
    ca, cb = a.route(TEXT.to(want), POOLED.to(want)), b.route(TEXT.to(want), POOLED.to(want))
    assert torch.equal(ca.probs, cb.probs) and torch.equal(ca.weights, cb.weights)
    assert a.adapter_id == b.adapter_id


def test_fp8_lora_is_brought_to_bf16_without_touching_the_experts(tmp_path, small):
    _, tensors, meta = saved(small, tmp_path)
    for part in ("lora_A.weight", "lora_B.weight"):
        tensors[f"{LORA_MODULE}.{part}"] = tensors[f"{LORA_MODULE}.{part}"].to(torch.float8_e5m2)
    save_file(tensors, str(tmp_path / "b.safetensors"), metadata=meta)
    back = im.load_adapter(tmp_path / "b.safetensors")
    assert back.lora[f"{LORA_MODULE}.lora_A.weight"].dtype == torch.bfloat16
    assert back.lora[f"{LORA_MODULE}.alpha"].dtype == torch.float32  # the alpha does not drag the LoRA up
    assert {p.dtype for p in back.model.parameters()} == {torch.float32}


@pytest.mark.parametrize(
    ("meta_change", "message"),
    [
        ({"config": "[1, 2]"}, "carries an invalid config: config must be a JSON object, got list"),
        ({"config": "{"}, "carries an invalid config: config is not valid JSON"),
        ({"config": None}, "has no 'config' in its metadata"),
        ({"format_version": "1.0"}, "has adapter format version '1.0'"),
        ({"format_version": None}, "has adapter format version ''"),
        ({"format": "INSTRUCTMOLE"}, "is a safetensors file but not an InstructMoLE adapter"),
    ],
)
def test_bad_metadata_values(tmp_path, small, meta_change, message):
    path, tensors, meta = saved(small, tmp_path)
    meta = {**meta, **meta_change}
    save_file(tensors, str(path), metadata={k: v for k, v in meta.items() if v is not None})
    with pytest.raises(im.AdapterError) as err:
        im.load_adapter(path)
    assert message in one_sentence(err.value)


def test_metadata_that_is_not_strings_is_refused(tmp_path):
    """safetensors itself refuses a header whose metadata holds numbers or objects: still one sentence."""
    header = json.dumps({"__metadata__": {"format": 1}, "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    path = tmp_path / "m.safetensors"
    raw = header.encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 4)
    with pytest.raises(im.AdapterError, match=re.escape("is not a readable .safetensors file")):
        im.load_adapter(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({f"{LORA_MODULE}.lora_A.weight": torch.zeros(3, 32, 1)}, "ranks that do not match"),
        (
            {f"{LORA_MODULE}.lora_A.weight": torch.zeros(0, 32), f"{LORA_MODULE}.lora_B.weight": torch.zeros(32, 0)},
            "has rank 0, in 32, out 32; the rank must be 1 to 4096",
        ),
        ({f"{LORA_MODULE}.alpha": torch.tensor([6.0])}, "it must be a 0-d (scalar) tensor"),
        ({f"{LORA_MODULE}.alpha": torch.tensor(-1.0)}, "is -1; it must be in (0, 1e+06]"),
        ({f"{LORA_MODULE}.alpha": torch.tensor(float("nan"))}, f"'{LORA_MODULE}.alpha' holds NaN"),
        ({f"{LORA_MODULE}.lora_A.weight": torch.zeros(3, 32, dtype=torch.int32)}, "must be floating point"),
        ({"transformer..lora_A.weight": torch.zeros(3, 32)}, "is neither an expert, the router nor a LoRA tensor"),
        ({"transformer.x.lora_down.weight": torch.zeros(3, 32)}, "is neither an expert, the router nor a LoRA tensor"),
        ({"transformer.x.alpha": torch.tensor(1.0)}, "'transformer.x.alpha' has no matching 'transformer.x.lora_A"),
        ({"transformer.x.lora_B.weight": torch.zeros(3, 2)}, "has no matching 'transformer.x.lora_A.weight'"),
    ],
)
def test_lora_part_checks(tmp_path, small, change, message):
    path, tensors, meta = saved(small, tmp_path)
    save_file({**tensors, **change}, str(path), metadata=meta)
    with pytest.raises(im.AdapterError) as err:
        im.load_adapter(path)
    assert message in one_sentence(err.value)


def test_bad_paths(tmp_path, small, capsys):
    for path, message in [
        ("", "adapter path is empty"),
        (tmp_path, "is a folder, not a file"),
        (str(tmp_path / "x\0y"), "contains a NUL character"),
        (42, "adapter path must be a file path, got int"),
    ]:
        with pytest.raises(im.AdapterError) as err:
            im.load_adapter(path)
        assert message in one_sentence(err.value)
    with pytest.raises(im.AdapterError, match="is a folder; name a file such as"):
        small.save(tmp_path)
    with pytest.raises(im.AdapterError, match="adapter output path is empty"):
        small.save("")
    with pytest.raises(im.AdapterError, match="device 'banana' is not a torch device"):
        im.load_adapter(small.save(tmp_path / "a.safetensors"), device="banana")
    assert cli(["inspect", ""], capsys) == (
        2,
        "error: adapter path is empty; pass the path of an adapter .safetensors file\n",
    )
    assert "is a folder" in cli(["inspect", str(tmp_path)], capsys)[1]


def test_route_checks_its_inputs(small):
    for text, pooled, message in [
        (TEXT[..., :32], POOLED, "route: text has shape (3, 32, 32), but this adapter reads"),
        (TEXT, POOLED[:2], "route: text has 3 instances but pooled has 2"),
        (TEXT, "pooled", "route: pooled must be a float tensor"),
        (TEXT.long(), POOLED, "route: text must be a float tensor"),
    ]:
        with pytest.raises(im.AdapterError) as err:
            small.route(text, pooled)
        assert message in one_sentence(err.value)
    token_only = im.MoLEConfig.from_dict(
        {
            **base_config(),
            "layers": [{"name": "transformer_blocks.0.x", "in_features": 4, "out_features": 4, "routing": "token"}],
        }
    )
    with pytest.raises(im.AdapterError, match="routes every layer per token, so there is no instruction council"):
        im.Adapter(InstructMoLE(token_only)).route(TEXT, POOLED)


def test_unexpected_reader_errors_become_adapter_errors(tmp_path, small, monkeypatch):
    path = small.save(tmp_path / "a.safetensors")

    class Weird:
        def __init__(self, *_a, **_k):
            raise TypeError("an unknown dtype the reader chokes on")

    monkeypatch.setattr("instructmole.formats.safe_open", Weird)
    with pytest.raises(im.AdapterError, match=r"is not a readable \.safetensors file .* unknown dtype"):
        im.load_adapter(path)


# ---- 3. reference import -------------------------------------------------------------------------


@pytest.fixture
def reference(tmp_path, small) -> Path:
    lora = {k: v for k, v in small.lora.items() if not k.endswith(".alpha")}
    return write_reference_layout(im.Adapter(small.model, lora), tmp_path / "ckpt", lora_alpha=6.0)


def edit_config(folder: Path, moe: dict | None = None, lora: dict | None = None, drop: tuple[str, ...] = ()) -> None:
    raw = json.loads((folder / "train_config.json").read_text())
    raw["moe_config"].update(moe or {})
    raw["lora_config"].update(lora or {})
    for key in drop:
        section, name = key.split(".")
        del raw[section][name]
    (folder / "train_config.json").write_text(json.dumps(raw))


def same_routing(a: im.Adapter, b: im.Adapter) -> bool:
    ca, cb = a.route(TEXT, POOLED), b.route(TEXT, POOLED)
    return torch.equal(ca.probs, cb.probs) and torch.equal(ca.weights, cb.weights)


def test_write_reference_layout_records_every_setting(reference, small):
    raw = json.loads((reference / "train_config.json").read_text())
    assert raw["moe_config"]["num_experts_per_tok"] == 2 and raw["moe_config"]["alpha"] == 8.0
    assert raw["moe_config"]["router_heads"] == 2 and raw["moe_config"]["router_head_dim"] == 8
    assert raw["lora_config"] == {"r": 3, "lora_alpha": 6.0}
    back = im.import_reference(reference)
    assert same_routing(back, small) and back.lora_parts()[0].scale == 2.0
    assert "import_arguments" not in back.config.extra


def test_missing_train_config_is_never_guessed(reference, small, capsys, tmp_path):
    (reference / "train_config.json").unlink()
    with pytest.raises(im.AdapterError) as err:
        im.import_reference(reference)
    text = one_sentence(err.value)
    for needed in ("num_experts_per_tok", "moe_config.alpha", "router_heads", "lora_alpha", "--top-k"):
        assert needed in text
    out = tmp_path / "o.safetensors"
    status, stderr = cli(["convert", str(reference), str(out), "--quiet"], capsys)
    assert status == 2 and "has no 'train_config.json'" in stderr and not out.exists()
    back = im.import_reference(reference, top_k=2, alpha=8.0, router_head_dim=8, lora_alpha=6.0)
    assert same_routing(back, small) and back.config.router_heads == 2
    assert back.config.extra["import_arguments"] == {"top_k": 2, "alpha": 8.0, "router_head_dim": 8, "lora_alpha": 6.0}
    flags = ["--top-k", "2", "--alpha", "8", "--router-heads", "2", "--lora-alpha", "6"]
    assert cli(["convert", str(reference), str(out), "--quiet", *flags], capsys)[0] == 0
    assert same_routing(im.load_adapter(out), small)


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        ("moe_config.num_experts_per_tok", "does not record the council size (moe_config.num_experts_per_tok"),
        ("moe_config.alpha", "does not record the experts' alpha (moe_config.alpha: pass alpha= or --alpha)"),
        ("lora_config.lora_alpha", "does not record the plain LoRA's alpha (lora_config.lora_alpha"),
    ],
)
def test_each_missing_key_is_named(reference, drop, message):
    edit_config(reference, drop=(drop,))
    with pytest.raises(im.AdapterError, match=re.escape(message)):
        im.import_reference(reference)


def test_head_count_comes_from_config_or_argument_and_must_fit(reference, small):
    edit_config(reference, drop=("moe_config.router_heads", "moe_config.router_head_dim"))
    with pytest.raises(im.AdapterError, match="how the router's attention width 16 splits into heads"):
        im.import_reference(reference)
    with pytest.raises(im.AdapterError, match="router_heads=3 does not divide the router's attention width 16"):
        im.import_reference(reference, router_heads=3)
    with pytest.raises(im.AdapterError, match="router_heads=4 × router_head_dim=8 is 32"):
        im.import_reference(reference, router_heads=4, router_head_dim=8)
    assert same_routing(im.import_reference(reference, router_heads=2), small)


def test_arguments_replace_the_config(reference, small):
    back = im.import_reference(reference, top_k=3, alpha=4.0)
    assert back.config.top_k == 3 and back.config.alpha == 4.0
    assert bool(((back.route(TEXT, POOLED).weights > 0).sum(-1) == 3).all())


@pytest.mark.parametrize(
    ("moe", "message"),
    [
        ({"num_experts_per_tok": "2"}, "moe_config.num_experts_per_tok is '2'; it must be an integer from 1 to 256"),
        ({"num_experts_per_tok": 9}, "top_k=9 cannot exceed num_experts=4"),
        ({"alpha": "NaN"}, "moe_config.alpha is 'NaN'; it must be a number in (0, 1e+06]"),
        ({"alpha": True}, "moe_config.alpha is True"),
        ({"router_heads": 2.0}, "moe_config.router_heads is 2.0"),
        ({"num_experts": 8}, "moe_config.num_experts=8, but the experts in 'mole_experts.pt' have 4"),
        ({"rank": "4"}, "moe_config.rank is '4'"),
        ({"token_route_overrides_single": [1.5]}, "holds 1.5, which is not a block index"),
        ({"token_route_overrides_double": 3}, "must be a list of block indices"),
        ({"token_route_overrides_double": [0]}, "routes 'transformer_blocks.0.ff.net.2' per token, but its gate"),
    ],
)
def test_config_values_are_type_and_range_checked(reference, moe, message):
    edit_config(reference, moe=moe)
    with pytest.raises(im.AdapterError) as err:
        im.import_reference(reference)
    assert message in one_sentence(err.value)


def test_bad_arguments_are_named(reference):
    for kwargs, message in [
        ({"top_k": "2"}, "top_k (--top-k) is '2'"),
        ({"alpha": float("inf")}, "alpha (--alpha) is inf"),
        ({"lora_alpha": 0}, "lora_alpha (--lora-alpha) is 0"),
        ({"router_heads": -1}, "router_heads (--router-heads) is -1"),
    ]:
        with pytest.raises(im.AdapterError, match=message.replace("(", r"\(").replace(")", r"\)")):
            im.import_reference(reference, **kwargs)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "'train_config.json' is not valid JSON"),
        ("[]", "'train_config.json' must hold a JSON object, not a list"),
        ('{"moe_config": [1]}', "moe_config must be an object, not a list"),
        ("\xff", "'train_config.json' is not valid JSON"),
    ],
)
def test_bad_train_config_json(reference, capsys, tmp_path, text, message):
    (reference / "train_config.json").write_text(text, encoding="latin-1")
    with pytest.raises(im.AdapterError, match=message):
        im.import_reference(reference)
    status, stderr = cli(["convert", str(reference), str(tmp_path / "o.safetensors"), "--quiet"], capsys)
    assert status == 2 and message in stderr


def test_legacy_torch_save_is_refused_with_the_way_out(reference):
    experts = torch.load(reference / "mole_experts.pt", weights_only=True)
    torch.save(experts, reference / "mole_experts.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(im.AdapterError, match=r"legacy \(pre-1.6\) torch.save file, which is not read here; re-save"):
        im.import_reference(reference)
    (reference / "mole_experts.pt").write_bytes(b"\x80\x04K\x01.")  # a bare pickle, not torch.save
    with pytest.raises(im.AdapterError, match="is not a readable torch file"):
        im.import_reference(reference)


def test_wrong_shapes_and_corrupt_files(reference, capsys, tmp_path):
    experts = torch.load(reference / "mole_experts.pt", weights_only=True)
    cases = [
        ({"transformer_blocks.0.ff.net.2.experts.1.left": torch.zeros(128, 5)}, "expert 1 of 'transformer_blocks.0"),
        ({"transformer_blocks.0.ff.net.2.experts.1.left": torch.zeros(128)}, "every expert needs left [in, r]"),
        ({"transformer_blocks.0.ff.net.2.gate.weight": torch.zeros(3, 32)}, "it needs one row per expert (4 rows)"),
        ({"transformer_blocks.0.ff.net.2.gate.weight": torch.zeros(4, 7)}, "reads width 7, neither the router's 32"),
        ({"single_transformer_blocks.0.proj_out.experts.0.left": torch.zeros(160, 8)}, "has left (160, 8)"),
        ({"x_embedder.experts.0.left": torch.zeros(4, 4)}, "'x_embedder' is not inside a transformer block"),
        ({"transformer_blocks.0.ff.net.2.experts.0.left": "not a tensor"}, "is not a named tensor"),
    ]
    for change, message in cases:
        torch.save({**experts, **change}, reference / "mole_experts.pt")
        with pytest.raises(im.AdapterError) as err:
            im.import_reference(reference)
        assert message in one_sentence(err.value), (change, str(err.value))
    torch.save(experts, reference / "mole_experts.pt")
    lora = reference / "pytorch_lora_weights.safetensors"
    lora.write_bytes(lora.read_bytes()[:50])
    with pytest.raises(
        im.AdapterError, match=re.escape("'pytorch_lora_weights.safetensors' is not a readable .safetensors")
    ):
        im.import_reference(reference)
    status, stderr = cli(["convert", str(reference), str(tmp_path / "o.safetensors"), "--quiet"], capsys)
    assert status == 2 and "pytorch_lora_weights.safetensors" in stderr
    router = torch.load(reference / "condition_type_embedder.pt", weights_only=True)
    del router["condition_type_embedder"]["latents"]
    torch.save(router, reference / "condition_type_embedder.pt")
    with pytest.raises(im.AdapterError, match=re.escape("'condition_type_embedder.pt' lacks 'latents'")):
        im.import_reference(reference)


# ---- 4. command line --------------------------------------------------------------------------------


def test_convert_never_writes_onto_its_inputs(reference, capsys):
    before = {p.name: p.read_bytes() for p in reference.iterdir()}
    for target in ("mole_experts.pt", "pytorch_lora_weights.safetensors", "train_config.json"):
        status, stderr = cli(["convert", str(reference), str(reference / target), "--overwrite", "--quiet"], capsys)
        assert status == 2 and f"is the checkpoint's own '{target}'" in stderr
    link = reference.parent / "link.safetensors"
    os.link(reference / "pytorch_lora_weights.safetensors", link)  # the same file under another name
    status, stderr = cli(["convert", str(reference), str(link), "--overwrite", "--quiet"], capsys)
    assert status == 2 and "is the checkpoint's own 'pytorch_lora_weights.safetensors'" in stderr
    assert {p.name: p.read_bytes() for p in reference.iterdir()} == before


def test_convert_output_checks(reference, capsys, tmp_path):
    out = tmp_path / "o.safetensors"
    assert cli(["convert", str(reference), "", "--quiet"], capsys)[1].startswith("error: the output path is empty")
    assert "is a folder" in cli(["convert", str(reference), str(tmp_path), "--quiet"], capsys)[1]
    assert "must end in .safetensors" in cli(["convert", str(reference), str(tmp_path / "o.pt"), "--quiet"], capsys)[1]
    assert cli(["convert", str(reference), str(out), "--quiet"], capsys)[0] == 0
    status, stderr = cli(["convert", str(reference), str(out), "--quiet"], capsys)
    assert status == 2 and "already exists; pass --overwrite" in stderr
    assert cli(["convert", str(reference), str(out), "--quiet", "--overwrite"], capsys)[0] == 0
    status, stderr = cli(["convert", str(reference), str(out), "--top-k", "two"], capsys)
    assert status == 2 and "argument --top-k: invalid int value: 'two'" in stderr


@pytest.mark.parametrize(("code", "reason"), [(errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only")])
def test_disk_errors_are_one_line_and_leave_nothing(reference, capsys, tmp_path, monkeypatch, code, reason):
    def fail(_tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half an adapter")
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr("instructmole.adapter.save_file", fail)
    out = tmp_path / "out" / "o.safetensors"
    status, stderr = cli(["convert", str(reference), str(out), "--quiet"], capsys)
    assert status == 2 and f"could not write '{out}': {reason}" in stderr
    assert os.listdir(out.parent) == []


def test_ctrl_c_exits_130_without_a_partial_file(reference, capsys, tmp_path, monkeypatch):
    def interrupted(_tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half an adapter")
        raise KeyboardInterrupt

    monkeypatch.setattr("instructmole.adapter.save_file", interrupted)
    out = tmp_path / "out" / "o.safetensors"
    status = main(["convert", str(reference), str(out), "--quiet"])
    err = capsys.readouterr().err
    assert status == 130 and err == "error: interrupted (Ctrl-C); nothing was written\n"
    assert os.listdir(out.parent) == []


def test_cli_as_a_process_prints_no_traceback(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\x00" * 10)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run(
        [sys.executable, "-m", "instructmole", "inspect", str(bad)], capture_output=True, text=True, env=env, timeout=60
    )
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr


def test_output_into_a_closed_pipe_stops_quietly(reference, tmp_path):
    """``inspect FILE | head`` where head has already gone: no traceback, no error line."""
    out = tmp_path / "a.safetensors"
    assert main(["convert", str(reference), str(out), "--quiet"]) == 0
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written
    try:
        run = subprocess.run(
            [sys.executable, "-m", "instructmole", "inspect", str(out)],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            timeout=60,
        )
    finally:
        os.close(write)
    assert run.returncode == 1 and run.stderr == "", run.stderr


# ---- 5. atomic saves and their leftovers ----------------------------------------------------------------


def temp_name(target: str, host: str, pid: int) -> str:
    return f".{target}.{host}.{pid}.abcd1234.imole.tmp"


def test_stale_temps_of_dead_writers_are_removed_and_nothing_else(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its PID now names no process
    me = _host_tag()
    dead = tmp_path / temp_name("a.safetensors", me, child.pid)
    live = tmp_path / temp_name("a.safetensors", me, os.getpid())
    foreign = [
        tmp_path / ".a.safetensors.x1y2.tmp",
        tmp_path / "notes.imole.tmp",
        tmp_path / f".a.{me}.0.abc.imole.tmp",
    ]
    other_old = tmp_path / temp_name("b.safetensors", "elsewhere", child.pid)
    other_new = tmp_path / temp_name("c.safetensors", "elsewhere", child.pid)
    for p in (dead, live, *foreign, other_old, other_new):
        p.write_bytes(b"x" * 10)
    day_ago = time.time() - STALE_AFTER_S - 60
    os.utime(other_old, (day_ago, day_ago))
    with atomic_path(tmp_path / "a.safetensors") as tmp:
        assert tmp.name.startswith(f".a.safetensors.{me}.{os.getpid()}.") and tmp.name.endswith(".imole.tmp")
        tmp.write_text("new")
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"a.safetensors", live.name, other_new.name, *(p.name for p in foreign)}
    assert remove_stale_temps(tmp_path / "missing") == []  # never raises


def test_concurrent_writers_in_one_folder_never_lose_each_others_temps(tmp_path):
    """Every writer cleans on entry; a writer mid-save (a live PID) must keep its temp file."""
    target = tmp_path / "entry.safetensors"
    with atomic_path(target) as outer:
        outer.write_text("outer")
        for i in range(5):
            with atomic_path(tmp_path / f"other{i}.safetensors") as inner:
                inner.write_text(str(i))
        assert outer.exists()
    assert target.read_text() == "outer" and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_atomic_path_refuses_folders_and_empty_paths(tmp_path):
    with pytest.raises(IsADirectoryError, match=str(tmp_path)), atomic_path(tmp_path):
        pass
    with pytest.raises(FileNotFoundError, match="the path is empty"), atomic_path(""):
        pass
    long = tmp_path / ("x" * 240 + ".safetensors")  # the temp name must still fit in NAME_MAX
    with atomic_path(long) as tmp:
        tmp.write_text("ok")
    assert long.read_text() == "ok"
