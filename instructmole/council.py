"""The Council: which experts serve each instruction-routed layer of each instance, and how much.

Stored densely as ``weights [b, L, n]`` (zero outside the council) next to the router's full
``probs [b, L, n]``; this makes every override a simple tensor edit and keeps councils of uneven
size (after ``force``/``only``) rectangular. ``compact()`` turns it into the ``[b, L, k]`` index
and weight form the compute paths take; zero-weight padding slots cost a little and add nothing.

Where councils come from, and what is checked there:

* the router (``MoLERuntime.route`` via ``Adapter.route``, ``attach``, the nodes): always stamped with the routing
  adapter's id. Every operation (row, expand, cat, the overrides) keeps that id, and councils of
  two adapters never mix (``check_compatible``); a council without an id is refused where it is
  applied (``check_adapter``).
* JSON (``from_dict``), the external boundary: every field is checked there (types, nesting,
  counts against the bounds below before any tensor is built, finiteness and ranges of every
  number), so a shared council can neither crash, exhaust memory nor carry NaN into a model.
* the constructor checks types and shapes only, never tensor values: training builds councils on
  the GPU with gradients, and a value check would force a device sync on every step.

Council weights are never negative and at most ``MAX_WEIGHT``; probabilities lie in [0, 1]. (A
negative expert effect is ``expert_strength`` on the loader nodes and ``attach``.)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from .errors import InstructMoLEError
from .layers import block_of
from .validation import whole_number

__all__ = ["MAX_EXPERTS", "MAX_INSTANCES", "MAX_LAYERS", "MAX_WEIGHT", "Council", "CouncilMismatchError"]

FORMAT = "instructmole-council"
VERSION = 1
# Bounds on a council read from JSON: far above any real adapter (FLUX.1 has 57 blocks, adapters
# 4-16 experts), low enough that a hostile file cannot make it allocate gigabytes.
MAX_LAYERS = 4096
MAX_EXPERTS = 256
MAX_INSTANCES = 4096
MAX_CELLS = 1 << 24  # instances × layers × experts: 64 MB per float32 tensor
MAX_WEIGHT = 100.0  # the largest council weight (routed weights are probabilities, at most 1)
MAX_NAME_CHARS = 256  # a layer name or an adapter id
MAX_LABEL_CHARS = 10_000  # the instruction an instance was routed from

_REQUIRED = ("format", "version", "layers", "probs", "weights", "top_k", "adapter_id")
_OPTIONAL = ("num_experts", "label", "banned")


class CouncilMismatchError(InstructMoLEError):
    """A council does not fit the adapter (or the other council) it is used with, or is malformed."""


def describe_value(value: Any, limit: int = 40) -> str:
    """A short, always printable description of a user's value for an error message.

    Never the full ``repr``: a rule text or a JSON list may be megabytes, and ``repr`` of an
    integer with thousands of digits raises.
    """
    if value is None or isinstance(value, (bool, float)):
        return repr(value)
    if isinstance(value, int):
        return repr(int(value)) if value.bit_length() <= 64 else "a whole number too large to use"
    if isinstance(value, str):
        return repr(value) if len(value) <= limit else repr(value[:limit]) + "…"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    if isinstance(value, Mapping):
        return f"an object with {len(value)} fields"
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _checked_top_k(value: Any, num_experts: int) -> int:
    k = whole_number(value)
    if k is None or not 1 <= k <= num_experts:
        raise CouncilMismatchError(
            f"council top_k is {describe_value(value)}; it must be a whole number from 1 to {num_experts} "
            "(the number of experts)"
        )
    return k


@dataclass(frozen=True, eq=False)
class Council:
    layers: tuple[str, ...]  # canonical names of the instruction-routed layers, in order
    probs: Tensor  # [b, L, n] router probabilities (float32)
    weights: Tensor  # [b, L, n] council weights; 0 = not a member
    top_k: int  # the adapter's k: the council size that ban/top refill to
    adapter_id: str = ""  # fingerprint of the adapter that routed it ("" = unknown: refused when applied)
    label: tuple[str, ...] = ()  # per instance (or one for all): the instruction it was routed from, when known
    banned: Tensor | None = None  # [b, L, n] experts banned by an override: refills skip them

    @property
    def banned_mask(self) -> Tensor:
        return self.banned if self.banned is not None else torch.zeros_like(self.weights, dtype=torch.bool)

    def __post_init__(self) -> None:
        """Types and shapes only (cheap, no device sync): values are checked at ``from_dict``."""
        object.__setattr__(self, "layers", self._checked_layers(self.layers))
        for name in ("probs", "weights"):
            t = getattr(self, name)
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise CouncilMismatchError(
                    f"council {name} must be a float tensor [instances, layers, experts], got {describe_value(t)}"
                )
        if self.probs.shape != self.weights.shape or self.probs.ndim != 3:
            raise CouncilMismatchError(
                f"council probs {tuple(self.probs.shape)} and weights {tuple(self.weights.shape)} "
                "must both be [instances, layers, experts]"
            )
        if self.probs.shape[1] != len(self.layers):
            raise CouncilMismatchError(
                f"council has {self.probs.shape[1]} layer rows but names {len(self.layers)} layers"
            )
        if self.probs.device != self.weights.device:
            raise CouncilMismatchError(
                f"council probs are on {self.probs.device} but its weights on {self.weights.device}; keep both on one"
            )
        object.__setattr__(self, "top_k", _checked_top_k(self.top_k, self.num_experts))
        if not isinstance(self.adapter_id, str):
            raise CouncilMismatchError(f"council adapter_id must be text, got {describe_value(self.adapter_id)}")
        object.__setattr__(self, "label", self._checked_label(self.label))
        if self.banned is not None and (
            not isinstance(self.banned, Tensor) or self.banned.dtype != torch.bool or self.banned.shape != self.shape
        ):
            raise CouncilMismatchError(
                f"council banned must be None or a bool tensor of shape {tuple(self.shape)}, "
                f"got {describe_value(self.banned)}"
            )

    @staticmethod
    def _checked_layers(layers: Any) -> tuple[str, ...]:
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
            raise CouncilMismatchError(f"council layers must be a list of layer names, got {describe_value(layers)}")
        layers = tuple(layers)
        bad = next((name for name in layers if not isinstance(name, str)), None)
        if bad is not None:
            raise CouncilMismatchError(f"council layers must be layer names (text), got {describe_value(bad)}")
        return layers

    def _checked_label(self, label: Any) -> tuple[str, ...]:
        if isinstance(label, (str, bytes)) or not isinstance(label, Iterable):
            raise CouncilMismatchError(f"council label must be a list of texts, got {describe_value(label)}")
        label = tuple(label)
        if len(label) == 1 and self.batch_size != 1:  # one instruction routed for a batch of rows
            label = label * self.batch_size
        if label and len(label) != self.batch_size:
            raise CouncilMismatchError(
                f"council label names {len(label)} instructions but the council holds {self.batch_size}; "
                "give one per instance, one for all, or none"
            )
        bad = next((text for text in label if not isinstance(text, str)), None)
        if bad is not None:
            raise CouncilMismatchError(f"council label must hold texts, got {describe_value(bad)}")
        return label

    # ---- shape --------------------------------------------------------------------------------

    @property
    def shape(self) -> torch.Size:
        """``[instances, layers, experts]``."""
        return self.probs.shape

    @property
    def batch_size(self) -> int:
        return self.probs.shape[0]

    @property
    def num_experts(self) -> int:
        return self.probs.shape[2]

    def _instance(self, b: Any) -> int:
        """``b`` as an instance index (negative counts from the end, as in Python)."""
        i = whole_number(b)
        if i is None or not -self.batch_size <= i < self.batch_size:
            raise CouncilMismatchError(
                f"instance {describe_value(b)} does not exist; this council holds {self.batch_size} "
                f"(0 to {self.batch_size - 1})"
            )
        return i % self.batch_size

    def row(self, b: int) -> Council:
        """Instance ``b`` alone (a batch of one)."""
        b = self._instance(b)
        label = self.label[b : b + 1] if self.label else ()
        banned = self.banned[b : b + 1] if self.banned is not None else None
        return replace(self, probs=self.probs[b : b + 1], weights=self.weights[b : b + 1], label=label, banned=banned)

    def expand(self, batch_size: int) -> Council:
        """A batch of one repeated ``batch_size`` times (for fixed councils)."""
        n = whole_number(batch_size)
        if n is None or not 1 <= n <= MAX_INSTANCES:
            raise CouncilMismatchError(
                f"batch size {describe_value(batch_size)} is not possible; choose a whole number from 1 to "
                f"{MAX_INSTANCES}"
            )
        if self.batch_size == n:
            return self
        if self.batch_size != 1:
            raise CouncilMismatchError(f"a council of {self.batch_size} instances cannot serve a batch of {n}")
        return replace(
            self,
            probs=self.probs.expand(n, -1, -1),
            weights=self.weights.expand(n, -1, -1),
            label=self.label * n,
            banned=self.banned.expand(n, -1, -1) if self.banned is not None else None,
        )

    @staticmethod
    def cat(councils: Sequence[Council]) -> Council:
        """Stack councils of the same adapter along the instance axis."""
        if isinstance(councils, (str, bytes, Council)) or not isinstance(councils, Iterable):
            raise CouncilMismatchError(f"cat takes a list of councils, got {describe_value(councils)}")
        councils = list(councils)
        if not councils:
            raise CouncilMismatchError("cat needs at least one council")
        first = councils[0]
        if not isinstance(first, Council):
            raise CouncilMismatchError(f"cat takes councils, got {describe_value(first)}")
        for other in councils[1:]:
            first.check_compatible(other)
        labels = tuple(lab for c in councils for lab in (c.label or ("",) * c.batch_size))
        return replace(
            first,
            probs=torch.cat([c.probs for c in councils]),
            weights=torch.cat([c.weights for c in councils]),
            label=labels if any(labels) else (),
            banned=torch.cat([c.banned_mask for c in councils])
            if any(c.banned is not None for c in councils)
            else None,
        )

    def check_compatible(self, other: Council) -> None:
        """Refuse to mix this council with ``other`` unless both were routed by the same adapter."""
        if not isinstance(other, Council):
            raise CouncilMismatchError(f"expected a council, got {describe_value(other)}")
        if self.layers != other.layers or self.num_experts != other.num_experts:
            raise CouncilMismatchError(
                f"councils come from different adapters ({len(self.layers)} layers × {self.num_experts} "
                f"experts vs {len(other.layers)} × {other.num_experts})"
            )
        if self.adapter_id != other.adapter_id:
            ids = " and ".join(describe_value(i) if i else "none" for i in (self.adapter_id, other.adapter_id))
            raise CouncilMismatchError(
                f"these councils were routed by different adapters with the same layout (ids {ids}): route "
                "both instructions with the same adapter"
            )
        if self.probs.device != other.probs.device:
            raise CouncilMismatchError(
                f"these councils live on different devices ({self.probs.device} and {other.probs.device}); "
                "move both to one device"
            )

    def check_adapter(self, layers: Sequence[str], num_experts: int, adapter_id: str = "") -> None:
        """Refuse a council routed by another adapter (or by none); the message says how to get a fitting one."""
        if tuple(layers) != self.layers or num_experts != self.num_experts:
            raise CouncilMismatchError(
                f"this council was made for another adapter ({len(self.layers)} layers × "
                f"{self.num_experts} experts; this one has {len(layers)} × {num_experts}): route the "
                "instruction again with the adapter you apply it to"
            )
        if not self.adapter_id:
            raise CouncilMismatchError(
                "this council carries no adapter id (it was built by hand, not routed): route the instruction "
                "again with the adapter you apply it to"
            )
        if not isinstance(adapter_id, str) or not adapter_id:
            raise CouncilMismatchError(
                f"a council can only be checked against an adapter's id, got {describe_value(adapter_id)}: "
                "pass the adapter's adapter_id"
            )
        if adapter_id != self.adapter_id:
            raise CouncilMismatchError(
                "this council was routed by a different adapter file with the same layout: route the "
                "instruction again with the adapter you apply it to"
            )

    # ---- compute form -------------------------------------------------------------------------

    def compact(self) -> tuple[Tensor, Tensor]:
        """``(indices [b, L, K], weights [b, L, K])`` with K the largest council size present."""
        if self.weights.numel() == 0:  # no layer (an adapter with token-routed layers only) or no instance
            empty = self.weights.new_zeros((*self.shape[:2], 1))
            return empty.long(), empty
        members = self.weights != 0
        k = max(int(members.sum(-1).max()), 1)
        # Members first, heaviest first; ties among non-members are harmless (their weight is 0).
        key = members.float() * (1.0 + self.weights.abs() / (self.weights.abs().amax() + 1))
        _, indices = key.topk(k, dim=-1)
        return indices, torch.gather(self.weights, -1, indices)

    def members(self, b: int, layer: int) -> list[tuple[int, float]]:
        """The council of one layer of one instance as ``(expert, weight)``, heaviest first."""
        b = self._instance(b)
        row = whole_number(layer)
        if row is None or not 0 <= row < len(self.layers):
            raise CouncilMismatchError(
                f"layer row {describe_value(layer)} does not exist; this council has rows 0 to {len(self.layers) - 1}"
            )
        w = self.weights[b, row].detach()
        order = torch.argsort(w.abs(), descending=True)
        return [(int(e), float(w[e])) for e in order if w[e] != 0]

    # ---- sharing ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (for workflow JSON, previews and the inspector)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "layers": list(self.layers),
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "adapter_id": self.adapter_id,
            "label": list(self.label),
            "probs": self.probs.detach().float().tolist(),
            "weights": self.weights.detach().float().tolist(),
            "banned": self.banned.tolist() if self.banned is not None else None,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Council:
        """The council a ``to_dict`` (or a shared JSON file) describes, every field checked first.

        Nesting and counts are checked before any tensor is built, so a hostile or broken file
        cannot allocate without bound; every error names the field, the bad value and what is
        allowed.
        """
        _check_fields(data)
        layers = _layer_names(data["layers"])
        shape = _grid_shape(data, len(layers))
        probs = _number_grid("probs", data["probs"], shape, 1.0, "router probabilities")
        weights = _number_grid("weights", data["weights"], shape, MAX_WEIGHT, "council weights")
        banned, label = data.get("banned"), data.get("label")
        return cls(
            layers=layers,
            probs=probs,
            weights=weights,
            top_k=_checked_top_k(data["top_k"], shape[2]),
            adapter_id=_adapter_id(data["adapter_id"]),
            label=() if label is None else _labels(label, shape[0]),
            banned=None if banned is None else _bool_grid(banned, shape),
        )

    @classmethod
    def from_topk(
        cls,
        layers: Sequence[str],
        probs: Tensor,
        indices: Tensor,
        weights: Tensor,
        *,
        adapter_id: str = "",
        label: Sequence[str] = (),
    ) -> Council:
        """From the router's output (probs ``[b, L, n]``, top-k indices and weights ``[b, L, k]``)."""
        dense = torch.zeros_like(probs).scatter_(-1, indices, weights.to(probs.dtype))
        return cls(tuple(layers), probs, dense, indices.shape[-1], adapter_id, tuple(label))


# ---- from_dict's checks -----------------------------------------------------------------------


def _check_fields(data: Any) -> None:
    if not isinstance(data, Mapping):
        raise CouncilMismatchError(
            f"this is not an InstructMoLE council (a JSON object with format {FORMAT!r}), got {describe_value(data)}"
        )
    fmt = data.get("format")
    if not isinstance(fmt, str) or fmt != FORMAT:
        raise CouncilMismatchError(f"this is not an InstructMoLE council (format is not {FORMAT!r})")
    version = data.get("version")
    if type(version) is not int or version != VERSION:
        raise CouncilMismatchError(
            f"council version {describe_value(version)} is not supported; this InstructMoLE reads version {VERSION}"
        )
    unknown = [key for key in data if key not in _REQUIRED and key not in _OPTIONAL]
    if unknown:
        raise CouncilMismatchError(
            f"council field {describe_value(unknown[0])} is not known; the fields are "
            f"{', '.join(_REQUIRED + _OPTIONAL)}"
        )
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise CouncilMismatchError(f"council field {missing[0]!r} is missing; export the council again")


def _is_list(value: Any) -> bool:
    return type(value) is list or type(value) is tuple


def _layer_names(value: Any) -> tuple[str, ...]:
    if not _is_list(value) or len(value) > MAX_LAYERS:
        raise CouncilMismatchError(
            f"council layers must be a list of at most {MAX_LAYERS} layer names, got {describe_value(value)}"
        )
    seen: set[str] = set()
    for i, name in enumerate(value):
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
            raise CouncilMismatchError(
                f"council layers[{i}] is {describe_value(name)}; a layer name is text of 1 to {MAX_NAME_CHARS} "
                "characters"
            )
        try:
            block_of(name)
        except ValueError:
            raise CouncilMismatchError(
                f"council layers[{i}] is {describe_value(name)}, not a layer inside a transformer block; expected "
                "'transformer_blocks.N.…' or 'single_transformer_blocks.N.…'"
            ) from None
        if name in seen:
            raise CouncilMismatchError(f"council layers lists {describe_value(name)} twice; each layer appears once")
        seen.add(name)
    return tuple(value)


def _grid_shape(data: Mapping, num_layers: int) -> tuple[int, int, int]:
    """``(instances, layers, experts)`` of the council, from probs and num_experts, all bounded."""
    probs = data["probs"]
    if not _is_list(probs) or len(probs) > MAX_INSTANCES:
        raise CouncilMismatchError(
            f"council probs must be a list of at most {MAX_INSTANCES} instances, got {describe_value(probs)}"
        )
    n = data.get("num_experts")
    if n is None:  # written before num_experts was stored: the first row tells
        first = probs[0] if probs and _is_list(probs[0]) and probs[0] else None
        if first is None or not _is_list(first[0]):
            raise CouncilMismatchError(
                "council probs must be [instances][layers][experts] lists with at least one row, or the council "
                "must give num_experts"
            )
        n = len(first[0])
    if type(n) is not int or not 1 <= n <= MAX_EXPERTS:
        raise CouncilMismatchError(
            f"council has {describe_value(n)} experts per layer; it must be a whole number from 1 to {MAX_EXPERTS}"
        )
    if len(probs) * num_layers * n > MAX_CELLS:
        raise CouncilMismatchError(
            f"council of {len(probs)} instances × {num_layers} layers × {n} experts is too large; at most "
            f"{MAX_CELLS} cells are read"
        )
    return len(probs), num_layers, n


def _rows(name: str, value: Any, shape: tuple[int, int, int]) -> list:
    """The innermost lists of a ``[b][L][n]`` nesting, after checking every level's length."""
    b, num_layers, n = shape
    levels = ((b, "instances"), (num_layers, "layer rows"), (n, "expert values"))

    def check(where: str, item: Any, level: int) -> None:
        length, what = levels[level]
        if not _is_list(item) or len(item) != length:
            raise CouncilMismatchError(f"council {where} must be a list of {length} {what}, got {describe_value(item)}")

    check(name, value, 0)
    rows = []
    for i, plane in enumerate(value):
        check(f"{name}[{i}]", plane, 1)
        for j, row in enumerate(plane):
            check(f"{name}[{i}][{j}]", row, 2)
            rows.append(row)
    return rows


def _is_number_in(x: Any, high: float) -> bool:
    """A real, finite number in ``[0, high]`` (NaN fails every comparison; bools are not numbers)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= high


def _number_grid(name: str, value: Any, shape: tuple[int, int, int], high: float, what: str) -> Tensor:
    rows = _rows(name, value, shape)
    for r, row in enumerate(rows):
        # Fast path first: JSON gives exact ints and floats.
        if all((type(x) is float or type(x) is int) and 0 <= x <= high for x in row):
            continue
        for e, x in enumerate(row):
            if not _is_number_in(x, high):
                i, j = divmod(r, shape[1])
                raise CouncilMismatchError(
                    f"council {name}[{i}][{j}][{e}] is {describe_value(x)}; {what} are finite numbers from 0 to "
                    f"{high:g}"
                )
    return torch.tensor(rows, dtype=torch.float32).reshape(shape)


def _bool_grid(value: Any, shape: tuple[int, int, int]) -> Tensor:
    rows = _rows("banned", value, shape)
    for r, row in enumerate(rows):
        bad = next((e for e, x in enumerate(row) if type(x) is not bool), None)
        if bad is not None:
            i, j = divmod(r, shape[1])
            raise CouncilMismatchError(
                f"council banned[{i}][{j}][{bad}] is {describe_value(row[bad])}; banned holds true or false per expert"
            )
    return torch.tensor(rows, dtype=torch.bool).reshape(shape)


def _adapter_id(value: Any) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME_CHARS or not value.isprintable():
        raise CouncilMismatchError(
            f"council adapter_id is {describe_value(value)}; it must be the id of the adapter that routed it "
            f"(1 to {MAX_NAME_CHARS} printable characters): route the instruction again to get one"
        )
    return value


def _labels(value: Any, batch_size: int) -> tuple[str, ...]:
    if not _is_list(value) or len(value) not in (0, batch_size):
        raise CouncilMismatchError(
            f"council label must be a list of {batch_size} texts (one per instance) or empty, got "
            f"{describe_value(value)}"
        )
    for i, text in enumerate(value):
        if not isinstance(text, str) or len(text) > MAX_LABEL_CHARS:
            raise CouncilMismatchError(
                f"council label[{i}] is {describe_value(text)}; a label is text of at most {MAX_LABEL_CHARS} characters"
            )
    return tuple(value)
