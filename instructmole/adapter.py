"""The adapter file: one ``.safetensors`` holding experts, gates, router and an optional plain LoRA.

Layout (every tensor named by canonical diffusers module names, so nothing runtime-specific leaks
into the file)::

    mole.<layer>.A          [n, in, r]     expert down-projections
    mole.<layer>.B          [n, r, out]    expert up-projections
    mole.<layer>.gate       [n, d | in]    gate (instruction signal width, or the layer's input)
    router.<name>                          the Perceiver (reference key names, see routing.py)
    transformer.<module>.lora_A.weight     plain LoRA part, in the key names ComfyUI already maps
    transformer.<module>.lora_B.weight     for diffusers Flux LoRAs, with
    transformer.<module>.alpha             its alpha as a 0-d tensor

``__metadata__``: ``format = "instructmole"``, ``format_version = "1"``, ``config`` (the MoLEConfig
JSON), ``base_model``. Loading validates names, shapes, dtypes, version and family and fails with
one sentence that says what is wrong and what to do; saving goes through a temp file, fsync and
rename, so a crash never leaves half an adapter behind.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from .config import ConfigError, MoLEConfig
from .council import Council
from .errors import InstructMoLEError
from .files import atomic_path
from .model import InstructMoLE

__all__ = ["FORMAT", "FORMAT_VERSION", "Adapter", "AdapterError", "LoraPart", "load_adapter"]

FORMAT = "instructmole"
FORMAT_VERSION = 1
LORA_PREFIX = "transformer."


class AdapterError(InstructMoLEError):
    """An adapter file (or reference checkpoint) is missing, foreign, corrupt or inconsistent."""


@dataclass(frozen=True)
class LoraPart:
    """One Linear's plain-LoRA term: ``x downᵀ upᵀ · scale`` (scale = alpha / rank, or 1 without alpha)."""

    module: str  # canonical diffusers module name
    down: Tensor  # [r, in]  (lora_A)
    up: Tensor  # [out, r]  (lora_B)
    scale: float


@dataclass
class Adapter:
    """An InstructMoLE adapter in memory: the MoLE module plus the plain-LoRA tensors, as stored."""

    model: InstructMoLE
    lora: dict[str, Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)  # extra provenance (source, notes)

    @property
    def config(self) -> MoLEConfig:
        return self.model.config

    @property
    def adapter_id(self) -> str:
        return self.model.fingerprint()

    # ---- routing ------------------------------------------------------------------------------

    @torch.no_grad()
    def route(self, text: Tensor, pooled: Tensor, labels: list[str] | tuple[str, ...] = ()) -> Council:
        """Councils for a batch of instructions, as in training but without noise or dropout."""
        was_training = self.model.training
        self.model.eval()
        try:
            return self.model.route(text, pooled, labels)
        finally:
            self.model.train(was_training)

    # ---- plain LoRA part ----------------------------------------------------------------------

    def lora_parts(self) -> list[LoraPart]:
        parts = []
        for key in sorted(self.lora):
            if not key.endswith(".lora_A.weight"):
                continue
            base = key[: -len(".lora_A.weight")]
            down, up = self.lora[key], self.lora[f"{base}.lora_B.weight"]
            alpha = self.lora.get(f"{base}.alpha")
            scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
            parts.append(LoraPart(base[len(LORA_PREFIX) :], down, up, scale))
        return parts

    # ---- file ---------------------------------------------------------------------------------

    def tensors(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name, layer in self.model.named_layers():
            out[f"mole.{name}.A"] = layer.A.detach()
            out[f"mole.{name}.B"] = layer.B.detach()
            out[f"mole.{name}.gate"] = layer.gate.weight.detach()
        for key, value in self.model.router.state_dict().items():
            out[f"router.{key}"] = value.detach()
        out.update({k: v.detach() for k, v in self.lora.items()})
        return {k: v.contiguous() for k, v in out.items()}

    def save(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Write atomically: temp file in the same folder, fsync, rename over ``path``.

        ``dtype``: store the floating tensors in it (e.g. bf16 for a trainer's fp32 weights)."""
        path = Path(path)
        meta = {
            **self.metadata,
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "config": self.config.to_json(),
            "base_model": self.config.base_model,
        }
        tensors = self.tensors()
        if dtype is not None:
            tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    @classmethod
    def from_tensors(
        cls, config: MoLEConfig, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None, source: str = ""
    ) -> Adapter:
        """Build and validate an adapter from file-layout tensors (used by load and import)."""
        where = f"{source}: " if source else ""
        with torch.device("meta"):
            model = InstructMoLE(config)
        expected: dict[str, tuple[int, ...]] = {}
        for spec in config.layers:
            gate_in = config.router_dim if spec.routing == "instruction" else spec.in_features
            n, r = config.num_experts, config.rank
            expected[f"mole.{spec.name}.A"] = (n, spec.in_features, r)
            expected[f"mole.{spec.name}.B"] = (n, r, spec.out_features)
            expected[f"mole.{spec.name}.gate"] = (n, gate_in)
        for key, value in model.router.state_dict().items():
            expected[f"router.{key}"] = tuple(value.shape)
        lora = {k: v for k, v in tensors.items() if k.startswith(LORA_PREFIX)}
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected) - set(lora))
        if missing:
            raise AdapterError(
                f"{where}the adapter lacks tensor {missing[0]!r} (and {len(missing) - 1} more) its config needs"
            )
        if unexpected:
            raise AdapterError(f"{where}the adapter has tensor {unexpected[0]!r} that its config does not describe")
        for key, shape in expected.items():
            value = tensors[key]
            if tuple(value.shape) != shape:
                raise AdapterError(f"{where}tensor {key!r} has shape {tuple(value.shape)} but the config needs {shape}")
            if not value.is_floating_point():
                raise AdapterError(
                    f"{where}tensor {key!r} has dtype {value.dtype}; adapter tensors must be floating point"
                )
        _check_lora(lora, where)
        state = {}
        for name, _layer in model.named_layers():
            key = name.replace(".", "/")
            state[f"experts.{key}.A"] = tensors[f"mole.{name}.A"]
            state[f"experts.{key}.B"] = tensors[f"mole.{name}.B"]
            state[f"experts.{key}.gate.weight"] = tensors[f"mole.{name}.gate"]
        state.update({f"router.{k[len('router.') :]}": v for k, v in tensors.items() if k.startswith("router.")})
        model.load_state_dict(state, assign=True, strict=True)
        model.eval()
        return cls(model, lora, dict(metadata or {}))


def _check_lora(lora: dict[str, Tensor], where: str) -> None:
    for key, value in lora.items():
        if key.endswith(".lora_A.weight"):
            base = key[: -len(".lora_A.weight")]
            up = lora.get(f"{base}.lora_B.weight")
            if up is None:
                raise AdapterError(f"{where}LoRA tensor {key!r} has no matching '{base}.lora_B.weight'")
            if up.ndim != 2 or value.ndim != 2 or up.shape[1] != value.shape[0]:
                raise AdapterError(
                    f"{where}LoRA pair {base!r} has ranks that do not match: lora_A {tuple(value.shape)}, "
                    f"lora_B {tuple(up.shape)}"
                )
        elif key.endswith(".lora_B.weight"):
            if key.replace(".lora_B.", ".lora_A.") not in lora:
                raise AdapterError(f"{where}LoRA tensor {key!r} has no matching lora_A")
        elif not key.endswith(".alpha"):
            raise AdapterError(f"{where}tensor {key!r} is neither an expert, the router nor a LoRA tensor")


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, with errors a user can act on."""
    path = Path(path)
    if not path.is_file():
        raise AdapterError(f"adapter file '{path}' does not exist; put it in models/instructmole or models/loras")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterError(
            f"'{path.name}' is not a readable .safetensors file (truncated or corrupt?): {err}; "
            "download or export it again"
        ) from None


def load_adapter(
    path: str | os.PathLike, device: str | torch.device = "cpu", expect_base: str | None = None
) -> Adapter:
    """Load and validate an adapter file. ``expect_base``: refuse adapters made for another model family."""
    path = Path(path)
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise AdapterError(
            f"'{path.name}' is a safetensors file but not an InstructMoLE adapter (its metadata has no "
            f"format '{FORMAT}'); load a plain LoRA with a LoRA loader, or convert a reference checkpoint "
            "with 'python -m instructmole convert'"
        )
    version = meta.get("format_version", "")
    if version != str(FORMAT_VERSION):
        raise AdapterError(
            f"'{path.name}' has adapter format version {version!r}, but this InstructMoLE reads version "
            f"{FORMAT_VERSION}; update the InstructMoLE pack"
        )
    try:
        config = MoLEConfig.from_json(meta.get("config", ""))
    except (ConfigError, ValueError) as err:
        raise AdapterError(f"'{path.name}' carries an invalid config: {err}") from None
    if expect_base is not None and config.base_model != expect_base:
        raise AdapterError(
            f"'{path.name}' was made for {config.base_model!r}, not {expect_base!r}; pick an adapter for this model"
        )
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterError(f"'{path.name}' could not be read (truncated or corrupt?): {err}") from None
    extra = {k: v for k, v in meta.items() if k not in ("format", "format_version", "config", "base_model")}
    return Adapter.from_tensors(config, tensors, extra, source=path.name)


def describe(adapter: Adapter) -> dict:
    """A JSON-able summary for the inspector and the nodes."""
    cfg = adapter.config
    counts = adapter.model.num_parameters()
    counts["lora"] = sum(v.numel() for k, v in adapter.lora.items() if not k.endswith(".alpha"))
    return {
        "adapter_id": adapter.adapter_id,
        "base_model": cfg.base_model,
        "num_experts": cfg.num_experts,
        "top_k": cfg.top_k,
        "rank": cfg.rank,
        "alpha": cfg.alpha,
        "layers": [
            {"name": s.name, "in": s.in_features, "out": s.out_features, "routing": s.routing} for s in cfg.layers
        ],
        "lora_modules": [p.module for p in adapter.lora_parts()],
        "parameters": counts,
        "metadata": adapter.metadata,
        "config": json.loads(cfg.to_json()),
    }
