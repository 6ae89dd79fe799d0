"""The MoLE configuration: what an adapter is, independent of any weights.

It travels inside every adapter file as JSON, so it validates eagerly and quotes the bad value:
a typo in a hand-written config (or a hostile file) must fail at load with one sentence naming the
field, the value and what is allowed, not as a TypeError deep inside a comparison, a shape error
inside a forward, or minutes spent building a model nobody could hold in memory.
"""

from __future__ import annotations

import functools
import json
import re
import typing
from dataclasses import Field, asdict, dataclass, field, fields
from typing import Any, Literal

from .errors import ConfigError
from .layers import block_of
from .validation import checked, checked_choice, checked_int, field_spec
from .validation import shown as _show

__all__ = [
    "LIMITS",
    "MAX_ALPHA",
    "MAX_LAYERS",
    "MAX_PARAMETERS",
    "ConfigError",
    "LayerSpec",
    "MoLEConfig",
    "RouterPool",
    "Routing",
    "TokenWeights",
    "settings",
]

Routing = Literal["instruction", "token"]
TokenWeights = Literal["probs", "renormalised"]
# What the router adds to the Perceiver's signal: the CLIP-L pooled vector (FLUX.1), or a masked mean
# of the instruction's own text features, projected (models without a pooled vector: FLUX.2, Qwen).
RouterPool = Literal["clip", "text"]

# Inclusive (min, max) of every integer field. Generous (the paper's adapter uses a fraction of each)
# but finite, so that a config can never ask for more than a machine could hold.
LIMITS: dict[str, tuple[int, int]] = {
    "num_experts": (1, 256),
    "top_k": (1, 256),
    "rank": (1, 4096),
    "text_dim": (1, 65536),
    "router_dim": (1, 65536),
    "router_heads": (1, 1024),
    "router_head_dim": (1, 4096),
    "router_depth": (1, 64),
    "router_ff_mult": (1, 64),
    "text_length": (1, 65536),
    "in_features": (1, 2**20),
    "out_features": (1, 2**20),
}
MAX_LAYERS = 4096  # every Linear of a FLUX transformer is about 500
MAX_ALPHA = 1e6
# A whole adapter (experts, gates, router) may hold at most this many parameters: 2**34 is about
# 17 billion, more than FLUX.1 itself, and 64 GiB in fp32; anything beyond is a typo or an attack.
MAX_PARAMETERS = 2**34
_MAX_NAME = 256
_MAX_EXTRA_DEPTH = 32
_MAX_EXTRA_BYTES = 2**20
_NAME = re.compile(r"[A-Za-z0-9_.]+")
_LAYER_KEYS = ("name", "in_features", "out_features", "routing")


def _counted(name: str, help: str) -> dict[str, Any]:
    """The metadata of integer field ``name``: its help and its ``LIMITS``."""
    low, high = LIMITS[name]
    return field_spec(help, min=low, max=high)


def _nesting(value: Any) -> int:
    """How many levels of lists and dicts nest in ``value`` (``{}``: 1), counted level by level
    without recursion, and stopping once past ``_MAX_EXTRA_DEPTH``."""
    depth, level = 0, [value]
    while depth <= _MAX_EXTRA_DEPTH:
        containers = [item for item in level if isinstance(item, (dict, list, tuple))]
        if not containers:
            break
        depth += 1
        level = [child for c in containers for child in (c.values() if isinstance(c, dict) else c)]
    return depth


def _checked_layer_name(name: Any) -> str:
    if not isinstance(name, str):
        raise ConfigError(f"layer name {_show(name)} must be a string such as 'transformer_blocks.0.ff.net.2'")
    if len(name) > _MAX_NAME or not _NAME.fullmatch(name):
        raise ConfigError(
            f"layer name {_show(name)} must be at most {_MAX_NAME} characters of letters, digits, '_' and '.', "
            "such as 'transformer_blocks.0.ff.net.2'"
        )
    try:
        block_of(name)
    except ValueError as err:  # layers.py words it; make it ours
        raise ConfigError(str(err)) from None
    return name


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
        _checked_layer_name(self.name)
        checked_choice(f"layer {self.name!r}: routing", self.routing, typing.get_args(Routing))
        for what in ("in_features", "out_features"):
            low, high = LIMITS[what]
            value = checked_int(f"layer {self.name!r}: {what}", getattr(self, what), {"min": low, "max": high})
            object.__setattr__(self, what, value)

    @classmethod
    def from_dict(cls, data: Any, index: int = 0) -> LayerSpec:
        """One ``layers`` entry of a config's JSON (``index``: its position, for the message)."""
        if not isinstance(data, dict):
            raise ConfigError(
                f"config 'layers' entry {index} is {_show(data)}, not an object with keys "
                "'name', 'in_features', 'out_features' (and optionally 'routing')"
            )
        unknown = [k for k in data if k not in _LAYER_KEYS]
        if unknown:
            raise ConfigError(
                f"config 'layers' entry {index} has unknown key {_show(unknown[0])}; known keys: {list(_LAYER_KEYS)}"
            )
        missing = [k for k in _LAYER_KEYS[:3] if k not in data]
        if missing:
            raise ConfigError(
                f"config 'layers' entry {index} lacks {missing[0]!r}; every layer needs {_LAYER_KEYS[:3]}"
            )
        return cls(**data)


@dataclass(frozen=True)
class MoLEConfig:
    """Experts, routing and router sizes of one InstructMoLE adapter (defaults: the paper's)."""

    layers: tuple[LayerSpec, ...]
    # The settings: a field with ``field_spec`` metadata is checked by its type and bounds (``settings``),
    # and the trainer offers every one as a key of its ``adapter`` section, with this help.
    num_experts: int = field(default=8, metadata=_counted("num_experts", "experts per MoLE layer"))
    top_k: int = field(default=4, metadata=_counted("top_k", "experts in each council"))
    rank: int = field(default=32, metadata=_counted("rank", "rank of every expert"))
    alpha: float = field(
        default=32.0, metadata=field_spec("expert LoRA alpha (scale = alpha / rank)", gt=0, max=MAX_ALPHA)
    )
    # Instruction router: T5 token features (text_dim) -> Perceiver (router_dim) + CLIP pooled.
    text_dim: int = field(default=4096, metadata=_counted("text_dim", "width of the T5 token features"))
    router_dim: int = field(
        default=768, metadata=_counted("router_dim", "router width, also the CLIP-L pooled width it is added to")
    )
    router_heads: int = field(default=12, metadata=_counted("router_heads", "Perceiver attention heads"))
    router_head_dim: int = field(default=64, metadata=_counted("router_head_dim", "Perceiver head width"))
    router_depth: int = field(default=2, metadata=_counted("router_depth", "Perceiver layers"))
    router_ff_mult: int = field(
        default=4, metadata=_counted("router_ff_mult", "Perceiver feed-forward width multiplier")
    )
    router_dropout: float = field(
        default=0.1, metadata=field_spec("dropout on the (LayerNorm'd) router signal, training only", min=0, lt=1)
    )
    gate_noise: bool = field(default=True, metadata=field_spec("Gaussian gate-logit noise of std 1/N, training only"))
    text_length: int = field(
        default=512,
        metadata=_counted(
            "text_length",
            "T5 padding length the router was trained with (FLUX.1: no attention mask; the text router of "
            "FLUX.2 and Qwen-Image masks padding, so it reads any length alike)",
        ),
    )
    base_model: str = "flux.1-kontext-dev"
    # Set by the base model's family (``families.py``), never by hand: so not one of the settings.
    router_pool: RouterPool = "clip"
    # Weights of a token-routed layer's top-k experts: "probs", the softmax over all N experts
    # (unnormalised top-k, the reference's); "renormalised", the softmax over the k selected
    # logits only (they sum to 1; ICEdit's MoE-LoRA, where k = 1 gives weight 1).
    token_weights: TokenWeights = field(
        default="probs",
        metadata=field_spec(
            "a token-routed layer's expert weights: 'probs' (the reference's) or 'renormalised' (ICEdit's)"
        ),
    )
    extra: dict[str, Any] = field(default_factory=dict)  # free-form provenance, kept on round trips

    def __post_init__(self) -> None:
        # Settings first (cheap, and the messages name one field), then the layers, then the total size.
        hints = _hints()
        for f in settings():
            object.__setattr__(self, f.name, checked(f.name, getattr(self, f.name), hints[f.name], f.metadata))
        if self.top_k > self.num_experts:
            raise ConfigError(f"top_k={self.top_k} cannot exceed num_experts={self.num_experts}")
        checked_choice("router_pool", self.router_pool, typing.get_args(RouterPool))
        if not isinstance(self.base_model, str) or not 0 < len(self.base_model) <= _MAX_NAME:
            raise ConfigError(
                f"base_model={_show(self.base_model)} must be a non-empty string of at most {_MAX_NAME} characters, "
                "such as 'flux.1-kontext-dev'"
            )
        self._check_extra()
        self._check_layers()
        total = self.parameter_count()
        if total > MAX_PARAMETERS:
            raise ConfigError(
                f"the config describes {total:,} parameters, more than the {MAX_PARAMETERS:,} an adapter may "
                "hold; lower num_experts, rank, the router sizes or the number of layers"
            )

    def _check_extra(self) -> None:
        """Provenance notes: JSON-able, nested at most ``_MAX_EXTRA_DEPTH`` deep (copying and writing
        a deeper one would hit Python's recursion limit far from here) and small."""
        if not isinstance(self.extra, dict):
            raise ConfigError(f"extra={_show(self.extra)} must be an object (a dict of provenance notes)")
        if _nesting(self.extra) > _MAX_EXTRA_DEPTH:
            raise ConfigError(f"extra is nested more than {_MAX_EXTRA_DEPTH} levels deep; keep provenance notes flat")
        try:
            size = len(json.dumps(self.extra))  # it is written into every adapter file
        except (TypeError, ValueError, RecursionError) as err:
            raise ConfigError(f"extra cannot be stored as JSON ({_show(str(err))}); keep it to plain values") from None
        if size > _MAX_EXTRA_BYTES:
            raise ConfigError(f"extra is {size:,} characters of JSON; provenance notes may take {_MAX_EXTRA_BYTES:,}")

    def _check_layers(self) -> None:
        if not isinstance(self.layers, (list, tuple)):
            raise ConfigError(f"layers={_show(self.layers)} must be a list of layer specs")
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise ConfigError("layers is empty: an adapter needs at least one target layer")
        if len(self.layers) > MAX_LAYERS:
            raise ConfigError(f"layers lists {len(self.layers)} layers; an adapter may have at most {MAX_LAYERS}")
        seen: set[str] = set()
        for spec in self.layers:
            if not isinstance(spec, LayerSpec):
                raise ConfigError(f"layers holds {_show(spec)}, which is not a LayerSpec")
            if spec.name in seen:
                raise ConfigError(f"layers lists {spec.name!r} more than once")
            seen.add(spec.name)

    def parameter_count(self) -> int:
        """Parameters the config asks for (experts, gates, router), computed without building anything."""
        n, r, d = self.num_experts, self.rank, self.router_dim
        total = 0
        for spec in self.layers:
            gate_in = d if spec.routing == "instruction" else spec.in_features
            total += n * (spec.in_features * r + r * spec.out_features + gate_in)
        inner = self.router_heads * self.router_head_dim
        per_depth = 4 * d + 4 * d * inner + 2 * d + 2 * d * d * self.router_ff_mult  # 2 norms, q/kv/out, FF
        total += d + self.text_dim * d + d + self.router_depth * per_depth + d * d + d + 2 * d
        if self.router_pool == "text":  # LayerNorm over the text width, then its projection
            total += 2 * self.text_dim + self.text_dim * d + d
        return total

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
        """The spec of layer ``name``; a ``ConfigError`` (not a KeyError) when the adapter lacks it."""
        for spec in self.layers:
            if spec.name == name:
                return spec
        raise ConfigError(
            f"layer {_show(name)} is not in this adapter; it has {len(self.layers)} layers, "
            f"e.g. {self.layers[0].name!r}"
        )

    # ---- serialisation ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["layers"] = [asdict(spec) for spec in self.layers]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any) -> MoLEConfig:
        """A config from its JSON object; every key and value is checked, none is coerced."""
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a JSON object, got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = [k for k in data if k not in known]
        if unknown:
            raise ConfigError(f"config has unknown key {_show(unknown[0])}; known keys: {sorted(known)}")
        if "layers" not in data:
            raise ConfigError("config has no 'layers'; it needs a list of the layers that carry experts")
        raw = data["layers"]
        if not isinstance(raw, list):
            raise ConfigError(f"config 'layers' must be a list of layer objects, got {type(raw).__name__}")
        if len(raw) > MAX_LAYERS:
            raise ConfigError(f"config 'layers' lists {len(raw)} layers; an adapter may have at most {MAX_LAYERS}")
        layers = tuple(LayerSpec.from_dict(spec, i) for i, spec in enumerate(raw))
        return cls(**{**data, "layers": layers})

    @classmethod
    def from_json(cls, text: Any) -> MoLEConfig:
        if not isinstance(text, (str, bytes, bytearray)):
            raise ConfigError(f"config must be JSON text, got {type(text).__name__}")
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as err:  # JSONDecodeError, bad UTF-8, absurd nesting
            raise ConfigError(f"config is not valid JSON: {_show(str(err), 120)}") from None
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


@functools.cache
def settings() -> tuple[Field, ...]:
    """The fields of ``MoLEConfig`` a user sets (each with help and checks in its metadata), in order."""
    return tuple(f for f in fields(MoLEConfig) if "help" in f.metadata)


@functools.cache
def _hints() -> dict[str, Any]:
    """``MoLEConfig``'s field types, resolved once (its annotations are strings)."""
    return typing.get_type_hints(MoLEConfig)
