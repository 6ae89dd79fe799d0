"""A council as a plain LoRA file: what every LoRA loader reads, equal to the pack's fixed mode.

A fixed council adds, per instruction-routed Linear, a fixed low-rank update ``ΔW = up @ down``
(``fold.iter_fold``: rank k·r, council weights, expert strength and the adapter's scale folded
in). Written as an ordinary diffusers-named LoRA, ``transformer.<module>.lora_A.weight [rank, in]``,
``lora_B.weight [out, rank]`` and ``alpha`` (a 0-d tensor), it loads in ComfyUI's core LoraLoader
and in diffusers' ``load_lora_weights`` (the key names the adapter file's plain-LoRA part already
uses, which both read, fused q/k/v rows included). Every pair is written with ``alpha = rank``
(scale 1) and the whole scale folded into ``lora_B``, so a loader that ignores alphas gives the same
update as one that reads them.

``rank="exact"`` keeps every factor: k·r per layer (fewer where a layer's council has fewer members),
plus the plain LoRA's rank where ``with_lora`` adds the adapter's plain-LoRA part on the same Linear.
``rank=N`` compresses each update wider than N by a truncated SVD done on the small factors only
(QR of ``up`` and ``downᵀ``, SVD of the ``R × R`` core: the ``out × in`` matrix is never built) and
reports each layer's relative Frobenius error ``‖ΔW − ΔW_N‖ / ‖ΔW‖``, which is exact, from the
discarded singular values. Token-routed layers route per token and have no fixed update: an adapter
with any is refused.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from .adapter import LORA_PREFIX, Adapter
from .checks import checked_strength
from .council import Council, describe_value
from .errors import InstructMoLEError
from .files import atomic_path
from .fold import iter_fold
from .layers import to_bfl
from .overrides import with_strength
from .validation import whole_number

__all__ = ["DTYPES", "CouncilLora", "ExportError", "ExportedLayer", "council_lora", "export_council_lora", "parse_rank"]

EXPORT_FORMAT = "instructmole-council-lora"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_RANK = 4096


class ExportError(InstructMoLEError):
    """A council cannot be exported as asked (wrong adapter, several instances, a bad rank or path)."""


@dataclass(frozen=True)
class ExportedLayer:
    """One written LoRA pair: its module, what it holds, its rank before and after, and its error."""

    module: str  # canonical diffusers module name
    parts: str  # "council", "lora" or "council+lora"
    full_rank: int  # the rank of the exact factors
    rank: int  # the rank written
    error: float  # relative Frobenius error of the written update (0 when exact)


@dataclass
class CouncilLora:
    """The LoRA tensors of one exported council, the per-layer report and the file's metadata."""

    tensors: dict[str, Tensor]
    layers: list[ExportedLayer]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def max_error(self) -> float:
        return max((layer.error for layer in self.layers), default=0.0)

    def report(self) -> str:
        """Per layer: module, parts, rank written (of the exact rank) and the relative error."""
        width = max((len(layer.module) for layer in self.layers), default=10)
        lines = [f"{'layer':<{width}}  {'parts':<12}  {'rank':>11}  rel. error"]
        for layer in self.layers:
            rank = f"{layer.rank}/{layer.full_rank}"
            lines.append(f"{layer.module:<{width}}  {layer.parts:<12}  {rank:>11}  {layer.error:.3e}")
        total = sum(v.numel() for k, v in self.tensors.items() if not k.endswith(".alpha"))
        lines.append(
            f"{len(self.layers)} LoRA pairs, {total:,} parameters, rank {self.metadata.get('instructmole_rank', '?')}, "
            f"largest relative error {self.max_error:.3e}"
        )
        return "\n".join(lines)

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write atomically (temp file, fsync, rename); an existing file only with ``overwrite``."""
        path = _output_path(path, overwrite)
        try:
            with atomic_path(path) as tmp:
                save_file(self.tensors, str(tmp), metadata=self.metadata)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as err:
            raise ExportError(f"cannot write the LoRA to '{path}': {err.strerror or err}") from None
        return path


def parse_rank(value: Any) -> int | None:
    """``"exact"`` -> None (keep every factor), a whole number from 1 to ``MAX_RANK`` -> that number."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "exact":
            return None
        value = int(text) if text.lstrip("+-").isdigit() else text
    n = whole_number(value)
    if n is None or not 1 <= n <= MAX_RANK:
        raise ExportError(
            f"rank {describe_value(value)} is not possible; use 'exact' or a whole number from 1 to {MAX_RANK}"
        )
    return n


def _checked_inputs(adapter: Any, council: Any) -> tuple[Adapter, Council]:
    if not isinstance(adapter, Adapter):
        raise ExportError(f"expected an InstructMoLE adapter, got {describe_value(adapter)}")
    if not isinstance(council, Council):
        raise ExportError(f"expected an InstructMoLE council, got {describe_value(council)}")
    cfg = adapter.config
    council.check_adapter(cfg.instruction_layers, cfg.num_experts, adapter.adapter_id)
    if council.batch_size != 1:
        raise ExportError(
            f"this council holds {council.batch_size} instructions and a LoRA file holds one; pick one with "
            "council.row(i)"
        )
    token = [s.name for s in cfg.layers if s.routing == "token"]
    if token:
        raise ExportError(
            f"this adapter routes {len(token)} layers per token (e.g. {token[0]!r}), which no fixed LoRA can hold; "
            "only adapters whose layers are all instruction-routed can be exported"
        )
    for name in cfg.instruction_layers:
        try:
            to_bfl(name, 1)  # only whether a loader knows the name; fused rows map by name too
        except ValueError:
            raise ExportError(
                f"layer {name!r} is not a FLUX module that LoRA loaders know by name, so it cannot be exported"
            ) from None
    return adapter, council


def _compress(down: Tensor, up: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """The best rank-``rank`` approximation of ``up @ down`` as factors, and its relative error.

    QR of ``up [out, R]`` and ``downᵀ [in, R]``, then the SVD of the small core ``R₁ R₂ᵀ``: the
    singular values of ``up @ down`` without building it. Float64 throughout, so the reported
    error is the real one to far below fp32 rounding."""
    q1, r1 = torch.linalg.qr(up.double())
    q2, r2 = torch.linalg.qr(down.double().T)
    u, s, vh = torch.linalg.svd(r1 @ r2.T, full_matrices=False)
    total = float(s.square().sum())
    keep = min(rank, s.numel())
    error = math.sqrt(max(float(s[keep:].square().sum()), 0.0) / total) if total > 0 else 0.0
    root = s[:keep].sqrt()
    new_up = (q1 @ u[:, :keep]) * root  # [out, keep]
    new_down = root[:, None] * (vh[:keep] @ q2.T)  # [keep, in]
    return new_down, new_up, error


def council_lora(
    adapter: Adapter,
    council: Council,
    *,
    rank: int | str | None = "exact",
    with_lora: bool = False,
    lora_strength: float = 1.0,
    expert_strength: float = 1.0,
    dtype: torch.dtype | str = torch.float32,
) -> CouncilLora:
    """The council (at ``expert_strength``; plus the adapter's plain LoRA at ``lora_strength`` when
    ``with_lora``) as LoRA tensors that any loader applies at strength 1 to give fixed mode's output.

    ``rank``: ``"exact"``/None keeps every factor; a number N compresses wider updates by SVD."""
    adapter, council = _checked_inputs(adapter, council)
    limit = parse_rank(rank) if rank is not None else None
    expert_strength = checked_strength("expert_strength", expert_strength, ExportError)
    lora_strength = checked_strength("lora_strength", lora_strength, ExportError)
    if not isinstance(with_lora, bool):
        raise ExportError(f"with_lora must be True or False, got {describe_value(with_lora)}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ExportError(f"dtype {describe_value(dtype)} is not possible; choose one of: {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ExportError(f"dtype {describe_value(dtype)} is not possible; choose one of: {', '.join(DTYPES)}")

    # Per module: the exact factors, as a list of (down, up) terms of one Linear.
    terms: dict[str, list[tuple[Tensor, Tensor]]] = {}
    kinds: dict[str, list[str]] = {}
    if expert_strength != 0:
        folded = with_strength(council, expert_strength) if expert_strength != 1.0 else council
        for name, (down, up) in iter_fold(adapter.model, folded, factors=True):
            terms.setdefault(name, []).append((down.detach().cpu().float(), up.detach().cpu().float()))
            kinds.setdefault(name, []).append("council")
    if with_lora and lora_strength != 0:
        for part in adapter.lora_parts():
            up = part.up.detach().cpu().float() * (part.scale * lora_strength)
            terms.setdefault(part.module, []).append((part.down.detach().cpu().float(), up))
            kinds.setdefault(part.module, []).append("lora")
    if not terms:
        raise ExportError(
            "there is nothing to export: the council has no members at this expert strength and no plain-LoRA part "
            "is included"
        )

    tensors: dict[str, Tensor] = {}
    layers: list[ExportedLayer] = []
    for module, pairs in terms.items():
        down = torch.cat([d for d, _ in pairs])
        up = torch.cat([u for _, u in pairs], dim=1)
        full = down.shape[0]
        error = 0.0
        if limit is not None and full > limit:
            down, up, error = _compress(down, up, limit)
        base = f"{LORA_PREFIX}{module}"
        tensors[f"{base}.lora_A.weight"] = down.to(dtype).contiguous()
        tensors[f"{base}.lora_B.weight"] = up.to(dtype).contiguous()
        tensors[f"{base}.alpha"] = torch.tensor(float(down.shape[0]))
        layers.append(ExportedLayer(module, "+".join(kinds[module]), full, down.shape[0], error))

    label = council.label[0] if council.label else ""
    metadata = {
        "format": "pt",
        "instructmole_export": EXPORT_FORMAT,
        "instructmole_adapter_id": adapter.adapter_id,
        "instructmole_base_model": adapter.config.base_model,
        "instructmole_council_label": label,
        "instructmole_rank": "exact" if limit is None else str(limit),
        "instructmole_expert_strength": repr(float(expert_strength)),
        "instructmole_with_lora": "true" if with_lora else "false",
        "instructmole_lora_strength": repr(float(lora_strength)) if with_lora else "",
        "instructmole_dtype": next(k for k, v in DTYPES.items() if v == dtype),
        "instructmole_errors": json.dumps({layer.module: layer.error for layer in layers}),
        "instructmole_council": json.dumps(council.to_dict()),
    }
    return CouncilLora(tensors, layers, metadata)


def export_council_lora(
    adapter: Adapter, council: Council, path: str | os.PathLike, *, overwrite: bool = False, **options: Any
) -> CouncilLora:
    """``council_lora(adapter, council, **options)`` written to ``path`` (``.safetensors``)."""
    _output_path(path, overwrite)  # refuse a bad path before any work
    result = council_lora(adapter, council, **options)
    result.save(path, overwrite=overwrite)
    return result


def _output_path(path: Any, overwrite: bool) -> Path:
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path).strip():
        raise ExportError(f"the output path {describe_value(path)} is not usable; name a .safetensors file")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ExportError(f"output '{path}' must end in .safetensors, as LoRA loaders expect")
    if path.is_dir():
        raise ExportError(f"output '{path}' is a folder; name a file inside it")
    if path.exists() and not overwrite:
        raise ExportError(f"'{path}' exists already; choose another name or pass overwrite")
    return path
