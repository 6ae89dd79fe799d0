"""The training config: a YAML file with sections, ``key=value`` overrides, strict validation.

Everything is checked before any model loads, because a typo found after an hour of caching or on
the first checkpoint costs a night: an unknown key names the key and the nearest valid one, a bad
value names the key, the value and what is allowed, a missing path names the path. Relative paths
are read against the current directory (as a shell user expects of paths given on the command
line); ``data.cache_dir`` defaults to a folder beside the manifest so that later runs reuse it.

Sections: ``model`` (what to load), ``adapter`` (experts, router, optional plain LoRA), ``data``,
``train`` (optimisation and the recipe), ``save`` (checkpoints, adapters, routing reports),
``sample`` (images rendered at checkpoints) and ``log``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass, make_dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from instructmole.config import MoLEConfig, settings
from instructmole.layers import REFERENCE_LORA_TARGETS
from instructmole.validation import checked_bool, checked_choice, checked_int, checked_real, field_spec, shown

from .errors import ConfigError
from .optim import missing as missing_package

__all__ = [
    "MOLE_SETTINGS",
    "RESUME_MAY_CHANGE",
    "AdapterSection",
    "DataSection",
    "LogSection",
    "LoraSection",
    "ModelSection",
    "SampleItem",
    "SampleSection",
    "SaveSection",
    "TrainConfig",
    "TrainSection",
    "load_config",
    "resume_conflicts",
]


# The families the trainer trains (``training/families.py``'s ``TRAINABLE``, as a type for the check).
TrainableFamily = Literal[
    "flux.1-kontext-dev", "qwen-image-edit-2511", "qwen-image-edit-2509", "flux.2-klein-4b", "flux.2-klein-9b"
]


def _f(default: Any, help: str, **checks: Any) -> Any:
    """A dataclass field with its help text and value checks (read by ``_value``)."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata=field_spec(help, **checks))
    return field(default=default, metadata=field_spec(help, **checks))


@dataclass
class ModelSection:
    pretrained: str | None = _f(
        None, "a local diffusers folder of FLUX.1 Kontext [dev], Qwen-Image-Edit-2511 or FLUX.2 [klein]", path="dir"
    )
    family: TrainableFamily | None = _f(
        None, "the base model family the adapter is trained for (default: told from the transformer)"
    )
    comfyui_path: str | None = _f(None, "a ComfyUI folder: its tokenizers are used with the split files", path="dir")
    diffusion_model: str | None = _f(None, "ComfyUI split files: the Kontext diffusion model", path="file")
    t5: str | None = _f(None, "ComfyUI split files: T5-XXL (models/text_encoders)", path="file")
    clip: str | None = _f(None, "ComfyUI split files: CLIP-L (models/text_encoders)", path="file")
    vae: str | None = _f(None, "ComfyUI split files: the FLUX VAE (models/vae)", path="file")
    dtype: Literal["bf16", "fp16", "fp32"] = _f("bf16", "storage and compute dtype of the frozen base")
    quantize_base: Literal["none", "fp8", "int8", "nf4"] = _f(
        "none",
        "store every frozen base Linear's weight quantized, also under experts and LoRA, dequantised per layer: "
        "fp8 (e4m3) or int8, per-row scales (half of bf16), nf4 (bitsandbytes, about a quarter)",
    )
    gradient_checkpointing: bool = _f(True, "recompute each block in backward: less memory, ~30% more time")
    block_swap: int = _f(
        0,
        "keep the frozen weights of the transformer's last N blocks in CPU memory, each copied to the GPU just "
        "before its forward and backward (0: off; FLUX has 57 blocks, ~0.4 GB each in bf16)",
        min=0,
    )


@dataclass
class LoraSection:
    rank: int = _f(0, "plain-LoRA rank; 0 turns the plain LoRA off (the reference uses 256)", min=0)
    alpha: float | None = _f(None, "plain-LoRA alpha (default: the rank, scale 1)", gt=0)
    init: Literal["gaussian", "kaiming"] = _f("gaussian", "initialisation of lora_A (lora_B starts at zero)")
    targets: list[str] = _f(
        list(REFERENCE_LORA_TARGETS),
        "module-name suffixes that get the plain LoRA; 'reference' (and this default, FLUX.1's) are the family's own",
    )


# The adapter's settings are MoLEConfig's own fields (default, help and checks declared there), so a
# new one is one edit in instructmole/config.py; the trainer sets the two below from the transformer.
_FROM_TRANSFORMER = ("text_dim", "router_dim")  # its T5 and pooled CLIP widths (``build_mole_config``)
MOLE_SETTINGS = tuple(f.name for f in settings() if f.name not in _FROM_TRANSFORMER)
# Where the trainer asks more than an adapter file may hold: one expert is a plain LoRA whose gate
# has nothing to choose (use adapter.lora for that).
_TRAINER_CHECKS = {"num_experts": {"min": 2}}


def _mole_settings() -> type:
    """A dataclass of ``MOLE_SETTINGS``: the types, defaults and metadata of ``MoLEConfig``'s fields."""
    hints = typing.get_type_hints(MoLEConfig)
    own = {f.name: f for f in settings()}

    def setting(name: str) -> Any:
        return field(default=own[name].default, metadata={**own[name].metadata, **_TRAINER_CHECKS.get(name, {})})

    return make_dataclass(
        "_MoLESettings",
        [(name, hints[name], setting(name)) for name in MOLE_SETTINGS],
        namespace={"__module__": __name__, "__doc__": "MoLEConfig's settings, as keys of the adapter section."},
    )


_MoLESettings = _mole_settings()


@dataclass
class AdapterSection(_MoLESettings):
    """The ``adapter`` section: ``MoLEConfig``'s settings (num_experts, top_k, rank, alpha, the router's
    sizes, ...: ``MOLE_SETTINGS``, inherited) and how the trainer places and starts the experts."""

    targets: list[str] = _f(
        ["reference"],
        "MoLE layers: 'reference' (every double block's ff.net.2 and single block's proj_out) or canonical names",
    )
    token_routed: list[str] = _f([], "layers whose gate routes each token instead of the instruction")
    expert_init: Literal["reference", "lora"] = _f(
        "reference", "fresh expert A: 'reference' uniform ±1/√rank (the paper's code) or 'lora' ±1/√in_features"
    )
    router_dim: int | None = _f(
        None,
        "router width of the text-routed families (Qwen-Image, FLUX.2; default 768); FLUX.1's is its CLIP pooled width",
        min=1,
        max=65536,
    )
    lora: LoraSection = field(default_factory=LoraSection)

    def mole_settings(self) -> dict[str, Any]:
        """The ``MoLEConfig`` keyword arguments this section sets."""
        return {name: getattr(self, name) for name in MOLE_SETTINGS}


@dataclass
class DataSection:
    manifest: str = _f(None, "a JSONL manifest or a folder with target/ and control/", path="any", required=True)
    resolution: int = _f(512, "pixel budget per image: buckets hold about resolution² pixels", min=16, max=4096)
    min_side: int = _f(256, "rows whose shorter image side is below this are bad rows", min=1)
    max_references: int = _f(4, "rows with more references are bad rows", min=0, max=16)
    on_error: Literal["fail", "skip"] = _f("fail", "a bad row stops the run, or is skipped and counted")
    cache_dir: str | None = _f(None, "latent/text cache (default: .instructmole-cache beside the manifest)")
    instruction_dropout: float = _f(0.1, "share of samples trained with the empty instruction", min=0, max=1)
    reference_dropout: float = _f(0.05, "share of batches trained without their reference tokens", min=0, max=1)
    latent_sample: bool = _f(True, "draw latents from the VAE posterior each step (else its mean)")
    workers: int = _f(2, "data-loading worker processes per training process", min=0, max=64)
    encode_batch_size: int = _f(8, "batch size while caching latents and text features", min=1)


@dataclass
class TrainSection:
    output_dir: str = _f("runs/instructmole", "checkpoints, adapters, reports and metrics go here")
    seed: int = _f(3407, "seed of every random draw (data order, noise, timesteps, dropout)", min=0)
    max_steps: int = _f(100_000, "optimizer steps", min=1)
    batch_size: int = _f(4, "samples per optimizer step, over all processes", min=1)
    gradient_accumulation: int = _f(1, "micro-batches per optimizer step", min=1)
    lr: float = _f(1e-4, "learning rate of router, experts and plain LoRA", gt=0, max=1)
    gate_lr: float = _f(5e-5, "learning rate of the gates", gt=0, max=1)
    optimizer: Literal["adamw", "adamw8bit", "adafactor", "prodigy"] = _f(
        "adamw",
        "adamw (torch), adamw8bit (bitsandbytes: 8-bit moments), adafactor (transformers: factored, no momentum), "
        "prodigy (prodigyopt: finds one step size; train.lr is its multiplier, use 1; gate_lr unused)",
    )
    betas: list[float] = _f([0.9, 0.999], "Adam betas (adamw, adamw8bit, prodigy)", length=2, min=0, lt=1)
    weight_decay: float = _f(1e-4, "decoupled weight decay", min=0)
    max_grad_norm: float = _f(1.0, "gradient-norm clip (0: none)", min=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = _f("constant", "learning-rate schedule after warm-up")
    warmup_steps: int = _f(0, "linear warm-up steps", min=0)
    mixed_precision: Literal["bf16", "fp16", "no"] = _f("bf16", "autocast; trainable weights stay fp32")
    timesteps: Literal["uniform", "logit_normal"] = _f("uniform", "how sigma is drawn")
    logit_mean: float = _f(0.0, "logit-normal mean")
    logit_std: float = _f(1.0, "logit-normal std", gt=0)
    guidance: float = _f(1.0, "Kontext guidance embedding value while training", min=0)
    load_balance: float = _f(0.1, "weight of the instruction gates' load-balancing loss", min=0)
    load_balance_token: float = _f(0.01, "weight of token-routed gates' load-balancing loss", min=0)
    orthogonality: float = _f(0.01, "weight of the expert-output orthogonality loss", min=0)
    aux_reduction: Literal["sum", "mean"] = _f("sum", "aux losses of the MoLE layers: summed (reference) or averaged")
    aux_decay_steps: int | None = _f(
        None, "cosine decay of the aux weights to ~0 over this many steps (default: max_steps)", min=1
    )
    ema: float = _f(
        0.0, "decay of an EMA of the trainable weights, exported beside the adapter (0: off; e.g. 0.999)", min=0, lt=1
    )
    fsdp: bool = _f(
        False,
        "shard every transformer block (frozen base too) over the processes with accelerate's FSDP2 plugin instead "
        "of DDP; needs 2+ CUDA processes (training/fsdp.py)",
    )
    mask_outside_weight: float = _f(
        0.1, "flow-loss weight of tokens outside a row's mask (inside 1; rows without a mask: unweighted)", min=0, max=1
    )


@dataclass
class SaveSection:
    every: int = _f(5000, "checkpoint (state, adapter, report) every this many steps", min=1)
    keep: int = _f(3, "keep the last this many checkpoints", min=1)
    name: str = _f("instructmole", "adapter file name prefix")
    dtype: Literal["bf16", "fp16", "fp32"] = _f("bf16", "dtype of exported adapter tensors")
    report: bool = _f(True, "write a routing report with each checkpoint")
    report_rows: int = _f(64, "at most this many held-out rows for the report's flow losses", min=1)


@dataclass
class SampleItem:
    instruction: str = _f(None, "the edit instruction", required=True)
    references: list[str] = _f([], "reference images", path="file")


@dataclass
class SampleSection:
    items: list[SampleItem] = _f([], "instruction/reference pairs rendered at each checkpoint (empty: none)")
    steps: int = _f(28, "sampling steps", min=1, max=1000)
    guidance: float = _f(2.5, "guidance embedding value", min=0)
    seed: int = _f(0, "noise seed of the samples", min=0)


@dataclass
class LogSection:
    every: int = _f(10, "metrics line every this many steps", min=1)
    trackers: list[Literal["tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive"]] | None = _f(
        None, "accelerate trackers (default: TensorBoard when it is installed)"
    )
    progress: bool = _f(True, "show a progress bar")


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    save: SaveSection = field(default_factory=SaveSection)
    sample: SampleSection = field(default_factory=SampleSection)
    log: LogSection = field(default_factory=LogSection)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def cache_dir(self) -> Path:
        if self.data.cache_dir:
            return Path(self.data.cache_dir)
        return Path(self.data.manifest).parent / ".instructmole-cache"


# ---- what a resumed run may change -------------------------------------------------------------

# Keys (or whole sections) a resumed run may change: how long to train and how the learning rate moves
# from here on, what is saved, rendered and logged, how the data is fed, and where things are. None of
# them changes what the steps already taken mean. Every other key is fixed for a run: a changed
# train.lr, for one, would be silently ignored (the optimizer's saved state carries the old one), and a
# changed seed, batch or recipe would make the resumed run a different run. The data itself may not
# change either, which the checkpoint's data fingerprint checks (so data.manifest may move).
RESUME_MAY_CHANGE = (
    "model.block_swap",  # where the frozen weights wait between uses: the same arithmetic (tested bit for bit)
    "train.output_dir",
    "train.max_steps",
    "train.lr_schedule",
    "train.warmup_steps",
    "train.aux_decay_steps",
    "save.every",
    "save.keep",
    "save.dtype",
    "save.report",
    "save.report_rows",
    "sample",
    "log",
    "data.manifest",
    "data.on_error",
    "data.min_side",
    "data.max_references",
    "data.cache_dir",
    "data.workers",
    "data.encode_batch_size",
    "model.gradient_checkpointing",
)


def resume_conflicts(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, current value)`` for each key that differs but may not change on resume.

    Both arguments are ``TrainConfig.to_dict()`` outputs (the saved one from a checkpoint); a key one
    side lacks (a config from an older trainer) counts as unchanged only if the other side has the default.
    """
    flat_saved, flat_now = _flat_current(saved), _flat_current(current)
    defaults = _flatten(_default_dict())
    conflicts = []
    for key in sorted(set(flat_saved) | set(flat_now)):
        if any(key == p or key.startswith(p + ".") for p in RESUME_MAY_CHANGE):
            continue
        old, new = flat_saved.get(key, defaults.get(key)), flat_now.get(key, defaults.get(key))
        if old != new:
            conflicts.append((key, old, new))
    return conflicts


def _flat_current(config: dict[str, Any]) -> dict[str, Any]:
    """``_flatten`` with an earlier trainer's keys in today's names (``model.fp8_base``: ``_fold_fp8_base``)."""
    flat = _flatten(config)
    if flat.pop("model.fp8_base", False) and flat.get("model.quantize_base", "none") == "none":
        flat["model.quantize_base"] = "fp8"
    return flat


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _default_dict() -> dict[str, Any]:
    """The defaults of every key (the required ones as None), for comparing configs of two trainer versions."""

    def build(cls: type) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        out: dict[str, Any] = {}
        for f in fields(cls):
            if is_dataclass(hints[f.name]):
                out[f.name] = build(hints[f.name])
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
            else:
                out[f.name] = None if f.default is dataclasses.MISSING else f.default
        return out

    return build(TrainConfig)


# ---- loading and validation ---------------------------------------------------------------------


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read ``path`` (YAML), apply ``key=value`` overrides, validate everything; raise ``ConfigError``."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(
                f"config file '{path}' is a folder; pass the YAML file (e.g. training/configs/kontext.yaml)"
            )
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except OSError as err:
            raise ConfigError(
                f"config file '{path}' cannot be read ({err.strerror or err}); check its permissions"
            ) from None
        except UnicodeDecodeError:
            raise ConfigError(
                f"config file '{path}' is not UTF-8 text (a binary file?); pass the YAML config, e.g. "
                "training/configs/kontext.yaml"
            ) from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file '{path}' is not valid YAML: {_one_line(err)}") from None
        except RecursionError:  # absurdly deep nesting: not a config anyone wrote
            raise ConfigError(f"config file '{path}' is nested too deeply to be a training config") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections, not a {type(data).__name__}")
    for item in overrides:
        _apply_override(data, item)
    _fold_fp8_base(data)
    config = _build(TrainConfig, data, "")
    _check_together(config)
    return config


def _fold_fp8_base(data: dict[str, Any]) -> None:
    """``model.fp8_base`` (a bool of earlier trainers) is the old name of ``model.quantize_base=fp8``: true
    becomes that, false nothing. It used to skip every Linear that carries experts or LoRA (most of the
    base under the reference recipe); fp8 now covers them too, with per-row scales."""
    model = data.get("model")
    if not isinstance(model, dict) or "fp8_base" not in model:
        return
    if not checked_bool("model.fp8_base", model.pop("fp8_base")):
        return
    given = model.get("quantize_base", "fp8")
    if given != "fp8":
        raise ConfigError(
            f"model.fp8_base=true (the old name of model.quantize_base=fp8) and model.quantize_base={shown(given)} "
            "disagree; keep only model.quantize_base"
        )
    model["quantize_base"] = "fp8"


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. train.lr=3e-4)")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except (yaml.YAMLError, RecursionError):
        value = text
    parts = key.strip().split(".")
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: '{'.'.join(parts[: depth + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'the config'} must be a mapping of keys, got {shown(data)}")
    known = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in known:
            full = f"{where}.{key}" if where else str(key)
            near = [_ALIASES[key]] if _ALIASES.get(key) in known else []
            near = near or difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.5)
            hint = f"; did you mean '{where + '.' if where else ''}{near[0]}'?" if near else ""
            valid = ", ".join(known)
            raise ConfigError(f"unknown config key '{full}'{hint} (valid here: {valid})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in known.items():
        full = f"{where}.{name}" if where else name
        if name in data:
            values[name] = _value(hints[name], data[name], full, f.metadata)
        elif f.metadata.get("required"):
            raise ConfigError(f"config key '{full}' is required: {f.metadata['help']}")
        elif is_dataclass(hints[name]):
            values[name] = _build(hints[name], {}, full)
    return cls(**values)


# Names other trainers use for our keys: a typo-distance match would not find them.
_ALIASES = {
    "learning_rate": "lr",
    "gate_learning_rate": "gate_lr",
    "lr_scheduler": "lr_schedule",
    "train_batch_size": "batch_size",
    "gradient_accumulation_steps": "gradient_accumulation",
    "max_train_steps": "max_steps",
    "steps": "max_steps",
    "checkpointing_steps": "every",
    "checkpoints_total_limit": "keep",
    "lora_rank": "rank",
    "experts": "num_experts",
    "k": "top_k",
    "dataset": "manifest",
    "pretrained_model_name_or_path": "pretrained",
}


def _value(tp: Any, value: Any, where: str, meta: dict[str, Any]) -> Any:
    """``value`` for the key ``where`` of type ``tp``: YAML's readings undone here, the checks shared
    with the core (``instructmole.validation``)."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        return _value(rest[0], value, where, meta)
    if is_dataclass(tp):
        return _build(tp, value, where)
    if origin is Literal:
        if value is False and "no" in args:  # YAML 1.1 reads an unquoted `no` as false
            value = "no"
        return checked_choice(where, value, args)
    if origin is list:
        if isinstance(value, str | int | float | dict):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}={shown(value)} must be a list")
        if "length" in meta and len(value) != meta["length"]:
            raise ConfigError(f"{where}={shown(value)} must hold exactly {meta['length']} values")
        return [_value(args[0], v, f"{where}[{i}]", meta) for i, v in enumerate(value)]
    if tp is bool:
        return checked_bool(where, value)
    if tp is int:
        return checked_int(where, value, meta)
    if tp is float:
        return checked_real(where, _float_text(value), meta)
    if tp is str:
        if value is None:
            raise ConfigError(f"{where} must not be empty")
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{where}={shown(value)} must be text")
        text = str(value)
        if meta.get("path") and not Path(text).exists():
            raise ConfigError(f"{where}: '{text}' does not exist (looked at {Path(text).resolve()})")
        if meta.get("path") == "file" and not Path(text).is_file():
            raise ConfigError(f"{where}: '{text}' is not a file")
        if meta.get("path") == "dir" and not Path(text).is_dir():
            raise ConfigError(f"{where}: '{text}' is not a folder")
        return text
    raise AssertionError(f"unsupported config type {tp!r} at {where}")  # a bug in this file, not user input


def _float_text(value: Any) -> Any:
    """YAML 1.1 reads 1e-4 (no dot) as text: such text as its number, any other value as it is."""
    if not isinstance(value, str):
        return value
    try:
        return float(value)
    except ValueError:
        return value  # the check names it: not a number


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _check_together(config: TrainConfig) -> None:
    """Rules that span keys."""
    m = config.model
    split = {"diffusion_model": m.diffusion_model, "t5": m.t5, "clip": m.clip, "vae": m.vae}
    if m.pretrained and any(split.values()):
        given = next(k for k, v in split.items() if v)
        raise ConfigError(
            f"model.pretrained and model.{given} are both set; use a diffusers folder or ComfyUI split files, not both"
        )
    if not m.pretrained:
        if not m.diffusion_model:
            raise ConfigError(
                "no model to train on: set model.pretrained (a diffusers FLUX.1 Kontext folder) or "
                "model.diffusion_model, model.t5, model.clip, model.vae and model.comfyui_path (ComfyUI's files)"
            )
        missing = [k for k in ("t5", "clip", "vae", "comfyui_path") if not getattr(m, k)]
        if missing:
            raise ConfigError(
                f"model.diffusion_model is set but model.{missing[0]} is not; ComfyUI split files need the "
                "diffusion model, T5-XXL, CLIP-L, the VAE and the ComfyUI folder (for the tokenizers)"
            )
    if m.family not in (None, "flux.1-kontext-dev"):
        if not m.pretrained:
            raise ConfigError(
                f"model.family={m.family}: ComfyUI single files are read for FLUX.1 Kontext only; give "
                "model.pretrained, a diffusers folder of the model"
            )
        for key, value, what in (
            ("sample.items", config.sample.items, "renders FLUX.1 Kontext edits only"),
            ("train.fsdp", config.train.fsdp, "shards FLUX.1's transformer blocks only"),
        ):
            if value:
                raise ConfigError(f"model.family={m.family}: {key} {what}; turn it off")
    a = config.adapter
    if a.top_k > a.num_experts:
        raise ConfigError(f"adapter.top_k={a.top_k} cannot exceed adapter.num_experts={a.num_experts}")
    t = config.train
    for key, value in (("model.quantize_base", m.quantize_base), ("train.optimizer", t.optimizer)):
        problem = missing_package(key, value)
        if problem:
            raise ConfigError(problem)
    if t.optimizer == "prodigy" and t.lr < 0.1:
        raise ConfigError(
            f"train.optimizer=prodigy finds the step size itself and train.lr={t.lr:g} scales it down to almost "
            "nothing; set train.lr=1 (its authors' value)"
        )
    if t.batch_size % t.gradient_accumulation:
        raise ConfigError(
            f"train.batch_size={t.batch_size} must be a multiple of train.gradient_accumulation="
            f"{t.gradient_accumulation} (each micro-batch is batch_size / gradient_accumulation samples)"
        )
    if t.fsdp:  # each needs whole weights on one process, or moves weights FSDP owns
        alone = "runs the model on process 0 alone, which a sharded model cannot"
        clashes = {
            "model.block_swap": (m.block_swap, "FSDP already shards the frozen blocks; block swap would move shards"),
            "train.ema": (t.ema, "the EMA would average this process's shards only"),
            "save.report": (config.save.report, f"the report {alone}"),
            "sample.items": (config.sample.items, f"sampling {alone}"),
        }
        for key, (value, why) in clashes.items():
            if value:
                raise ConfigError(f"train.fsdp=true cannot be combined with {key}: {why}; turn one of them off")
    for i, item in enumerate(config.sample.items):
        if not item.references:
            raise ConfigError(f"sample.items[{i}] has no references; a Kontext edit sample needs at least one image")
