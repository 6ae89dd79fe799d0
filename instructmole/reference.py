"""Import a reference InstructMoLE training checkpoint folder into one adapter file.

The folder layout is documented in DESIGN.md §2: ``pytorch_lora_weights.safetensors`` (plain
LoRA, diffusers/peft keys), ``mole_experts.pt`` (experts ``left``/``right`` per index and one gate
per layer), ``condition_type_embedder.pt`` (the Perceiver) and ``train_config.json``. Pickles are
read with ``torch.load(weights_only=True)`` only: anything but plain tensors is refused.
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
from safetensors.torch import load_file
from torch import Tensor

from .adapter import LORA_PREFIX, Adapter, AdapterError
from .config import LayerSpec, MoLEConfig

__all__ = ["import_reference", "write_reference_layout"]

_EXPERT = re.compile(r"^(.+)\.experts\.(\d+)\.(left|right)$")
_GATE = re.compile(r"^(.+)\.gate\.weight$")


def _load_pickle(path: Path) -> Any:
    if not path.is_file():
        raise AdapterError(f"the reference folder lacks '{path.name}'")
    if not zipfile.is_zipfile(path):
        raise AdapterError(f"'{path.name}' is not a readable torch file (truncated or not a checkpoint?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        what = f" (it asks for {found.group(1)})" if found else ""
        raise AdapterError(
            f"refused '{path.name}': it holds objects other than plain tensors{what}, which are never unpickled here"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise AdapterError(f"'{path.name}' is not a readable torch file (truncated?): {err}") from None


def _tensor_dict(obj: Any, name: str) -> dict[str, Tensor]:
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise AdapterError(f"'{name}' must hold a dict of tensors")
    return obj


def _block_overrides(moe: dict[str, Any]) -> set[str]:
    """Layer names the config routes per token (``token_route_overrides_double/single``)."""
    names: set[str] = set()
    for kind, fmt in (
        ("double", "transformer_blocks.{}.ff.net.2"),
        ("single", "single_transformer_blocks.{}.proj_out"),
    ):
        for item in moe.get(f"token_route_overrides_{kind}", []) or []:
            names.add(fmt.format(item) if isinstance(item, int) or str(item).isdigit() else str(item))
    return names


def import_reference(folder: str | Path, progress: Callable[[int, int], None] | None = None) -> Adapter:
    """Read a reference checkpoint folder into an :class:`Adapter` (save it with ``.save(path)``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"reference checkpoint folder '{folder}' does not exist")
    cfg_path = folder / "train_config.json"
    raw_cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    moe = raw_cfg.get("moe_config", {}) or {}
    lora_cfg = raw_cfg.get("lora_config", {}) or {}

    experts = _tensor_dict(_load_pickle(folder / "mole_experts.pt"), "mole_experts.pt")
    embedder = _load_pickle(folder / "condition_type_embedder.pt")
    if isinstance(embedder, dict) and "condition_type_embedder" in embedder:
        embedder = embedder["condition_type_embedder"]
    router = _tensor_dict(embedder, "condition_type_embedder.pt")

    # Experts and gates, grouped per layer.
    per_layer: dict[str, dict[int, dict[str, Tensor]]] = {}
    gates: dict[str, Tensor] = {}
    for key, value in experts.items():
        if m := _EXPERT.match(key):
            per_layer.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = value
        elif m := _GATE.match(key):
            gates[m.group(1)] = value
        else:
            raise AdapterError(f"'mole_experts.pt' has key {key!r}, which is neither an expert nor a gate")
    if not per_layer:
        raise AdapterError("'mole_experts.pt' holds no experts")

    router_dim = router["latents"].shape[-1] if "latents" in router else 768
    token_layers = _block_overrides(moe)
    tensors: dict[str, Tensor] = {}
    specs = []
    names = sorted(per_layer, key=lambda n: (not n.startswith("transformer_blocks"), int(n.split(".")[1]), n))
    num_experts = rank = None
    for step, name in enumerate(names):
        bank = per_layer[name]
        if name not in gates:
            raise AdapterError(f"'mole_experts.pt' has experts for {name!r} but no gate")
        idx = sorted(bank)
        if idx != list(range(len(idx))) or any(set(bank[i]) != {"left", "right"} for i in idx):
            raise AdapterError(f"'mole_experts.pt': the experts of {name!r} are incomplete")
        A = torch.stack([bank[i]["left"] for i in idx])  # [n, in, r]
        B = torch.stack([bank[i]["right"] for i in idx])  # [n, r, out]
        gate = gates[name]
        num_experts, rank = A.shape[0], A.shape[2]
        routing = "token" if (name in token_layers or gate.shape[1] != router_dim) else "instruction"
        specs.append(LayerSpec(name, A.shape[1], B.shape[2], routing))
        tensors[f"mole.{name}.A"], tensors[f"mole.{name}.B"], tensors[f"mole.{name}.gate"] = A, B, gate
        if progress:
            progress(step + 1, len(names))

    depth = len({k.split(".")[1] for k in router if k.startswith("layers.")})
    inner = router["layers.0.0.to_q.weight"].shape[0] if "layers.0.0.to_q.weight" in router else 768
    head_dim = int(moe.get("router_head_dim", 64))
    config = MoLEConfig(
        layers=tuple(specs),
        num_experts=int(moe.get("num_experts", num_experts)),
        top_k=int(moe.get("num_experts_per_tok", 4)),
        rank=int(moe.get("rank", rank)),
        alpha=float(moe.get("alpha", rank)),
        text_dim=router["proj_in.weight"].shape[1] if "proj_in.weight" in router else 4096,
        router_dim=router_dim,
        router_heads=inner // head_dim,
        router_head_dim=head_dim,
        router_depth=depth or 2,
        router_ff_mult=(router["layers.0.1.1.weight"].shape[0] // router_dim) if "layers.0.1.1.weight" in router else 4,
        extra={"source": "reference-checkpoint", "moe_config": moe},
    )
    tensors.update({f"router.{k}": v for k, v in router.items()})

    lora_path = folder / "pytorch_lora_weights.safetensors"
    if lora_path.is_file():
        lora = load_file(str(lora_path))
        alpha = lora_cfg.get("lora_alpha", lora_cfg.get("alpha"))
        for key, value in lora.items():
            full = key if key.startswith(LORA_PREFIX) else LORA_PREFIX + key
            tensors[full] = value
            if alpha is not None and full.endswith(".lora_A.weight"):
                tensors[full.replace(".lora_A.weight", ".alpha")] = torch.tensor(float(alpha))
    return Adapter.from_tensors(config, tensors, {"source": "reference-checkpoint"}, source=folder.name)


def write_reference_layout(adapter: Adapter, folder: str | Path, lora_alpha: float | None = None) -> Path:
    """Write an adapter back out in the reference folder layout (tests and round trips use it)."""
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
    torch.save(experts, folder / "mole_experts.pt")
    torch.save({"condition_type_embedder": adapter.model.router.state_dict()}, folder / "condition_type_embedder.pt")
    lora = {k: v.contiguous() for k, v in adapter.lora.items() if not k.endswith(".alpha")}
    if lora:
        save_file(lora, str(folder / "pytorch_lora_weights.safetensors"))
    token = [s.name for s in cfg.layers if s.routing == "token"]
    (folder / "train_config.json").write_text(
        json.dumps(
            {
                "lora_config": {"r": 0, "lora_alpha": lora_alpha},
                "moe_config": {
                    "num_experts": cfg.num_experts,
                    "num_experts_per_tok": cfg.top_k,
                    "rank": cfg.rank,
                    "alpha": cfg.alpha,
                    "router_head_dim": cfg.router_head_dim,
                    "target_modules": ["ff.net.2", "proj_out"],
                    "token_route_overrides_double": [
                        int(n.split(".")[1]) for n in token if n.startswith("transformer_blocks")
                    ],
                    "token_route_overrides_single": [int(n.split(".")[1]) for n in token if n.startswith("single_")],
                },
            }
        )
    )
    return folder
