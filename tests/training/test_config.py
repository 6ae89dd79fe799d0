"""Config validation: every kind of mistake names the key, the value and the way out."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from instructmole.layers import REFERENCE_LORA_TARGETS
from training.config import load_config
from training.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def base(tmp_path: Path) -> list[str]:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("")
    model = tmp_path / "model"
    model.mkdir()
    return [f"data.manifest={manifest}", f"model.pretrained={model}"]


def test_shipped_configs_hold_the_reference_recipe(base):
    cfg = load_config(ROOT / "training/configs/kontext.yaml", base)
    a, t = cfg.adapter, cfg.train
    assert (a.num_experts, a.top_k, a.rank, a.alpha, a.targets) == (8, 4, 32, 32.0, ["reference"])
    assert (a.lora.rank, a.lora.alpha, a.lora.targets) == (256, 256.0, list(REFERENCE_LORA_TARGETS))
    assert (t.lr, t.gate_lr, t.load_balance, t.orthogonality, t.aux_reduction) == (1e-4, 5e-5, 0.1, 0.01, "sum")
    assert (t.batch_size, t.seed, t.guidance, t.max_grad_norm, t.weight_decay) == (4, 3407, 1.0, 1.0, 1e-4)
    assert (cfg.data.instruction_dropout, cfg.data.reference_dropout, a.text_length) == (0.1, 0.05, 512)
    tiny = load_config(ROOT / "training/configs/tiny_demo.yaml", base)
    assert (tiny.adapter.num_experts, tiny.adapter.top_k, tiny.adapter.rank) == (4, 2, 4)


def test_overrides_are_typed_and_yaml_style_numbers_parse(base):
    cfg = load_config(None, [*base, "train.lr=3e-4", "adapter.token_routed=[transformer_blocks.0.ff.net.2]"])
    assert cfg.train.lr == 3e-4 and cfg.adapter.token_routed == ["transformer_blocks.0.ff.net.2"]
    assert cfg.cache_dir == Path(base[0].split("=", 1)[1]).parent / ".instructmole-cache"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.learning_rate=1e-4", "unknown config key 'train.learning_rate'; did you mean 'train.lr'?"),
        ("trian.lr=1", "unknown config key 'trian'; did you mean 'train'?"),
        ("adapter.num_expert=8", "did you mean 'adapter.num_experts'?"),
        ("train.lr=fast", "train.lr='fast' must be a number"),
        ("train.lr=-1", "train.lr=-1.0 is too small: it must be a number greater than 0 and at most 1"),
        ("train.lr=.inf", "train.lr=inf must be a finite number"),
        ("train.max_steps=1.5", "train.max_steps=1.5 must be an integer of at least 1"),
        ("train.mixed_precision=bf32", "train.mixed_precision='bf32' must be one of: bf16, fp16, no"),
        ("model.fp8_base=yes please", "model.fp8_base='yes please' must be true or false"),
        ("train.betas=[0.9]", "train.betas=[0.9] must hold exactly 2 values"),
        ("adapter.top_k=9", "adapter.top_k=9 cannot exceed adapter.num_experts=8"),
        ("data.reference_dropout=2", "data.reference_dropout=2.0 is too large: it must be a number from 0 to 1"),
        ("train.gradient_accumulation=3", "must be a multiple of train.gradient_accumulation=3"),
        ("model.vae=nope.safetensors", "model.vae: 'nope.safetensors' does not exist"),
        ("train=5", "train must be a mapping of keys, got 5"),
        ("train", "override 'train' is not of the form section.key=value"),
    ],
)
def test_every_mistake_names_key_value_and_way_out(base, override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [*base, override])
    assert message in str(err.value)


def test_model_source_rules(tmp_path, base):
    manifest = base[0]
    with pytest.raises(ConfigError, match=re.escape("no model to train on: set model.pretrained")):
        load_config(None, [manifest])
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"")
    with pytest.raises(ConfigError, match=re.escape("model.pretrained and model.t5 are both set")):
        load_config(None, [*base, f"model.t5={f}"])
    with pytest.raises(ConfigError, match=re.escape("model.diffusion_model is set but model.t5 is not")):
        load_config(None, [manifest, f"model.diffusion_model={f}"])
    with pytest.raises(ConfigError, match=re.escape("config key 'data.manifest' is required")):
        load_config(None, [base[1]])


def test_config_file_errors(tmp_path, base):
    with pytest.raises(ConfigError, match=r"config file '.*nope\.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml", base)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad, base)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping of sections, not a list"):
        load_config(listed, base)


def test_the_adapter_section_is_the_cores_settings_and_every_one_reaches_the_adapter(base):
    """A setting added to ``MoLEConfig`` is a trainer key with the same default and checks, and
    ``build_mole_config`` passes it on: one edit, not two."""
    import dataclasses
    import typing

    from instructmole import MoLEConfig
    from instructmole.config import settings
    from instructmole.tiny import tiny_flux
    from training.config import MOLE_SETTINGS, AdapterSection
    from training.modules import build_mole_config

    assert set(MOLE_SETTINGS) == {f.name for f in settings()} - {"text_dim", "router_dim"}  # read from the model
    defaults = AdapterSection()
    hints = typing.get_type_hints(MoLEConfig)
    overrides = []
    for f in settings():
        if f.name not in MOLE_SETTINGS:
            continue
        assert getattr(defaults, f.name) == f.default
        tp, value = hints[f.name], f.default  # another valid value of each
        if tp is bool:
            value = not value
        elif tp is int:
            value += 1
        elif tp is float:
            value /= 2
        else:
            value = next(c for c in typing.get_args(tp) if c != value)
        overrides.append((f.name, value))
    config = load_config(None, [*base, *(f"adapter.{k}={str(v).lower()}" for k, v in overrides)])
    transformer = tiny_flux(0)
    mole = build_mole_config(config, transformer)
    assert {k: getattr(mole, k) for k, _ in overrides} == dict(overrides)
    assert (mole.text_dim, mole.router_dim) == (64, 32)  # the transformer's widths
    assert dataclasses.asdict(config.adapter).keys() >= set(MOLE_SETTINGS)


def test_a_config_from_before_token_weights_still_loads_and_resumes(base):
    """Every shipped config loads unchanged; an adapter setting a saved config lacks is its default."""
    from training.config import resume_conflicts

    for path in sorted((ROOT / "training" / "configs").glob("*.yaml")):
        cfg = load_config(path, base)
        saved = cfg.to_dict()
        del saved["adapter"]["token_weights"]  # as a run saved it before the key existed
        assert cfg.adapter.token_weights == "probs" and not resume_conflicts(saved, cfg.to_dict())
