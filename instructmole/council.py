"""The Council: which experts serve each instruction-routed layer of each instance, and how much.

Stored densely as ``weights [b, L, n]`` (zero outside the council) next to the router's full
``probs [b, L, n]``; this makes every override a simple tensor edit and keeps councils of uneven
size (after ``force``/``only``) rectangular. ``compact()`` turns it into the ``[b, L, k]`` index
and weight form the compute paths take; zero-weight padding slots cost a little and add nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from .errors import InstructMoLEError

__all__ = ["Council", "CouncilMismatchError"]


class CouncilMismatchError(InstructMoLEError):
    """A council does not fit the adapter (or the other council) it is used with."""


@dataclass(frozen=True, eq=False)
class Council:
    layers: tuple[str, ...]  # canonical names of the instruction-routed layers, in order
    probs: Tensor  # [b, L, n] router probabilities (float32)
    weights: Tensor  # [b, L, n] council weights; 0 = not a member
    top_k: int  # the adapter's k: the council size that ban/top refill to
    adapter_id: str = ""  # fingerprint of the adapter that routed it ("" = unknown)
    label: tuple[str, ...] = ()  # per instance: the instruction it was routed from, when known
    banned: Tensor | None = None  # [b, L, n] experts banned by an override: refills skip them

    @property
    def banned_mask(self) -> Tensor:
        return self.banned if self.banned is not None else torch.zeros_like(self.weights, dtype=torch.bool)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        if self.probs.shape != self.weights.shape or self.probs.ndim != 3:
            raise CouncilMismatchError(
                f"council probs {tuple(self.probs.shape)} and weights {tuple(self.weights.shape)} "
                "must both be [instances, layers, experts]"
            )
        if self.probs.shape[1] != len(self.layers):
            raise CouncilMismatchError(
                f"council has {self.probs.shape[1]} layer rows but names {len(self.layers)} layers"
            )

    # ---- shape --------------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return self.probs.shape[0]

    @property
    def num_experts(self) -> int:
        return self.probs.shape[2]

    def row(self, b: int) -> Council:
        """Instance ``b`` alone (a batch of one)."""
        label = self.label[b : b + 1] if self.label else ()
        banned = self.banned[b : b + 1] if self.banned is not None else None
        return replace(self, probs=self.probs[b : b + 1], weights=self.weights[b : b + 1], label=label, banned=banned)

    def expand(self, batch_size: int) -> Council:
        """A batch of one repeated ``batch_size`` times (for fixed councils)."""
        if self.batch_size == batch_size:
            return self
        if self.batch_size != 1:
            raise CouncilMismatchError(f"a council of {self.batch_size} instances cannot serve a batch of {batch_size}")
        return replace(
            self,
            probs=self.probs.expand(batch_size, -1, -1),
            weights=self.weights.expand(batch_size, -1, -1),
            label=self.label * batch_size,
            banned=self.banned.expand(batch_size, -1, -1) if self.banned is not None else None,
        )

    @staticmethod
    def cat(councils: Sequence[Council]) -> Council:
        """Stack councils of the same adapter along the instance axis."""
        first = councils[0]
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
        if self.layers != other.layers or self.num_experts != other.num_experts:
            raise CouncilMismatchError(
                f"councils come from different adapters ({len(self.layers)} layers × {self.num_experts} "
                f"experts vs {len(other.layers)} × {other.num_experts})"
            )

    def check_adapter(self, layers: Sequence[str], num_experts: int, adapter_id: str = "") -> None:
        """Refuse a council routed by another adapter; the message says how to get a fitting one."""
        if tuple(layers) != self.layers or num_experts != self.num_experts:
            raise CouncilMismatchError(
                f"this council was made for another adapter ({len(self.layers)} layers × "
                f"{self.num_experts} experts; this one has {len(layers)} × {num_experts}): route the "
                "instruction again with the adapter you apply it to"
            )
        if adapter_id and self.adapter_id and adapter_id != self.adapter_id:
            raise CouncilMismatchError(
                "this council was routed by a different adapter file with the same layout: route the "
                "instruction again with the adapter you apply it to"
            )

    # ---- compute form -------------------------------------------------------------------------

    def compact(self) -> tuple[Tensor, Tensor]:
        """``(indices [b, L, K], weights [b, L, K])`` with K the largest council size present."""
        members = self.weights != 0
        k = max(int(members.sum(-1).max()), 1)
        # Members first, heaviest first; ties among non-members are harmless (their weight is 0).
        key = members.float() * (1.0 + self.weights.abs() / (self.weights.abs().amax() + 1))
        _, indices = key.topk(k, dim=-1)
        return indices, torch.gather(self.weights, -1, indices)

    def members(self, b: int, layer: int) -> list[tuple[int, float]]:
        """The council of one layer of one instance as ``(expert, weight)``, heaviest first."""
        w = self.weights[b, layer]
        order = torch.argsort(w.abs(), descending=True)
        return [(int(e), float(w[e])) for e in order if w[e] != 0]

    # ---- sharing ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (for workflow JSON, previews and the inspector)."""
        return {
            "format": "instructmole-council",
            "version": 1,
            "layers": list(self.layers),
            "top_k": self.top_k,
            "adapter_id": self.adapter_id,
            "label": list(self.label),
            "probs": self.probs.float().tolist(),
            "weights": self.weights.float().tolist(),
            "banned": self.banned.tolist() if self.banned is not None else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Council:
        if not isinstance(data, dict) or data.get("format") != "instructmole-council":
            raise CouncilMismatchError("this is not an InstructMoLE council (format is not 'instructmole-council')")
        if data.get("version") != 1:
            raise CouncilMismatchError(f"council version {data.get('version')!r} is not supported (expected 1)")
        return cls(
            layers=tuple(data["layers"]),
            probs=torch.tensor(data["probs"], dtype=torch.float32),
            weights=torch.tensor(data["weights"], dtype=torch.float32),
            top_k=int(data["top_k"]),
            adapter_id=str(data.get("adapter_id", "")),
            label=tuple(data.get("label", ())),
            banned=torch.tensor(data["banned"], dtype=torch.bool) if data.get("banned") is not None else None,
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
