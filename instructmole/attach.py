"""Attach an adapter to a diffusers ``FluxTransformer2DModel``: dynamic (routed) or merged.

``attach`` never replaces or renames a module. Dynamic mode adds forward hooks: one pre-hook on
the transformer routes every row of the batch from its own ``encoder_hidden_states`` and
``pooled_projections`` (so a batch may mix instructions), and one hook per target Linear adds the
council term (and the unmerged plain-LoRA term). Merged mode adds the folded council and the LoRA
part to the weights in place, after backing them up. ``handle.detach()`` removes the hooks and
restores the backups bit for bit. All routing state lives on the handle.

A transformer carries at most one attached adapter at a time: a second ``attach`` (the same
adapter in a re-run notebook cell, or another one) is refused until the first is detached. Two
dynamic handles would silently add the experts twice, and two merged handles detached out of
order would restore a weight that already held the other's delta.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from .adapter import Adapter
from .checks import checked_strength
from .council import Council
from .errors import InstructMoLEError
from .families import DIFFUSERS_INPUTS, check_model_fits
from .runtime import MoLERuntime, RoutingError

__all__ = ["AttachedAdapter", "attach"]

Mode = Literal["dynamic", "merged"]
MARK = "_instructmole_attached"  # on the transformer: the handle that is attached to it now


class AttachError(InstructMoLEError):
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


def _check_lora_shape(part, linear: nn.Linear) -> None:
    if part.down.shape[1] != linear.in_features or part.up.shape[0] != linear.out_features:
        raise AttachError(
            f"the adapter's LoRA part for {part.module!r} is {part.down.shape[1]}->{part.up.shape[0]} but that "
            f"layer is {linear.in_features}->{linear.out_features}; is this adapter for another model size?"
        )


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
        training: bool = False,
    ) -> None:
        if not isinstance(transformer, nn.Module):
            raise AttachError(
                f"transformer must be a torch module (a diffusers Flux), got {type(transformer).__name__}"
            )
        if not isinstance(adapter, Adapter):
            raise AttachError(
                f"adapter must be an InstructMoLE Adapter (load_adapter(path)), got {type(adapter).__name__}"
            )
        if mode not in ("dynamic", "merged"):
            raise AttachError(f"mode {mode!r} is not one of 'dynamic', 'merged'")
        if council is not None and not isinstance(council, Council):
            raise AttachError(f"council must be a Council (adapter.route(...)) or None, got {type(council).__name__}")
        expert_strength = checked_strength("expert_strength", expert_strength, AttachError)
        lora_strength = checked_strength("lora_strength", lora_strength, AttachError)
        if getattr(transformer, MARK, None) is not None:
            raise AttachError(
                "this transformer already carries an attached InstructMoLE adapter; call detach() on that "
                "handle first (or use 'with attach(...)')"
            )
        if training and (mode != "dynamic" or adapter.lora):
            raise AttachError(
                "training=True routes the live adapter dynamically; train the plain LoRA part through peft, "
                "not through attach"
            )
        cfg = adapter.config
        self.transformer, self.adapter, self.mode = transformer, adapter, mode
        self.lora_strength = lora_strength
        self.seeds: Tensor | None = None  # training: per-row seeds of the next forward's random draws
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._backup: dict[str, Tensor] = {}
        self._layer_terms: dict[str, list[Callable[[Tensor, Tensor], Tensor]]] = {}

        check_model_fits(cfg, transformer, DIFFUSERS_INPUTS, AttachError)
        targets = {
            spec.name: _linear(transformer, spec.name, spec.in_features, spec.out_features) for spec in cfg.layers
        }
        lora = [(part, _linear(transformer, part.module)) for part in adapter.lora_parts()]
        for part, linear in lora:
            _check_lora_shape(part, linear)
        try:
            self.runtime = MoLERuntime(
                adapter.model,
                council=council,
                merged=mode == "merged",
                expert_strength=expert_strength,
                training=training,
                adapter_id=adapter.adapter_id,
            )
        except RoutingError as err:
            raise AttachError(str(err)) from None
        ref = next(iter(targets.values())).weight
        setattr(transformer, MARK, self)
        try:
            if mode == "merged":
                self._merge(targets, lora)
            else:
                for part, linear in lora:
                    self._add_term(part.module, linear, self._lora_term(part, ref.device, ref.dtype))
                self._hooks.append(transformer.register_forward_pre_hook(self._begin, with_kwargs=True))
                self._hooks.append(transformer.register_forward_hook(self._end, always_call=True))
            for name in sorted(self.runtime.layers):  # merged: only the token-routed layers
                self._add_term(name, targets[name], lambda x, out, name=name: self.runtime.add_term(name, x, out))
        except BaseException:
            self.detach()
            raise

    @property
    def council(self) -> Council | None:
        return self.runtime.council

    @council.setter
    def council(self, council: Council | None) -> None:
        """Switch a dynamic handle between auto (None) and a fixed council without re-attaching."""
        if self.mode == "merged":
            raise AttachError("a merged council is folded into the weights: detach and attach again to change it")
        self.runtime.council = council

    @property
    def last_council(self) -> Council | None:
        """What the latest auto-routed forward chose (built on demand)."""
        return self.runtime.last_council

    # ---- dynamic ------------------------------------------------------------------------------

    def _add_term(self, name: str, linear: nn.Linear, term: Callable[[Tensor, Tensor], Tensor]) -> None:
        """``term(x, output)`` gives the output with one more term added (the LoRA part, the experts)."""
        if name not in self._layer_terms:
            terms = self._layer_terms[name] = []

            def hook(_module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
                x = inputs[0]
                for fn in terms:
                    output = fn(x, output)
                return output

            self._hooks.append(linear.register_forward_hook(hook))
        self._layer_terms[name].append(term)

    def _lora_term(self, part, device, dtype) -> Callable[[Tensor, Tensor], Tensor]:
        down, up = part.down.to(device, dtype), part.up.to(device, dtype)
        s = part.scale * self.lora_strength
        return lambda x, out: out + ((x @ down.t()) @ up.t() * s).to(out.dtype)

    @torch.no_grad()
    def route(self, text: Tensor, pooled: Tensor) -> Council:
        """Councils for a batch, exactly as the attached model routes it."""
        probs, indices, weights = self.runtime.route(text, pooled)
        return Council.from_topk(
            self.adapter.config.instruction_layers, probs, indices, weights, adapter_id=self.runtime.adapter_id
        )

    def _begin(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        pooled = kwargs.get("pooled_projections", args[2] if len(args) > 2 else None)
        if self.runtime.council is None and (text is None or pooled is None):
            raise AttachError("dynamic routing needs encoder_hidden_states and pooled_projections in the forward call")
        try:
            self.runtime.begin(text, pooled, rows=hidden.shape[0], device=hidden.device, seeds=self.seeds)
        except RoutingError as err:
            raise AttachError(str(err)) from None

    def _end(self, *_args) -> None:
        self.runtime.end()

    # ---- merged -------------------------------------------------------------------------------

    @torch.no_grad()
    def _merge(self, targets: dict[str, nn.Linear], lora: list) -> None:
        """Add the runtime's folded council and the LoRA part to the weights, one layer at a time.

        Never more than one layer's ΔW exists at once, and the backups go to the CPU: at full size
        all deltas together would take about 10 GB of fp32 on the GPU.
        """
        lora_by_module: dict[str, list] = {}
        for part, linear in lora:
            lora_by_module.setdefault(part.module, []).append(part)
            targets.setdefault(part.module, linear)
        done: set[str] = set()
        for name, delta in self.runtime.folded():
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
        self.runtime.end()
        if getattr(self.transformer, MARK, None) is self:
            delattr(self.transformer, MARK)

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
    training: bool = False,
) -> AttachedAdapter:
    """Apply everything in ``adapter`` (experts, router, plain LoRA) to a diffusers Flux transformer.

    ``mode="dynamic"`` without ``council`` routes each row from its own conditioning (auto); with a
    council, that council serves every row (fixed). ``mode="merged"`` folds ``council`` and the LoRA
    part into the weights: afterwards a forward costs exactly the base model's. ``training=True``
    (dynamic, no plain-LoRA tensors) routes with the live adapter: gradients reach experts, gates
    and router, and ``handle.runtime.aux_losses()`` gives the auxiliary losses of each forward.
    """
    return AttachedAdapter(
        transformer,
        adapter,
        mode,
        council,
        expert_strength=expert_strength,
        lora_strength=lora_strength,
        training=training,
    )
