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
JSON), ``base_model``. ``Adapter.from_tensors`` validates names, shapes, dtypes and values and fails
with one sentence that says what is wrong and what to do: an adapter that builds is one that routes.
NaN, infinite or absurdly large weights are refused (they would turn every image black), and the
floating dtypes are brought to one per part (MoLE part, plain LoRA; fp8 to bf16, a mix to the
widest present) so the first forward never meets two dtypes in one matmul. Saving goes through a
temp file, fsync and rename, so a crash never leaves half an adapter behind.

This module is the adapter *type* and imports no file reader: ``formats.py`` reads files of every
format (ours, ICEdit's) into it and ``icedit.py``/``reference.py`` convert other layouts to it, so
each of them depends on this one and nothing here depends back on them.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from .config import LIMITS, MoLEConfig, _show
from .council import Council
from .errors import InstructMoLEError
from .files import atomic_path
from .model import InstructMoLE, make_router
from .runtime import DeviceCache, MoLERuntime

__all__ = ["FORMAT", "FORMAT_VERSION", "Adapter", "AdapterError", "LoraPart", "describe"]

FORMAT = "instructmole"
FORMAT_VERSION = 1
LORA_PREFIX = "transformer."
MAX_LORA_ALPHA = 1e6
MAX_ABS_WEIGHT = 1e6  # see _check_values
_LORA_KEY = re.compile(r"transformer\.([A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*)\.(lora_A\.weight|lora_B\.weight|alpha)")
RESERVED_METADATA = ("format", "format_version", "config", "base_model")


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

    @property
    def cache(self) -> DeviceCache:
        """The adapter's tensors as inference runs them (fp32 router, experts per device and dtype),
        made once and shared by every runtime of this adapter and by ``route``."""
        cache = self.__dict__.get("_cache")
        if cache is None or cache.model is not self.model:
            cache = self.__dict__["_cache"] = DeviceCache(self.model)
        return cache

    @torch.no_grad()
    def route(
        self,
        text: Tensor,
        pooled: Tensor | None,
        labels: list[str] | tuple[str, ...] = (),
        *,
        mask: Tensor | None = None,
    ) -> Council:
        """Councils for a batch of instructions, as in training but without noise or dropout.

        The runtime's one routing function (``MoLERuntime.route``) on this adapter's shared
        ``cache``: a council routed here is bit for bit the one a patched model routes for the same
        signal. ``text [b, t, text_dim]`` (the text features) and ``pooled [b, router_dim]`` (CLIP
        pooled; None for a model without one, ``config.router_pool == "text"``, which reads the
        instruction's tokens ``mask [b, t]`` instead) are checked first, so a wrong encoder gives one
        sentence rather than a matmul error."""
        self._check_route_inputs(text, pooled, mask)
        runtime = MoLERuntime(self.model, adapter_id=self.adapter_id, cache=self.cache)
        probs, indices, weights = runtime.route(text, pooled, mask=mask)
        return Council.from_topk(
            self.config.instruction_layers, probs, indices, weights, adapter_id=self.adapter_id, label=labels
        )

    def _check_route_inputs(self, text: Any, pooled: Any, mask: Any) -> None:
        cfg = self.config
        if not cfg.instruction_layers:
            raise AdapterError(
                "this adapter routes every layer per token, so there is no instruction council to compute; "
                "apply it to a model (attach or the Load node) and it routes inside the forward"
            )
        checks = [("text", text, 3, cfg.text_dim, "[instances, tokens, text_dim]")]
        if cfg.router_pool == "clip":
            checks.append(("pooled", pooled, 2, cfg.router_dim, "[instances, router_dim]"))
        elif pooled is not None:
            raise AdapterError(
                f"route: this adapter (for {cfg.base_model}) routes from the text alone; pass pooled=None and the "
                "instruction's token mask"
            )
        for name, value, ndim, width, axes in checks:
            if not isinstance(value, Tensor) or not value.is_floating_point():
                raise AdapterError(f"route: {name} must be a float tensor {axes}, got {_show(value)}")
            if value.ndim != ndim or value.shape[-1] != width or 0 in value.shape:
                raise AdapterError(
                    f"route: {name} has shape {tuple(value.shape)}, but this adapter reads {axes} with "
                    f"{'text_dim' if name == 'text' else 'router_dim'}={width}; encode with the model it was made for"
                )
        if pooled is not None and text.shape[0] != pooled.shape[0]:
            raise AdapterError(
                f"route: text has {text.shape[0]} instances but pooled has {pooled.shape[0]}; pass one of each per "
                "instruction"
            )
        if isinstance(mask, Tensor) and (mask.is_floating_point() or mask.is_complex()):
            raise AdapterError(
                f"route: mask is {mask.dtype}; give a bool (or 0/1 integer) mask, true on the instruction's tokens"
            )
        if mask is not None and (not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(text.shape[:2])):
            raise AdapterError(
                f"route: mask must be a tensor [instances, tokens] = {tuple(text.shape[:2])}, got {_show(mask)}"
            )

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

        ``dtype``: store the floating tensors in it (e.g. bf16 for a trainer's fp32 weights).
        A path that is empty or a folder is an ``AdapterError``; the disk's own failures (full,
        read-only) stay ``OSError`` and leave ``path`` as it was."""
        path = _target_path(path)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise AdapterError(f"save dtype={_show(dtype)} must be a floating torch dtype such as torch.bfloat16")
        bad = [k for k, v in self.metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
        if bad:
            raise AdapterError(f"adapter metadata entry {_show(bad[0])} must map a string to a string to be saved")
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
        """Build and validate an adapter from file-layout tensors (used by load and import).

        Everything the config implies is checked before any module is built, so a hostile config
        with thousands of huge layers fails in milliseconds when the tensors do not match it."""
        where = f"{source}: " if source else ""
        if not isinstance(config, MoLEConfig):
            raise AdapterError(f"{where}config must be a MoLEConfig, got {type(config).__name__}")
        tensors = _checked_tensor_dict(tensors, where)
        metadata = _checked_metadata(metadata, where)
        expected = _expected_shapes(config)
        lora = {k: v for k, v in tensors.items() if k.startswith(LORA_PREFIX)}
        missing = [k for k in expected if k not in tensors]
        if missing:
            raise AdapterError(
                f"{where}the adapter lacks tensor {missing[0]!r} (and {len(missing) - 1} more) its config needs"
            )
        unexpected = sorted(k for k in tensors if k not in expected and k not in lora)
        if unexpected:
            raise AdapterError(f"{where}the adapter has tensor {unexpected[0]!r} that its config does not describe")
        for key, shape in expected.items():
            value = tensors[key]
            if tuple(value.shape) != shape:
                raise AdapterError(
                    f"{where}tensor {_show(key, 120)} has shape {tuple(value.shape)} but the config needs {shape}"
                )
            if not value.is_floating_point():
                raise AdapterError(
                    f"{where}tensor {_show(key, 120)} has dtype {value.dtype}; adapter tensors must be floating point"
                )
        _check_lora_layout(lora, where)
        mole = _one_dtype({k: tensors[k] for k in expected})
        lora = _one_dtype(lora)
        _check_values({**mole, **lora}, where)
        _check_lora_alphas(lora, where)

        with torch.device("meta"):
            model = InstructMoLE(config)
        state = {}
        for spec in config.layers:
            key, name = spec.name.replace(".", "/"), spec.name
            state[f"experts.{key}.A"] = mole[f"mole.{name}.A"]
            state[f"experts.{key}.B"] = mole[f"mole.{name}.B"]
            state[f"experts.{key}.gate.weight"] = mole[f"mole.{name}.gate"]
        state.update({k: v for k, v in mole.items() if k.startswith("router.")})
        try:
            model.load_state_dict(state, assign=True, strict=True)
        except RuntimeError as err:  # every name and shape was checked above: this is a bug, worded
            raise AdapterError(f"{where}the adapter's tensors do not fit its config: {_short(err)}") from None
        model.eval()
        return cls(model, lora, metadata)


# ---- validation helpers ---------------------------------------------------------------------------


def _short(err: BaseException, limit: int = 200) -> str:
    """An exception's text on one line, cut short, for the end of an error sentence."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _checked_tensor_dict(tensors: Any, where: str) -> dict[str, Tensor]:
    """Names are strings, values are ordinary dense tensors with data, all on one device."""
    if not isinstance(tensors, dict):
        raise AdapterError(
            f"{where}the adapter's tensors must be a dict of name -> tensor, got {type(tensors).__name__}"
        )
    devices = set()
    for key, value in tensors.items():
        if not isinstance(key, str):
            raise AdapterError(f"{where}tensor name {_show(key, 120)} must be a string")
        if not isinstance(value, Tensor):
            raise AdapterError(f"{where}{_show(key, 120)} holds a {type(value).__name__}, not a tensor")
        if value.layout != torch.strided or value.is_meta or value.is_quantized:
            raise AdapterError(
                f"{where}tensor {_show(key, 120)} is not a plain dense tensor with data; store ordinary tensors"
            )
        devices.add(value.device)
    if len(devices) > 1:
        raise AdapterError(
            f"{where}the adapter's tensors lie on several devices ({', '.join(sorted(map(str, devices)))}); "
            "put them on one"
        )
    return tensors


def _checked_metadata(metadata: Any, where: str) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise AdapterError(f"{where}adapter metadata must be a dict of strings, got {type(metadata).__name__}")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise AdapterError(f"{where}adapter metadata entry {_show(key, 120)} must map a string to a string")
    return dict(metadata)


def _expected_shapes(config: MoLEConfig) -> dict[str, tuple[int, ...]]:
    """Every MoLE tensor name with the shape ``config`` implies, in file order (layers, then router).

    The router's shapes come from building just the router on the meta device (depth ≤ 64: cheap),
    so they never drift from ``routing.py``; the expert banks are computed, not built."""
    expected: dict[str, tuple[int, ...]] = {}
    n, r = config.num_experts, config.rank
    for spec in config.layers:
        gate_in = config.router_dim if spec.routing == "instruction" else spec.in_features
        expected[f"mole.{spec.name}.A"] = (n, spec.in_features, r)
        expected[f"mole.{spec.name}.B"] = (n, r, spec.out_features)
        expected[f"mole.{spec.name}.gate"] = (n, gate_in)
    with torch.device("meta"):
        router = make_router(config)
    for key, value in router.state_dict().items():
        expected[f"router.{key}"] = tuple(value.shape)
    return expected


def _check_lora_layout(lora: dict[str, Tensor], where: str) -> None:
    """Names ``transformer.<module>.lora_A.weight`` / ``lora_B.weight`` / ``alpha``, complete pairs,
    2-D floating tensors whose ranks agree and stay in bounds, and 0-d alphas."""
    parts: dict[str, dict[str, tuple[str, Tensor]]] = {}
    for key, value in lora.items():
        m = _LORA_KEY.fullmatch(key)
        if m is None:
            raise AdapterError(
                f"{where}tensor {_show(key, 120)} is neither an expert, the router nor a LoRA tensor "
                "('transformer.<module>.lora_A.weight', '.lora_B.weight' or '.alpha')"
            )
        if not value.is_floating_point():
            raise AdapterError(
                f"{where}LoRA tensor {_show(key, 120)} has dtype {value.dtype}; it must be floating point"
            )
        parts.setdefault(m.group(1), {})[m.group(2)] = (key, value)
    max_rank, max_width = LIMITS["rank"][1], LIMITS["in_features"][1]
    for module, part in parts.items():
        base = f"{LORA_PREFIX}{module}"
        if "lora_A.weight" not in part:
            other = next(iter(part.values()))[0]
            raise AdapterError(f"{where}LoRA tensor {_show(other, 120)} has no matching '{base}.lora_A.weight'")
        if "lora_B.weight" not in part:
            raise AdapterError(f"{where}LoRA tensor '{base}.lora_A.weight' has no matching '{base}.lora_B.weight'")
        down, up = part["lora_A.weight"][1], part["lora_B.weight"][1]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise AdapterError(
                f"{where}LoRA pair {_show(base, 120)} has ranks that do not match: lora_A {tuple(down.shape)}, "
                f"lora_B {tuple(up.shape)}; lora_A must be [rank, in] and lora_B [out, rank]"
            )
        rank, width_in, width_out = down.shape[0], down.shape[1], up.shape[0]
        if not 1 <= rank <= max_rank or not 1 <= width_in <= max_width or not 1 <= width_out <= max_width:
            raise AdapterError(
                f"{where}LoRA pair {_show(base, 120)} has rank {rank}, in {width_in}, out {width_out}; the rank "
                f"must be 1 to {max_rank} and the widths 1 to {max_width}"
            )
        if "alpha" in part and part["alpha"][1].ndim != 0:
            raise AdapterError(
                f"{where}LoRA alpha '{base}.alpha' has shape {tuple(part['alpha'][1].shape)}; it must be a "
                "0-d (scalar) tensor"
            )


def _check_lora_alphas(lora: dict[str, Tensor], where: str) -> None:
    """Alphas (already known finite) must be positive and sane: scale = alpha / rank multiplies the term."""
    for key, value in lora.items():
        if key.endswith(".alpha"):
            alpha = float(value)
            if not 0 < alpha <= MAX_LORA_ALPHA:
                raise AdapterError(
                    f"{where}LoRA alpha {_show(key, 120)} is {alpha:g}; it must be in (0, {MAX_LORA_ALPHA:g}]"
                )


def _compute_dtype(dtypes: set[torch.dtype]) -> torch.dtype:
    """One dtype that holds every given floating dtype exactly; fp8 (1 byte) counts as bf16.

    fp8 cannot be computed with on most hardware and mixed dtypes fail in the first matmul, so a
    part is brought to one dtype at load: the one present if it is alone, else the widest (fp16
    with bf16 -> fp32, as neither holds the other)."""
    dtypes = {torch.bfloat16 if d.itemsize < 2 else d for d in dtypes}
    if len(dtypes) == 1:
        return dtypes.pop()
    widest = max(d.itemsize for d in dtypes)
    at_widest = [d for d in dtypes if d.itemsize == widest]
    return at_widest[0] if len(at_widest) == 1 else torch.float32


def _one_dtype(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``tensors`` with every floating tensor in one compute dtype (the same dict when nothing changes).

    LoRA alphas (0-d) do not vote: a float32 alpha must not upcast a bf16 LoRA of hundreds of MB."""
    voters = {v.dtype for k, v in tensors.items() if not k.endswith(".alpha")}
    if not voters:
        voters = {v.dtype for v in tensors.values()}
    if not voters:
        return tensors
    target = _compute_dtype(voters)
    if all(v.dtype == target or (k.endswith(".alpha") and v.dtype.itemsize >= 2) for k, v in tensors.items()):
        return tensors
    return {
        k: v if v.dtype == target or (k.endswith(".alpha") and v.dtype.itemsize >= 2) else v.to(target)
        for k, v in tensors.items()
    }


def _check_values(tensors: dict[str, Tensor], where: str) -> None:
    """Refuse NaN, ±inf and absurd magnitudes, naming the first tensor that holds one.

    One ``aminmax`` per tensor (NaN propagates into min and max, inf and huge values show in one of
    them): a single read of every byte without the bool tensor ``isfinite`` would allocate, and one
    device sync for the whole adapter rather than one per tensor. Trained weights are far below
    ``MAX_ABS_WEIGHT``; a value beyond it is a corrupted or diverged export (a flipped exponent bit
    gives 1e30-ish values) that would route every image to NaN."""
    if not tensors:
        return
    names = list(tensors)
    bounds = torch.stack([torch.stack(torch.aminmax(tensors[k])).float() for k in names])  # [T, 2]
    sane = bounds.abs() <= MAX_ABS_WEIGHT  # False for NaN as well
    if bool(sane.all()):
        return
    bad = int((~sane).any(1).nonzero()[0])
    low, high = (float(v) for v in bounds[bad])
    if math.isnan(low) or math.isnan(high):
        what = "NaN"
    elif math.isinf(low) or math.isinf(high):
        what = "infinite values"
    else:
        what = (
            f"values up to {max(abs(low), abs(high)):.3g}, beyond the ±{MAX_ABS_WEIGHT:g} any trained weight stays in"
        )
    raise AdapterError(
        f"{where}tensor {_show(names[bad], 120)} holds {what}; the adapter is broken (a diverged training run or "
        "a corrupted file?): export it again from a good checkpoint"
    )


# ---- paths --------------------------------------------------------------------------------------


def _as_path(path: Any, what: str) -> Path:
    """A user's path argument as a ``Path``, or an ``AdapterError`` for empty or non-path values."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise AdapterError(f"{what} must be a file path, got {type(path).__name__}")
    try:
        text = os.fsdecode(path)
    except (TypeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{what} {_show(path)} is not a usable file path: {_short(err)}") from None
    if not text.strip():
        raise AdapterError(f"{what} is empty; pass the path of an adapter .safetensors file")
    if "\0" in text:
        raise AdapterError(f"{what} {_show(text, 120)} contains a NUL character; pass a real file path")
    return Path(text)


def _target_path(path: Any) -> Path:
    """Where ``save`` may write: not empty, not a folder."""
    path = _as_path(path, "adapter output path")
    if path.is_dir():
        raise AdapterError(
            f"adapter output path '{path}' is a folder; name a file such as '{path / 'adapter.safetensors'}'"
        )
    return path


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
