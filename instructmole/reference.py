"""Import a reference InstructMoLE training checkpoint folder into one adapter file.

The folder layout is documented in DESIGN.md §2: ``pytorch_lora_weights.safetensors`` (plain
LoRA, diffusers/peft keys), ``mole_experts.pt`` (experts ``left``/``right`` per index and one gate
per layer), ``condition_type_embedder.pt`` (the Perceiver) and ``train_config.json``. Pickles are
read with ``torch.load(weights_only=True)`` only: anything but plain tensors is refused. Legacy
(pre-1.6, non-zip) ``torch.save`` files are refused too, with the one line that re-saves them: their
reader trusts storage sizes stated inside the pickle, which a damaged file can make absurd.

Nothing is guessed: what the tensors prove (expert count, rank, layer widths, router width, depth,
FF multiple, T5 width) is read from them; what they cannot prove (the council size ``top_k``, the
experts' ``alpha``, the router's split of its attention width into heads × head width, the plain
LoRA's alpha) comes from ``train_config.json`` or from the caller, and an import that lacks one
fails naming the key and the argument that supplies it. A wrong guess would give an adapter that
loads fine and routes differently from the trained one. One exception, not a guess: the reference
code has no head-count setting (its Perceiver always has ``REFERENCE_ROUTER_HEADS`` = 12 heads), so
its ``train_config.json`` never records one; when neither the config nor the caller says, a router
whose attention width 12 divides gets 12 heads, and the adapter's config records that it was this
default (``extra["router_heads_default"]``).
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from .adapter import LORA_PREFIX, MAX_LORA_ALPHA, Adapter, AdapterError
from .config import LIMITS, MAX_ALPHA, ConfigError, LayerSpec, MoLEConfig, _show
from .layers import block_of

__all__ = [
    "REFERENCE_FILES",
    "REFERENCE_ROUTER_HEADS",
    "import_reference",
    "reference_inputs",
    "write_reference_layout",
]

EXPERTS_FILE = "mole_experts.pt"
ROUTER_FILE = "condition_type_embedder.pt"
LORA_FILE = "pytorch_lora_weights.safetensors"
CONFIG_FILE = "train_config.json"
REFERENCE_FILES = (EXPERTS_FILE, ROUTER_FILE, LORA_FILE, CONFIG_FILE)

_EXPERT = re.compile(r"^(.+)\.experts\.([0-9]{1,6})\.(left|right)$")
_GATE = re.compile(r"^(.+)\.gate\.weight$")
_ROUTER_LAYER = re.compile(r"^layers\.([0-9]{1,6})\.")
# torch.save's pre-1.6 format: a bare pickle stream starting with this magic number.
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_MAX_CONFIG_BYTES = 16 * 2**20
REFERENCE_ROUTER_HEADS = 12  # the reference code's Perceiver: 12 heads (of 64 at width 768), not configurable
_REFERENCE_HEADS = f"checkpoints of the reference code use {REFERENCE_ROUTER_HEADS} heads of 64"


def reference_inputs(folder: str | Path) -> list[Path]:
    """The files of ``folder`` the importer reads (whether or not they exist): never write onto these."""
    return [Path(folder) / name for name in REFERENCE_FILES]


# ---- reading ----------------------------------------------------------------------------------------


def _short(text: object, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load_pickle(path: Path) -> Any:
    if path.is_dir():
        raise AdapterError(f"'{path}' is a folder, but the reference checkpoint keeps a torch file there")
    if not path.is_file():
        raise AdapterError(f"the reference folder lacks '{path.name}'")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(64)
        if head[:1] == b"\x80" and _LEGACY_MAGIC in head:
            raise AdapterError(
                f"'{path.name}' is a legacy (pre-1.6) torch.save file, which is not read here; re-save it in the "
                f"zip format under torch >= 1.6: torch.save(torch.load(p, weights_only=True), p)"
            )
        raise AdapterError(f"'{path.name}' is not a readable torch file (truncated or not a checkpoint?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        what = f" (it asks for {found.group(1)})" if found else ""
        raise AdapterError(
            f"refused '{path.name}': it holds objects other than plain tensors{what}, which are never unpickled here"
        ) from None
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as err:  # RuntimeError from the zip reader, EOFError, OSError, ...
        raise AdapterError(f"'{path.name}' is not a readable torch file (truncated?): {_short(err)}") from None


def _tensor_dict(obj: Any, name: str) -> dict[str, Tensor]:
    if not isinstance(obj, dict) or not obj:
        raise AdapterError(f"'{name}' must hold a non-empty dict of name -> tensor, not a {type(obj).__name__}")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise AdapterError(f"'{name}' entry {_show(key, 60)} is not a named tensor; it must hold only tensors")
    return obj


def _read_train_config(folder: Path) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """``(moe_config, lora_config, present)`` from ``train_config.json``; both empty when it is absent."""
    path = folder / CONFIG_FILE
    if not path.exists():
        return {}, {}, False
    try:
        if path.stat().st_size > _MAX_CONFIG_BYTES:
            raise AdapterError(f"'{CONFIG_FILE}' is over {_MAX_CONFIG_BYTES // 2**20} MiB; it is not a training config")
        raw = json.loads(path.read_bytes())
    except OSError as err:
        raise AdapterError(f"'{CONFIG_FILE}' could not be read: {err.strerror or _short(err)}") from None
    except (ValueError, RecursionError) as err:  # bad JSON, bad UTF-8, absurd nesting
        raise AdapterError(f"'{CONFIG_FILE}' is not valid JSON ({_short(err, 100)}); fix it or restore it") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"'{CONFIG_FILE}' must hold a JSON object, not a {type(raw).__name__}")
    sections = []
    for key in ("moe_config", "lora_config"):
        section = raw.get(key) or {}
        if not isinstance(section, dict):
            raise AdapterError(f"'{CONFIG_FILE}': {key} must be an object, not a {type(section).__name__}")
        sections.append(section)
    return sections[0], sections[1], True


def _int_value(value: Any, what: str, bounds: tuple[int, int]) -> int:
    low, high = bounds
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise AdapterError(f"{what} is {_show(value, 60)}; it must be an integer from {low} to {high}")
    return value


def _real_value(value: Any, what: str, high: float) -> float:
    """A finite number in (0, high]; NaN and ±inf fail the range test itself."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= high:
        raise AdapterError(f"{what} is {_show(value, 60)}; it must be a number in (0, {high:g}]")
    return float(value)


def _resolve(
    given: Any, argument: str, section: dict[str, Any], keys: tuple[str, ...], where: str, check: Callable
) -> Any:
    """The caller's value if given, else the first of ``keys`` set in the config section; None: neither."""
    if given is not None:
        return check(given, argument)
    for key in keys:
        if section.get(key) is not None:
            return check(section[key], f"'{CONFIG_FILE}': {where}.{key}")
    return None


def _int_check(field: str) -> Callable[[Any, str], int]:
    return lambda value, what: _int_value(value, what, LIMITS[field])


def _real_check(high: float) -> Callable[[Any, str], float]:
    return lambda value, what: _real_value(value, what, high)


# The settings tensors cannot prove: (argument, command-line flag, moe_config key, check).
_SETTINGS = (
    ("top_k", "--top-k", "num_experts_per_tok", _int_check("top_k")),
    ("alpha", "--alpha", "alpha", _real_check(MAX_ALPHA)),
    ("router_heads", "--router-heads", "router_heads", _int_check("router_heads")),
    ("router_head_dim", "--router-head-dim", "router_head_dim", _int_check("router_head_dim")),
)


def _token_overrides(moe: dict[str, Any]) -> set[str]:
    """Layer names the config routes per token (``token_route_overrides_double/single``)."""
    names: set[str] = set()
    for kind, fmt in (
        ("double", "transformer_blocks.{}.ff.net.2"),
        ("single", "single_transformer_blocks.{}.proj_out"),
    ):
        key = f"token_route_overrides_{kind}"
        items = moe.get(key) or []
        if not isinstance(items, list):
            raise AdapterError(f"'{CONFIG_FILE}': moe_config.{key} must be a list of block indices")
        for item in items:
            if isinstance(item, int) and not isinstance(item, bool) and item >= 0:
                names.add(fmt.format(item))
            elif isinstance(item, str) and item.isascii() and item.isdigit():
                names.add(fmt.format(int(item)))
            elif isinstance(item, str) and item:
                names.add(item)
            else:
                raise AdapterError(
                    f"'{CONFIG_FILE}': moe_config.{key} holds {_show(item, 60)}, which is not a block index"
                )
    return names


# ---- the experts --------------------------------------------------------------------------------------


def _layer_order(name: str) -> tuple[bool, int, str]:
    kind, index = block_of(name)
    return kind != "double", index, name


def _group_experts(experts: dict[str, Tensor]) -> tuple[dict[str, dict[int, dict[str, Tensor]]], dict[str, Tensor]]:
    per_layer: dict[str, dict[int, dict[str, Tensor]]] = {}
    gates: dict[str, Tensor] = {}
    for key, value in experts.items():
        if m := _EXPERT.match(key):
            per_layer.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = value
        elif m := _GATE.match(key):
            gates[m.group(1)] = value
        else:
            raise AdapterError(f"'{EXPERTS_FILE}' has key {_show(key, 80)}, which is neither an expert nor a gate")
    if not per_layer:
        raise AdapterError(f"'{EXPERTS_FILE}' holds no experts")
    for name in per_layer:
        try:
            LayerSpec(name, 1, 1)  # the name alone: a Flux block layer in plain characters
        except ConfigError as err:
            raise AdapterError(f"'{EXPERTS_FILE}': {err}") from None
    orphans = sorted(set(gates) - set(per_layer))
    if orphans:
        raise AdapterError(f"'{EXPERTS_FILE}' has a gate for {_show(orphans[0], 80)} but no experts")
    return per_layer, gates


def _stack_layer(name: str, bank: dict[int, dict[str, Tensor]], gate: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """``(A [n, in, r], B [n, r, out], gate [n, w])`` of one layer, every shape checked first."""
    if gate is None:
        raise AdapterError(f"'{EXPERTS_FILE}' has experts for {name!r} but no gate ('{name}.gate.weight')")
    idx = sorted(bank)
    if idx != list(range(len(idx))) or any(set(bank[i]) != {"left", "right"} for i in idx):
        raise AdapterError(
            f"'{EXPERTS_FILE}': the experts of {name!r} are incomplete; every index 0..n-1 needs a 'left' and a 'right'"
        )
    first = bank[0]["left"]
    for i in idx:
        left, right = bank[i]["left"], bank[i]["right"]
        if left.ndim != 2 or right.ndim != 2 or left.shape[1] != right.shape[0] or left.shape != first.shape:
            raise AdapterError(
                f"'{EXPERTS_FILE}': expert {i} of {name!r} has left {tuple(left.shape)} and right "
                f"{tuple(right.shape)}; every expert needs left [in, r] and right [r, out] of one shape"
            )
    if gate.ndim != 2 or gate.shape[0] != len(idx):
        raise AdapterError(
            f"'{EXPERTS_FILE}': the gate of {name!r} has shape {tuple(gate.shape)}; it needs one row per expert "
            f"({len(idx)} rows)"
        )
    rights = [bank[i]["right"] for i in idx]
    if any(r.shape != rights[0].shape for r in rights):
        raise AdapterError(f"'{EXPERTS_FILE}': the experts of {name!r} have 'right' tensors of different shapes")
    try:
        return torch.stack([bank[i]["left"] for i in idx]), torch.stack(rights), gate
    except RuntimeError as err:  # e.g. experts of different dtypes or devices
        raise AdapterError(f"'{EXPERTS_FILE}': the experts of {name!r} cannot be stacked: {_short(err)}") from None


def _layer_routing(name: str, in_features: int, gate_width: int, router_dim: int, token_layers: set[str]) -> str:
    """Instruction or token routing, from the gate's width (proof) and the config's override lists."""
    listed = name in token_layers
    if gate_width == router_dim and not (listed and gate_width == in_features):
        if listed:
            raise AdapterError(
                f"'{CONFIG_FILE}' routes {name!r} per token, but its gate reads the router's width {router_dim}, "
                f"not the layer's input {in_features}; fix the token_route_overrides lists"
            )
        return "instruction"
    if gate_width == in_features:
        return "token"
    raise AdapterError(
        f"'{EXPERTS_FILE}': the gate of {name!r} reads width {gate_width}, neither the router's {router_dim} nor the "
        f"layer's input {in_features}"
    )


# ---- the router -----------------------------------------------------------------------------------


def _router_dims(router: dict[str, Tensor]) -> dict[str, int]:
    """Widths the Perceiver's tensors prove: router_dim, text_dim, inner (heads × head_dim), depth, ff_mult."""
    need = {
        "latents": 3,
        "proj_in.weight": 2,
        "layers.0.0.to_q.weight": 2,
        "layers.0.1.1.weight": 2,
    }
    for key, ndim in need.items():
        if key not in router:
            raise AdapterError(
                f"'{ROUTER_FILE}' lacks {key!r}, which the router's sizes are read from; is it the Perceiver's "
                "state dict (condition_type_embedder)?"
            )
        if router[key].ndim != ndim or 0 in router[key].shape:
            raise AdapterError(f"'{ROUTER_FILE}': {key!r} has shape {tuple(router[key].shape)}, not {ndim}-D")
    dim = router["latents"].shape[-1]
    hidden = router["layers.0.1.1.weight"].shape[0]
    if hidden % dim:
        raise AdapterError(
            f"'{ROUTER_FILE}': the feed-forward width {hidden} is not a multiple of the router width {dim}"
        )
    depths = sorted({int(m.group(1)) for k in router if (m := _ROUTER_LAYER.match(k))})
    if depths != list(range(len(depths))):
        raise AdapterError(f"'{ROUTER_FILE}': its layers are numbered {depths[:8]}, not 0..depth-1")
    return {
        "router_dim": dim,
        "text_dim": router["proj_in.weight"].shape[1],
        "inner": router["layers.0.0.to_q.weight"].shape[0],
        "router_depth": len(depths),
        "router_ff_mult": hidden // dim,
    }


def _heads(inner: int, heads: int | None, head_dim: int | None) -> tuple[int, int]:
    """Heads and head width with ``heads × head_dim == inner`` (the tensors prove the product, so one
    of the two is enough)."""
    if heads is None or head_dim is None:
        given, what = (heads, "router_heads") if heads is not None else (head_dim, "router_head_dim")
        if given is None or inner % given:
            raise AdapterError(
                f"{what}={given} does not divide the router's attention width {inner} (its to_q rows); "
                f"{_REFERENCE_HEADS}"
            )
        heads, head_dim = (given, inner // given) if what == "router_heads" else (inner // given, given)
    if heads * head_dim != inner:
        raise AdapterError(
            f"router_heads={heads} × router_head_dim={head_dim} is {heads * head_dim}, not the router's attention "
            f"width {inner} (its to_q rows); {_REFERENCE_HEADS}"
        )
    return heads, head_dim


# ---- import -----------------------------------------------------------------------------------------


def _lora_alpha(folder: Path, given: float | None, lora_cfg: dict[str, Any]) -> tuple[float | None, bool]:
    """``(alpha, missing)``: the plain LoRA's alpha (argument, else config), and whether the import
    lacks one it needs (a LoRA file whose pairs do not all carry their own ``.alpha``)."""
    alpha = _resolve(
        given,
        "lora_alpha (--lora-alpha)",
        lora_cfg,
        ("lora_alpha", "alpha"),
        "lora_config",
        _real_check(MAX_LORA_ALPHA),
    )
    path = folder / LORA_FILE
    if alpha is not None or not path.is_file():
        return alpha, False
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as err:
        raise _lora_unreadable(err) from None
    downs = {k[: -len(".lora_A.weight")] for k in keys if k.endswith(".lora_A.weight")}
    return None, any(f"{base}.alpha" not in keys for base in downs)


def _lora_unreadable(err: Exception) -> AdapterError:
    return AdapterError(
        f"'{LORA_FILE}' is not a readable .safetensors file (truncated or corrupt?): {_short(err)}; copy it again "
        "from the training run"
    )


def _lora_tensors(folder: Path, alpha: float | None) -> dict[str, Tensor]:
    """The plain LoRA in adapter key names, with ``alpha`` (when given) as every pair's 0-d alpha."""
    path = folder / LORA_FILE
    if not path.exists():
        return {}
    if not path.is_file():
        raise AdapterError(f"'{path}' is not a file, but the reference checkpoint keeps its plain LoRA there")
    try:
        lora = load_file(str(path))
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as err:
        raise _lora_unreadable(err) from None
    out: dict[str, Tensor] = {}
    for key, value in lora.items():
        full = key if key.startswith(LORA_PREFIX) else LORA_PREFIX + key
        if full in out:
            raise AdapterError(
                f"'{LORA_FILE}' holds {_show(full, 120)} twice (with and without the 'transformer.' prefix)"
            )
        out[full] = value
    if alpha is not None:
        for key in [k for k in out if k.endswith(".lora_A.weight")]:
            out[key[: -len(".lora_A.weight")] + ".alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def _require(missing: list[str], has_config: bool) -> None:
    """Fail naming every setting the import lacks, and the argument that supplies it."""
    if not missing:
        return
    lead = (
        f"'{CONFIG_FILE}' does not record"
        if has_config
        else f"the reference folder has no '{CONFIG_FILE}', so nothing records"
    )
    raise AdapterError(
        f"{lead} {'; '.join(missing)}; the tensors cannot tell {'these' if len(missing) > 1 else 'this'}, so copy "
        f"the run's '{CONFIG_FILE}' into the folder or pass {'them' if len(missing) > 1 else 'it'} explicitly"
    )


def import_reference(
    folder: str | Path,
    progress: Callable[[int, int], None] | None = None,
    *,
    top_k: int | None = None,
    alpha: float | None = None,
    router_heads: int | None = None,
    router_head_dim: int | None = None,
    lora_alpha: float | None = None,
) -> Adapter:
    """Read a reference checkpoint folder into an :class:`Adapter` (save it with ``.save(path)``).

    ``top_k``, ``alpha``, ``router_heads``/``router_head_dim`` (one is enough: the tensors give
    their product) and ``lora_alpha`` replace what ``train_config.json`` says, or stand in for it
    where it is silent; one of each is needed, since the tensors cannot tell them, except the head
    count, which defaults to the reference code's fixed ``REFERENCE_ROUTER_HEADS`` where it divides
    the router's attention width.
    """
    if not isinstance(folder, (str, Path)) or not str(folder).strip():
        raise AdapterError(
            f"reference checkpoint folder {_show(folder)} is not a folder path; pass the run's checkpoint"
        )
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise AdapterError(f"reference checkpoint folder '{folder}' {what}; pass the training run's checkpoint folder")
    given = {"top_k": top_k, "alpha": alpha, "router_heads": router_heads, "router_head_dim": router_head_dim}
    arguments = {k: v for k, v in {**given, "lora_alpha": lora_alpha}.items() if v is not None}
    moe, lora_cfg, has_config = _read_train_config(folder)
    settings = {
        name: _resolve(given[name], f"{name} ({flag})", moe, (key,), "moe_config", check)
        for name, flag, key, check in _SETTINGS
    }
    lora_alpha, lora_missing = _lora_alpha(folder, lora_alpha, lora_cfg)
    token_layers = _token_overrides(moe)

    router = _tensor_dict(_router_state(_load_pickle(folder / ROUTER_FILE)), ROUTER_FILE)
    dims = _router_dims(router)
    inner = dims.pop("inner")
    heads_default = settings["router_heads"] is None and settings["router_head_dim"] is None
    if heads_default and inner % REFERENCE_ROUTER_HEADS == 0:
        settings["router_heads"] = REFERENCE_ROUTER_HEADS
    _require(_missing_settings(settings, inner, lora_missing), has_config)
    settings["router_heads"], settings["router_head_dim"] = _heads(
        inner, settings["router_heads"], settings["router_head_dim"]
    )

    experts = _tensor_dict(_load_pickle(folder / EXPERTS_FILE), EXPERTS_FILE)
    specs, tensors, (num_experts, rank) = _expert_tensors(experts, dims["router_dim"], token_layers, progress)
    _check_proven(moe, num_experts=num_experts, rank=rank)
    tensors.update({f"router.{k}": v for k, v in router.items()})
    tensors.update(_lora_tensors(folder, lora_alpha))
    extra: dict[str, Any] = {"source": "reference-checkpoint", "moe_config": moe}
    if arguments:  # provenance: which settings the caller supplied rather than the run's config
        extra["import_arguments"] = arguments
    if heads_default and settings["router_heads"] == REFERENCE_ROUTER_HEADS:
        extra["router_heads_default"] = REFERENCE_ROUTER_HEADS  # neither config nor caller said: the code's fixed 12
    try:
        config = MoLEConfig(layers=tuple(specs), num_experts=num_experts, rank=rank, extra=extra, **settings, **dims)
    except ConfigError as err:
        raise AdapterError(f"'{folder.name}' does not make a valid adapter: {err}") from None
    return Adapter.from_tensors(config, tensors, {"source": "reference-checkpoint"}, source=folder.name)


def _check_proven(moe: dict[str, Any], **proven: int) -> None:
    """Settings the config records and the tensors prove must agree (else the files mix two runs)."""
    for key, value in proven.items():
        if moe.get(key) is None:
            continue
        if _int_value(moe[key], f"'{CONFIG_FILE}': moe_config.{key}", LIMITS[key]) != value:
            raise AdapterError(
                f"'{CONFIG_FILE}': moe_config.{key}={moe[key]}, but the experts in '{EXPERTS_FILE}' have {value}; "
                "the files come from different runs"
            )


def _missing_settings(settings: dict[str, Any], inner: int, lora_missing: bool) -> list[str]:
    """What the import still lacks, each with the config key and the argument that supplies it."""
    missing = []
    if settings["top_k"] is None:
        missing.append("the council size (moe_config.num_experts_per_tok: pass top_k= or --top-k)")
    if settings["alpha"] is None:
        missing.append("the experts' alpha (moe_config.alpha: pass alpha= or --alpha)")
    if settings["router_heads"] is None and settings["router_head_dim"] is None:
        missing.append(
            f"how the router's attention width {inner} splits into heads ({REFERENCE_ROUTER_HEADS}, the reference "
            f"code's, does not divide it; moe_config.router_heads: pass router_heads= or --router-heads)"
        )
    if lora_missing:
        missing.append("the plain LoRA's alpha (lora_config.lora_alpha: pass lora_alpha= or --lora-alpha)")
    return missing


def _router_state(obj: Any) -> Any:
    """The Perceiver's state dict, whether saved bare or as ``{"condition_type_embedder": state}``."""
    if isinstance(obj, dict) and "condition_type_embedder" in obj:
        return obj["condition_type_embedder"]
    return obj


def _expert_tensors(
    experts: dict[str, Tensor],
    router_dim: int,
    token_layers: set[str],
    progress: Callable[[int, int], None] | None,
) -> tuple[list[LayerSpec], dict[str, Tensor], tuple[int, int]]:
    """Layer specs, ``mole.*`` tensors and the (experts, rank) every layer shares, in model order."""
    per_layer, gates = _group_experts(experts)
    names = sorted(per_layer, key=_layer_order)
    specs: list[LayerSpec] = []
    tensors: dict[str, Tensor] = {}
    shape: tuple[int, int] | None = None
    for step, name in enumerate(names):
        A, B, gate = _stack_layer(name, per_layer[name], gates.get(name))
        if shape is None:
            shape = (A.shape[0], A.shape[2])
        elif (A.shape[0], A.shape[2]) != shape:
            raise AdapterError(
                f"'{EXPERTS_FILE}': {name!r} has {A.shape[0]} experts of rank {A.shape[2]}, but {names[0]!r} has "
                f"{shape[0]} of rank {shape[1]}; every layer needs the same"
            )
        routing = _layer_routing(name, A.shape[1], gate.shape[1], router_dim, token_layers)
        try:
            specs.append(LayerSpec(name, A.shape[1], B.shape[2], routing))
        except ConfigError as err:
            raise AdapterError(f"'{EXPERTS_FILE}': {err}") from None
        tensors[f"mole.{name}.A"], tensors[f"mole.{name}.B"], tensors[f"mole.{name}.gate"] = A, B, gate
        if progress:
            progress(step + 1, len(names))
    assert shape is not None  # _group_experts refuses a file without experts
    return specs, tensors, shape


def write_reference_layout(adapter: Adapter, folder: str | Path, lora_alpha: float | None = None) -> Path:
    """Write an adapter back out in the reference folder layout (tests and round trips use it).

    ``train_config.json`` records every setting ``import_reference`` needs, under the reference's
    key names where it has them (``num_experts_per_tok``, ``alpha``, ``lora_alpha``) and ours where
    it does not (``router_heads``, ``router_head_dim``). ``lora_alpha``: the plain LoRA's alpha;
    by default the one the adapter's LoRA carries (the reference layout has one for all modules)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = adapter.config
    experts: dict[str, Tensor] = {}
    for name, layer in adapter.model.named_layers():
        for i in range(cfg.num_experts):
            experts[f"{name}.experts.{i}.left"] = layer.A[i].detach().clone()
            experts[f"{name}.experts.{i}.right"] = layer.B[i].detach().clone()
        experts[f"{name}.gate.weight"] = layer.gate.weight.detach().clone()
    torch.save(experts, folder / EXPERTS_FILE)
    torch.save({"condition_type_embedder": adapter.model.router.state_dict()}, folder / ROUTER_FILE)
    lora = {k: v.contiguous() for k, v in adapter.lora.items() if not k.endswith(".alpha")}
    lora_config: dict[str, Any] = {}
    if lora:
        save_file(lora, str(folder / LORA_FILE))
        lora_config = _reference_lora_config(adapter, lora_alpha)
    token = [s.name for s in cfg.layers if s.routing == "token"]
    moe_config = {
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.top_k,
        "rank": cfg.rank,
        "alpha": cfg.alpha,
        "router_heads": cfg.router_heads,
        "router_head_dim": cfg.router_head_dim,
        "target_modules": ["ff.net.2", "proj_out"],
        "token_route_overrides_double": [int(n.split(".")[1]) for n in token if n.startswith("transformer_blocks")],
        "token_route_overrides_single": [int(n.split(".")[1]) for n in token if n.startswith("single_")],
    }
    (folder / CONFIG_FILE).write_text(json.dumps({"lora_config": lora_config, "moe_config": moe_config}))
    return folder


def _reference_lora_config(adapter: Adapter, lora_alpha: float | None) -> dict[str, Any]:
    """``lora_config`` (``r``, ``lora_alpha``) for the adapter's plain LoRA: one alpha must serve every
    module, so a LoRA whose modules scale differently cannot be written in the reference layout."""
    parts = adapter.lora_parts()
    ranks = {p.down.shape[0] for p in parts}
    if lora_alpha is None:
        alphas = {p.scale * p.down.shape[0] for p in parts}
        if len(alphas) != 1:
            raise AdapterError(
                "the adapter's plain LoRA modules have different alphas, but the reference layout records one "
                "lora_alpha; pass lora_alpha= to choose it"
            )
        lora_alpha = alphas.pop()
    return {"r": ranks.pop() if len(ranks) == 1 else max(ranks), "lora_alpha": lora_alpha}
