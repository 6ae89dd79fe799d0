"""Attach an adapter to a diffusers ``FluxTransformer2DModel``: dynamic (routed) or merged.

``attach`` never replaces or renames a module. Dynamic mode adds forward hooks: one pre-hook on
the transformer routes every row of the batch from its own ``encoder_hidden_states`` and
``pooled_projections`` (so a batch may mix instructions), and one hook per target Linear adds the
council term (and the unmerged plain-LoRA term). Merged mode adds the folded council and the LoRA
part to the weights in place, after backing them up. ``handle.detach()`` removes the hooks and
restores the backups bit for bit. All routing state lives on the handle.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from .adapter import Adapter
from .council import Council
from .experts import council_delta, token_delta, token_route
from .fold import iter_fold
from .overrides import scale
from .routing import route_instances

__all__ = ["AttachedAdapter", "attach"]

Mode = Literal["dynamic", "merged"]


class AttachError(ValueError):
    """The adapter does not fit the transformer it is attached to, or the mode's inputs are missing."""


def _linear(
    transformer: nn.Module, name: str, in_features: int | None = None, out_features: int | None = None
) -> nn.Linear:
    try:
        module = transformer.get_submodule(name)
    except AttributeError:
        raise AttachError(f"the transformer has no layer {name!r}; is this adapter for another model?") from None
    if not isinstance(module, nn.Linear):
        raise AttachError(f"layer {name!r} is a {type(module).__name__}, not a Linear")
    if in_features is not None and (module.in_features, module.out_features) != (in_features, out_features):
        raise AttachError(
            f"layer {name!r} is {module.in_features}->{module.out_features} but the adapter expects "
            f"{in_features}->{out_features}; is this adapter for another model size?"
        )
    return module


def _batch_inputs(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor]:
    text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    pooled = kwargs.get("pooled_projections", args[2] if len(args) > 2 else None)
    if text is None or pooled is None:
        raise AttachError("dynamic routing needs encoder_hidden_states and pooled_projections in the forward call")
    return text, pooled


class AttachedAdapter:
    """The handle ``attach`` returns; also a context manager that detaches on exit."""

    def __init__(
        self,
        transformer: nn.Module,
        adapter: Adapter,
        mode: Mode = "dynamic",
        council: Council | None = None,
        *,
        expert_strength: float = 1.0,
        lora_strength: float = 1.0,
    ) -> None:
        if mode not in ("dynamic", "merged"):
            raise AttachError(f"mode {mode!r} is not one of 'dynamic', 'merged'")
        cfg = adapter.config
        self.transformer, self.adapter, self.mode = transformer, adapter, mode
        self.expert_strength, self.lora_strength = expert_strength, lora_strength
        self.last_council: Council | None = None  # what the latest forward routed (auto mode)
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._backup: dict[str, Tensor] = {}
        self._active: dict[str, tuple[Tensor, Tensor]] | None = None
        self._fixed: tuple[Council, Tensor, Tensor] | None = None  # a fixed council, compacted on the device
        self._layer_terms: dict[str, list[Callable[[Tensor], Tensor]]] = {}

        if council is not None:
            council.check_adapter(cfg.instruction_layers, cfg.num_experts, adapter.adapter_id)
        if mode == "merged" and council is None and cfg.instruction_layers:
            raise AttachError("merged mode folds one council into the weights: pass council=adapter.route(...)")
        self.council = council

        targets = {
            spec.name: _linear(transformer, spec.name, spec.in_features, spec.out_features) for spec in cfg.layers
        }
        lora = [(part, _linear(transformer, part.module)) for part in adapter.lora_parts()]
        ref = next(iter(targets.values())).weight
        device, dtype = ref.device, ref.dtype
        # Per-handle copies on the transformer's device and dtype: two handles never share state.
        self._router = copy.deepcopy(adapter.model.router).to(device, torch.float32).eval()
        self._gates = adapter.model.gates().detach().to(device, torch.float32) if cfg.instruction_layers else None
        # Merged mode folds the instruction layers into the weights: only token-routed ones stay dynamic.
        dynamic = [s.name for s in cfg.layers if mode == "dynamic" or s.routing == "token"]
        self._experts = {
            name: (
                adapter.model.layer(name).A.detach().to(device, dtype),
                adapter.model.layer(name).B.detach().to(device, dtype),
            )
            for name in dynamic
        }
        try:
            if mode == "merged":
                self._merge(targets, lora, council)
            else:
                for part, linear in lora:
                    self._add_term(part.module, linear, self._lora_term(part, device, dtype))
                self._hooks.append(transformer.register_forward_pre_hook(self._route, with_kwargs=True))
                self._hooks.append(transformer.register_forward_hook(self._clear, always_call=True))
                for name in cfg.instruction_layers:
                    self._add_term(name, targets[name], self._council_term(name))
            for spec in cfg.layers:
                if spec.routing == "token":
                    self._add_term(spec.name, targets[spec.name], self._token_term(spec.name))
        except BaseException:
            self.detach()
            raise

    # ---- dynamic ------------------------------------------------------------------------------

    def _add_term(self, name: str, linear: nn.Linear, term: Callable[[Tensor], Tensor]) -> None:
        if name not in self._layer_terms:
            terms = self._layer_terms[name] = []

            def hook(_module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
                x = inputs[0]
                for fn in terms:
                    delta = fn(x)
                    if delta is not None:
                        output = output + delta.to(output.dtype)
                return output

            self._hooks.append(linear.register_forward_hook(hook))
        self._layer_terms[name].append(term)

    def _lora_term(self, part, device, dtype) -> Callable[[Tensor], Tensor]:
        down, up = part.down.to(device, dtype), part.up.to(device, dtype)
        s = part.scale * self.lora_strength
        return lambda x: (x @ down.t()) @ up.t() * s

    def _council_term(self, name: str) -> Callable[[Tensor], Tensor | None]:
        A, B = self._experts[name]
        scale = self.adapter.config.scale

        def term(x: Tensor) -> Tensor | None:
            if self._active is None:  # called outside a transformer forward
                return None
            indices, weights = self._active[name]
            return council_delta(x, A, B, indices, weights, scale)

        return term

    def _token_term(self, name: str) -> Callable[[Tensor], Tensor]:
        A, B = self._experts[name]
        gate = self.adapter.model.layer(name).gate.weight.detach().to(A.device, A.dtype)
        cfg = self.adapter.config

        def term(x: Tensor) -> Tensor:
            _, indices, weights = token_route(x, gate, cfg.top_k)
            return token_delta(x, A, B, indices, weights * self.expert_strength, cfg.scale)

        return term

    @torch.no_grad()
    def route(self, text: Tensor, pooled: Tensor) -> Council:
        """Councils for a batch, exactly as the attached model routes it."""
        return Council.from_topk(
            self.adapter.config.instruction_layers,
            *self._router_output(text, pooled),
            adapter_id=self.adapter.adapter_id,
        )

    def _router_output(self, text: Tensor, pooled: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        device = self._gates.device
        signal = self._router(text.to(device, torch.float32), pooled.to(device, torch.float32))
        return route_instances(signal, self._gates, self.adapter.config.top_k)

    def _route(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        layers = self.adapter.config.instruction_layers
        if not layers:
            return
        if self.council is None:  # auto: the router's top-k as they are, no host sync
            probs, indices, weights = self._router_output(*_batch_inputs(args, kwargs))
            self.last_council = Council.from_topk(layers, probs, indices, weights, adapter_id=self.adapter.adapter_id)
            weights = weights * self.expert_strength
            shared = indices.shape[0] == 1
        else:
            if self._fixed is None or self._fixed[0] is not self.council:  # compact once per council
                indices, weights = self.council.compact()
                self._fixed = (self.council, indices.to(self._gates.device), weights.to(self._gates.device))
            _, indices, weights = self._fixed
            weights = weights * self.expert_strength
            shared = indices.shape[0] == 1  # one council for every row: shared-matrix fast path
            rows = (kwargs.get("hidden_states") if "hidden_states" in kwargs else args[0]).shape[0]
            if not shared and indices.shape[0] != rows:
                raise AttachError(f"the fixed council holds {indices.shape[0]} instances but the batch has {rows} rows")
        self._active = {
            name: (indices[0, row], weights[0, row]) if shared else (indices[:, row], weights[:, row])
            for row, name in enumerate(layers)
        }

    def _clear(self, *_args) -> None:
        self._active = None

    # ---- merged -------------------------------------------------------------------------------

    @torch.no_grad()
    def _merge(self, targets: dict[str, nn.Linear], lora: list, council: Council | None) -> None:
        """Add the folded council and the LoRA part to the weights, one layer at a time.

        Never more than one layer's ΔW exists at once, and the backups go to the CPU: at full size
        all deltas together would take about 10 GB of fp32 on the GPU.
        """
        lora_by_module: dict[str, list] = {}
        for part, linear in lora:
            lora_by_module.setdefault(part.module, []).append(part)
            targets.setdefault(part.module, linear)
        folded = iter_fold(self.adapter.model, scale(council, self.expert_strength)) if council is not None else ()
        done: set[str] = set()
        for name, delta in folded:
            self._add_to_weight(targets[name], name, delta, lora_by_module.get(name, []))
            done.add(name)
        for name, parts in lora_by_module.items():
            if name not in done:
                self._add_to_weight(targets[name], name, None, parts)

    def _add_to_weight(self, linear: nn.Linear, name: str, delta: Tensor | None, parts: list) -> None:
        weight = linear.weight
        self._backup[name] = weight.detach().to("cpu", copy=True)
        update = weight.to(torch.float32, copy=True)
        if delta is not None:
            update += delta.to(weight.device)
        for part in parts:
            down, up = part.down.to(weight.device, torch.float32), part.up.to(weight.device, torch.float32)
            update.addmm_(up, down, alpha=part.scale * self.lora_strength)
        weight.copy_(update.to(weight.dtype))

    # ---- lifetime -----------------------------------------------------------------------------

    @torch.no_grad()
    def detach(self) -> None:
        """Remove every hook and restore every merged weight from its backup (bit for bit)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for name, original in self._backup.items():
            self.transformer.get_submodule(name).weight.copy_(original)
        self._backup.clear()
        self._layer_terms.clear()
        self._active = None

    def __enter__(self) -> AttachedAdapter:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()


def attach(
    transformer: nn.Module,
    adapter: Adapter,
    mode: Mode = "dynamic",
    council: Council | None = None,
    *,
    expert_strength: float = 1.0,
    lora_strength: float = 1.0,
) -> AttachedAdapter:
    """Apply everything in ``adapter`` (experts, router, plain LoRA) to a diffusers Flux transformer.

    ``mode="dynamic"`` without ``council`` routes each row from its own conditioning (auto); with a
    council, that council serves every row (fixed). ``mode="merged"`` folds ``council`` and the LoRA
    part into the weights: afterwards a forward costs exactly the base model's.
    """
    return AttachedAdapter(
        transformer, adapter, mode, council, expert_strength=expert_strength, lora_strength=lora_strength
    )
