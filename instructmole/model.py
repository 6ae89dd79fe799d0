"""The trainable InstructMoLE module: the instruction router plus one expert bank per target layer.

It never holds a reference to a transformer: attaching it to one (``attach.py``, the ComfyUI
nodes, the trainer) is somebody else's job, so the same weights can serve several models.
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor, nn

from .config import MoLEConfig
from .experts import ExpertInit, MoLELayer
from .routing import PerceiverResampler

__all__ = ["InstructMoLE"]


def _key(name: str) -> str:
    """nn.ModuleDict keys cannot hold dots; canonical names do."""
    return name.replace(".", "/")


def make_router(config: MoLEConfig) -> PerceiverResampler:
    """The instruction router of ``config`` (build under ``torch.device("meta")`` for shapes only)."""
    return PerceiverResampler(
        text_dim=config.text_dim,
        dim=config.router_dim,
        depth=config.router_depth,
        heads=config.router_heads,
        head_dim=config.router_head_dim,
        ff_mult=config.router_ff_mult,
        dropout=config.router_dropout,
        pool=config.router_pool,
    )


class InstructMoLE(nn.Module):
    """``init``: how fresh experts start (``MoLELayer.reset_parameters``): ``"reference"`` (the
    paper's code, A bound ``1/√r``) or ``"lora"`` (A bound ``1/√in``). Loaded weights replace it."""

    def __init__(self, config: MoLEConfig, *, init: ExpertInit = "reference") -> None:
        super().__init__()
        self.config = config
        self.router = make_router(config)
        self.experts = nn.ModuleDict(
            {
                _key(spec.name): MoLELayer(
                    spec.in_features,
                    spec.out_features,
                    num_experts=config.num_experts,
                    rank=config.rank,
                    gate_in=config.router_dim if spec.routing == "instruction" else spec.in_features,
                    init=init,
                )
                for spec in config.layers
            }
        )

    def layer(self, name: str) -> MoLELayer:
        return self.experts[_key(name)]

    def named_layers(self) -> list[tuple[str, MoLELayer]]:
        return [(spec.name, self.layer(spec.name)) for spec in self.config.layers]

    @property
    def gate_noise_std(self) -> float:
        return 1.0 / self.config.num_experts if (self.training and self.config.gate_noise) else 0.0

    def gates(self) -> Tensor:
        """Stacked instruction gates ``[L, n, d]`` in council row order."""
        return torch.stack([self.layer(name).gate.weight for name in self.config.instruction_layers])

    def fingerprint(self) -> str:
        """A short id of the routing weights: councils remember it to refuse another adapter."""
        # An adapter routed only per token (ICEdit's) has no instruction gates: its token gates tell it apart.
        names = self.config.instruction_layers or self.config.layer_names
        gates = [self.layer(name).gate.weight for name in names]
        # In-place updates bump _version; inference tensors (ComfyUI loads under inference_mode) have
        # none, and cannot be updated in place outside inference mode anyway.
        version = tuple((g.data_ptr(), -1 if g.is_inference() else g._version) for g in gates)
        cached = self.__dict__.get("_fingerprint")
        if cached is None or cached[0] != version:
            h = hashlib.sha256()
            for g in gates:
                h.update(g.detach().float().cpu().numpy().tobytes())
            cached = (version, h.hexdigest()[:16])
            self.__dict__["_fingerprint"] = cached
        return cached[1]

    def num_parameters(self) -> dict[str, int]:
        experts = sum(lay.A.numel() + lay.B.numel() for lay in self.experts.values())
        gates = sum(lay.gate.weight.numel() for lay in self.experts.values())
        router = sum(p.numel() for p in self.router.parameters())
        return {"experts": experts, "gates": gates, "router": router}
