"""Attach an adapter to a diffusers transformer of FLUX.1, FLUX.2 or Qwen-Image: dynamic (routed) or merged.

``attach`` never replaces or renames a module. Dynamic mode adds forward hooks: one pre-hook on
the transformer routes every row of the batch from its own instruction signal (so a batch may mix
instructions), and one hook per target Linear adds the council term (and the unmerged plain-LoRA
term). Merged mode adds the folded council and the LoRA part to the weights in place, after
backing them up. ``handle.detach()`` removes the hooks and restores the backups bit for bit. All
routing state lives on the handle.

The signal is read per architecture (``families.architecture_of``) from the forward call, one code
path for all:

* FLUX.1: ``encoder_hidden_states`` (T5) and ``pooled_projections`` (CLIP), every token (as trained);
* Qwen-Image: ``encoder_hidden_states`` with ``encoder_hidden_states_mask`` as the token mask;
* FLUX.2: ``encoder_hidden_states``, every token (its pipelines pass no mask).

Those are the pipeline's own features, and for the text-routed families they are not the
instruction alone: they hold the chat template (and Qwen-Image-Edit's image placeholder tokens, and
FLUX.2's padding). ``handle.set_signal(text, pooled=None, mask=None)`` routes every following forward
from an explicit signal instead (the instruction-only features and their mask, as the adapter was
trained on), one row per image of each forward; ``handle.set_signal(None)`` goes back to the
forward's own. A fixed council, or a merged one, never reads a signal.

A transformer carries at most one attached adapter at a time: a second ``attach`` (the same
adapter in a re-run notebook cell, or another one) is refused until the first is detached. Two
dynamic handles would silently add the experts twice, and two merged handles detached out of
order would restore a weight that already held the other's delta.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .adapter import Adapter
from .checks import checked_strength
from .council import Council
from .errors import InstructMoLEError
from .families import check_model_fits
from .runtime import MoLERuntime, RoutingError

__all__ = ["AttachedAdapter", "attach"]

Mode = Literal["dynamic", "merged"]
MARK = "_instructmole_attached"  # on the transformer: the handle that is attached to it now


class AttachError(InstructMoLEError):
    """The adapter does not fit the transformer it is attached to, or the mode's inputs are missing."""


def _positions(transformer: nn.Module, order: tuple[str, ...]) -> dict[str, int]:
    """Positional index of each forward argument, from the forward's signature where it can be read."""
    try:
        names = [
            name
            for name, p in inspect.signature(transformer.forward).parameters.items()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        names = []
    if "hidden_states" not in names:
        names = list(order)
    return {name: i for i, name in enumerate(names)}


def _show(value: Any) -> str:
    return f"shape {tuple(value.shape)} ({value.dtype})" if isinstance(value, Tensor) else type(value).__name__


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
                "transformer must be a torch module (a diffusers FLUX.1, FLUX.2 or Qwen-Image transformer), got "
                f"{type(transformer).__name__}"
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
        self._signal: tuple[Tensor, Tensor | None, Tensor | None] | None = None  # set_signal's, on its device
        self._signal_on: dict[torch.device, tuple[Tensor, Tensor | None, Tensor | None]] = {}

        self.family = check_model_fits(cfg, transformer, AttachError)
        self._args = self.family.arch.diffusers_signal
        self._positions = _positions(transformer, self._args.order)
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
        setattr(transformer, MARK, self)
        try:
            if mode == "merged":
                self._merge(targets, lora)
            else:
                # Only a LoRA part needs a weight's device and dtype: a quantized or block-swapped base
                # (the trainer's, which attaches no LoRA part) is never read here.
                ref = next(iter(targets.values())).weight if lora else None
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
    def route(self, text: Tensor, pooled: Tensor | None = None, *, mask: Tensor | None = None) -> Council:
        """Councils for a batch, exactly as the attached model routes it: ``text [b, t, text_dim]``,
        ``pooled [b, router_dim]`` (FLUX.1's CLIP vector; None for the text-routed families) and
        ``mask [b, t]`` (the instruction's tokens; None: every token)."""
        text, pooled, mask = self._checked_signal(text, pooled, mask, "route")
        probs, indices, weights = self.runtime.route(text, pooled, mask=mask)
        return Council.from_topk(
            self.adapter.config.instruction_layers, probs, indices, weights, adapter_id=self.runtime.adapter_id
        )

    def set_signal(self, text: Tensor | None, pooled: Tensor | None = None, mask: Tensor | None = None) -> None:
        """Route every following forward from this signal instead of the forward's own features.

        ``text [rows, tokens, text_dim]``: the instruction's text features; ``pooled [rows,
        router_dim]``: FLUX.1's CLIP pooled vector (None for FLUX.2 and Qwen-Image, whose routers
        pool the text); ``mask [rows, tokens]`` (bool or 0/1): the instruction's own tokens, template
        and padding off (None: every token). Each forward's batch must have ``rows`` images (a
        pipeline with CFG runs its conditional and unconditional passes as two forwards of that
        batch: both route from this signal). ``set_signal(None)`` goes back to the forward's own
        features. A fixed or merged council ignores it. The tensors are kept as given (and copied
        once to the device a forward runs on), so set a new signal for a new instruction.
        """
        if text is None:
            if pooled is not None or mask is not None:
                raise AttachError("set_signal(None) clears the signal; pass no pooled vector or mask with it")
            self._signal, self._signal_on = None, {}
            return
        if self.mode == "merged":
            raise AttachError(
                "a merged handle does not route (its council is folded into the weights); attach in dynamic mode "
                "to route from a signal"
            )
        self._signal = self._checked_signal(text, pooled, mask, "set_signal")
        self._signal_on = {}

    def _checked_signal(
        self, text: Any, pooled: Any, mask: Any, where: str
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The signal's types and shapes against the adapter's router, one sentence per mistake."""
        cfg = self.adapter.config
        if not cfg.instruction_layers:
            raise AttachError(
                f"{where}: this adapter routes every layer per token, so there is no instruction signal to give"
            )
        if not isinstance(text, Tensor) or not text.is_floating_point() or text.ndim != 3:
            raise AttachError(f"{where}: text must be a float tensor [rows, tokens, {cfg.text_dim}], got {_show(text)}")
        if text.shape[-1] != cfg.text_dim or 0 in text.shape:
            raise AttachError(
                f"{where}: text has shape {tuple(text.shape)}, but the adapter's router reads [rows, tokens, "
                f"{cfg.text_dim}]; encode with the text encoder of {self.family.title}"
            )
        if cfg.router_pool == "clip":
            if not isinstance(pooled, Tensor) or not pooled.is_floating_point() or pooled.ndim != 2:
                raise AttachError(
                    f"{where}: pooled must be the CLIP pooled vector, a float tensor [rows, {cfg.router_dim}], got "
                    f"{_show(pooled)}"
                )
            if tuple(pooled.shape) != (text.shape[0], cfg.router_dim):
                raise AttachError(
                    f"{where}: pooled has shape {tuple(pooled.shape)} for {text.shape[0]} text rows, but the router "
                    f"reads [{text.shape[0]}, {cfg.router_dim}]; pass one pooled vector per instruction"
                )
        elif pooled is not None:
            raise AttachError(
                f"{where}: {self.family.title} adapters route from the text alone; pass pooled=None and the "
                "instruction's token mask"
            )
        if mask is not None:
            if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(text.shape[:2]):
                raise AttachError(
                    f"{where}: mask must be a tensor [rows, tokens] = {tuple(text.shape[:2])} (True on the "
                    f"instruction's tokens), got {_show(mask)}"
                )
            if mask.is_floating_point() or mask.is_complex():
                raise AttachError(f"{where}: mask must be bool or 0/1 integers, got {mask.dtype}")
            mask = mask.bool()
        return text, pooled, mask

    def _arg(self, name: str | None, args: tuple, kwargs: dict) -> Any:
        if name is None:
            return None
        if name in kwargs:
            return kwargs[name]
        at = self._positions.get(name)
        return args[at] if at is not None and at < len(args) else None

    def _forward_signal(self, args: tuple, kwargs: dict) -> tuple[Any, Any, Any]:
        """This forward's own routing signal, read as the architecture passes it."""
        names = self._args
        text = self._arg(names.text, args, kwargs)
        pooled = self._arg(names.pooled, args, kwargs)
        mask = self._arg(names.mask, args, kwargs)
        if text is None or (names.pooled is not None and pooled is None):
            given = " and ".join(n for n in (names.text, names.pooled) if n)
            raise AttachError(
                f"dynamic routing needs {given} in the forward call; pass them, or give the instruction's signal "
                "with handle.set_signal(...)"
            )
        if mask is not None:
            mask = mask.bool()
        return text, pooled, mask

    def _set_signal_on(self, device: torch.device, rows: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``set_signal``'s signal for a forward of ``rows`` images on ``device`` (copied there once)."""
        text = self._signal[0]
        if text.shape[0] != rows:
            raise AttachError(
                f"the signal given to set_signal has {text.shape[0]} rows, but this forward's batch has {rows} "
                f"images; set one row per image (or set_signal(None) to route from the forward's own features)"
            )
        if device not in self._signal_on:
            self._signal_on = {device: tuple(None if t is None else t.to(device) for t in self._signal)}
        return self._signal_on[device]

    def _begin(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = self._arg("hidden_states", args, kwargs)
        rows, device = hidden.shape[0], hidden.device
        text = pooled = mask = None
        if self.runtime.council is None and self.runtime.layers.intersection(self.adapter.config.instruction_layers):
            if self._signal is not None:
                text, pooled, mask = self._set_signal_on(device, rows)
            else:
                text, pooled, mask = self._forward_signal(args, kwargs)
        try:
            self.runtime.begin(text, pooled, rows=rows, device=device, seeds=self.seeds, mask=mask)
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
    """Apply everything in ``adapter`` (experts, router, plain LoRA) to a diffusers transformer of the
    family the adapter was made for (FLUX.1, FLUX.2 or Qwen-Image; another is refused in one sentence).

    ``mode="dynamic"`` without ``council`` routes each row from its own conditioning (auto: the
    forward's features as the module docstring lists them, or ``handle.set_signal``'s); with a
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
