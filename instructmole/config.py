"""The MoLE configuration: what an adapter is, independent of any weights.

It travels inside every adapter file as JSON, so it validates eagerly and quotes the bad value:
a typo in a hand-written config must fail at load, not as a shape error deep inside a forward.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from .errors import InstructMoLEError
from .layers import block_of

__all__ = ["ConfigError", "LayerSpec", "MoLEConfig", "Routing"]

Routing = Literal["instruction", "token"]
_ROUTINGS = ("instruction", "token")


class ConfigError(InstructMoLEError):
    """A MoLE configuration (or a file's copy of one) is invalid."""


@dataclass(frozen=True)
class LayerSpec:
    """One Linear that carries experts.

    ``routing="instruction"``: the gate reads the instruction signal (router_dim) and one council
    serves every token of an image. ``"token"``: the gate reads the layer's own input and routes
    each token (the reference's token-route overrides).
    """

    name: str
    in_features: int
    out_features: int
    routing: Routing = "instruction"

    def __post_init__(self) -> None:
        block_of(self.name)  # raises with the name quoted
        if self.routing not in _ROUTINGS:
            raise ConfigError(f"layer {self.name!r}: routing {self.routing!r} must be one of {_ROUTINGS}")
        for what in ("in_features", "out_features"):
            value = getattr(self, what)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"layer {self.name!r}: {what}={value!r} must be a positive integer")


@dataclass(frozen=True)
class MoLEConfig:
    """Experts, routing and router sizes of one InstructMoLE adapter (defaults: the paper's)."""

    layers: tuple[LayerSpec, ...]
    num_experts: int = 8
    top_k: int = 4
    rank: int = 32
    alpha: float = 32.0
    # Instruction router: T5 token features (text_dim) -> Perceiver (router_dim) + CLIP pooled.
    text_dim: int = 4096
    router_dim: int = 768  # also the CLIP-L pooled width it is added to
    router_heads: int = 12
    router_head_dim: int = 64
    router_depth: int = 2
    router_ff_mult: int = 4
    router_dropout: float = 0.1  # on the LayerNorm'd signal, training only
    gate_noise: bool = True  # Gaussian logit noise of std 1/N, training only
    text_length: int = 512  # T5 padding length the router was trained with (no attention mask)
    base_model: str = "flux.1-kontext-dev"
    extra: dict[str, Any] = field(default_factory=dict)  # free-form provenance, kept on round trips

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        positive = (
            "num_experts",
            "top_k",
            "rank",
            "text_dim",
            "router_dim",
            "router_heads",
            "router_head_dim",
            "router_depth",
            "router_ff_mult",
            "text_length",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if self.top_k > self.num_experts:
            raise ConfigError(f"top_k={self.top_k} cannot exceed num_experts={self.num_experts}")
        if not self.alpha > 0:
            raise ConfigError(f"alpha={self.alpha!r} must be positive")
        if not 0 <= self.router_dropout < 1:
            raise ConfigError(f"router_dropout={self.router_dropout!r} must be in [0, 1)")
        if not self.layers:
            raise ConfigError("layers is empty: an adapter needs at least one target layer")
        names = [spec.name for spec in self.layers]
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            raise ConfigError(f"layers lists {dupes[0]!r} more than once")

    @property
    def scale(self) -> float:
        """The LoRA scale alpha / r applied to every expert."""
        return self.alpha / self.rank

    @property
    def layer_names(self) -> list[str]:
        return [spec.name for spec in self.layers]

    @property
    def instruction_layers(self) -> list[str]:
        """Layers routed by the instruction signal, in config order: the rows of a Council."""
        return [spec.name for spec in self.layers if spec.routing == "instruction"]

    def layer(self, name: str) -> LayerSpec:
        for spec in self.layers:
            if spec.name == name:
                return spec
        raise KeyError(f"layer {name!r} is not in this adapter")

    # ---- serialisation ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["layers"] = [asdict(spec) for spec in self.layers]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoLEConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"config has unknown key {unknown[0]!r}; known keys: {sorted(known)}")
        if "layers" not in data:
            raise ConfigError("config has no 'layers'")
        try:
            layers = tuple(LayerSpec(**spec) for spec in data["layers"])
        except TypeError as err:
            raise ConfigError(f"config 'layers' entry is malformed: {err}") from None
        return cls(**{**data, "layers": layers})

    @classmethod
    def from_json(cls, text: str) -> MoLEConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"config is not valid JSON: {err}") from None
        return cls.from_dict(data)

    @classmethod
    def for_flux(
        cls,
        num_double: int = 19,
        num_single: int = 38,
        hidden_size: int = 3072,
        mlp_ratio: float = 4.0,
        token_routed: tuple[str, ...] = (),
        **kwargs: Any,
    ) -> MoLEConfig:
        """The reference layer set (double-block image FF out, single-block proj_out) for a Flux."""
        from .layers import double_ff_out, single_proj_out

        mlp = int(hidden_size * mlp_ratio)
        specs = [LayerSpec(double_ff_out(n), mlp, hidden_size) for n in range(num_double)]
        specs += [LayerSpec(single_proj_out(n), hidden_size + mlp, hidden_size) for n in range(num_single)]
        specs = [
            LayerSpec(s.name, s.in_features, s.out_features, "token" if s.name in token_routed else "instruction")
            for s in specs
        ]
        return cls(layers=tuple(specs), **kwargs)
