"""One routing mechanism for every host: the per-forward routing state and the per-layer term.

Three hosts run InstructMoLE layers: the diffusers ``attach`` (forward hooks), the ComfyUI
runtime (object-patched Linear forwards and a model wrapper) and the trainer (``attach`` with
``training=True``). Each host does only the plumbing of its framework; all of them install one
``MoLERuntime`` and call, per transformer forward::

    runtime.begin(text, pooled, rows=..., mask=...)   # route every row once (or take a fixed council)
    runtime.delta(layer_name, x)            # per target Linear: the expert term to add (or None)
    runtime.end()                           # forget the routing (inference only, see below)

Inference (``training=False``): the router and the experts are copied once per device and dtype
(``DeviceCache``) and run without gradients; nothing waits on the device per step.

Training (``training=True``): the live parameters are used, so council weights carry gradients
into the gates and the router; gate noise and router dropout follow the module's ``train()``
mode; every layer records what the auxiliary losses need (``aux_losses``). The routing state is
*not* cleared at the end of a training forward: with gradient checkpointing the blocks run again
during backward, and they must see the very councils of the first pass (a cleared state would
drop the expert term from the recomputed forward: torch's checkpoint check fails on it, or with
that check off, the gradients silently change). The next ``begin`` replaces it.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from .council import Council
from .errors import InstructMoLEError
from .experts import (
    council_delta,
    council_delta_with_projections,
    token_delta,
    token_delta_with_projections,
    token_route,
)
from .fold import council_factors, iter_fold
from .losses import balance_statistics, load_balancing_from_statistics, orthogonality_from_gram, projection_gram
from .model import InstructMoLE
from .overrides import with_strength
from .routing import route_instances

__all__ = ["AuxLosses", "DeviceCache", "MoLERuntime", "RoutingError", "StepRouting"]

Reduce = Literal["sum", "mean"]
Mode = Literal["auto", "fixed", "merged"]


class RoutingError(InstructMoLEError):
    """A forward asked the runtime for something its mode cannot give (e.g. a council/batch mismatch)."""


class DeviceCache:
    """Adapter tensors cast to where the model runs, made once per device and dtype (inference)."""

    def __init__(self, model: InstructMoLE) -> None:
        self.model = model
        self._experts: dict[tuple, dict[str, tuple[Tensor, Tensor]]] = {}
        self._router: dict[torch.device, tuple[Any, Tensor | None]] = {}
        self._gates: dict[tuple, Tensor] = {}

    def experts(self, name: str, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        bank = self._experts.setdefault((device, dtype), {})
        if name not in bank:
            if len(self._experts) > 1:  # the model moved: drop copies on the old device or dtype
                self._experts = {(device, dtype): bank}
            layer = self.model.layer(name)
            bank[name] = (layer.A.detach().to(device, dtype), layer.B.detach().to(device, dtype))
        return bank[name]

    def token_gate(self, name: str, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = (name, device, dtype)
        if key not in self._gates:
            self._gates[key] = self.model.layer(name).gate.weight.detach().to(device, dtype)
        return self._gates[key]

    def router(self, device: torch.device) -> tuple[Any, Tensor | None]:
        """A fp32 eval copy of the router and the stacked instruction gates on ``device``."""
        if device not in self._router:
            router = copy.deepcopy(self.model.router).to(device, torch.float32).eval()
            layers = self.model.config.instruction_layers
            gates = self.model.gates().detach().to(device, torch.float32) if layers else None
            self._router = {device: (router, gates)}
        return self._router[device]


@dataclass
class AuxLosses:
    """The auxiliary losses of one training forward (0-d tensors, already reduced over layers)."""

    load_balance: Tensor  # instruction-routed layers (units = instances)
    load_balance_token: Tensor  # token-routed layers (units = tokens); 0 when there are none
    orthogonality: Tensor  # every MoLE layer

    def as_floats(self) -> dict[str, float]:
        return {k: float(v.detach()) for k, v in vars(self).items()}


@dataclass(frozen=True)
class StepRouting:
    """The instruction routing of a whole optimizer step, for its load-balancing term.

    ``counts`` ``[L, n]``: routing slots per expert over every row of the step (all of its
    micro-batches, all processes; no gradient); ``units``: those rows; ``micro_batches``: ``M``.
    A trainer routes the step's rows first (``routing_counts``, exactly as the forwards will route
    them: the draws come from the rows' seeds and the weights do not change within a step), and
    each micro-batch's term then uses the step's ``f`` with its own probabilities (see
    ``load_balancing_from_statistics``): the mean over the step's micro-batches is the loss of
    one batch holding every row of the step, in value and gradient.
    """

    counts: Tensor
    units: int
    micro_batches: int


class MoLERuntime:
    """Routing state and the expert term of one adapter on one host model, in one of three modes.

    ``auto`` routes every row of each forward from its own instruction; ``fixed`` (a ``council``)
    serves that council to every row; ``merged`` (a ``council`` and ``merged=True``) folds the
    council into the weights once (``folded``, which the host writes where its weights live) and
    keeps a per-forward term only for token-routed layers, whose term cannot be folded. The expert
    strength scales the term in every mode (the folded council too). A host only installs what
    the runtime gives it: ``layers`` (where a per-forward term goes), ``folded()`` (what to add to
    the weights) and ``begin``/``delta``/``end`` per forward. State lives on the instance, never on
    a module or class, so two runtimes on two models never share it.
    """

    def __init__(
        self,
        model: InstructMoLE,
        *,
        council: Council | None = None,
        merged: bool = False,
        expert_strength: float = 1.0,
        training: bool = False,
        adapter_id: str | None = None,
        cache: DeviceCache | None = None,
    ) -> None:
        self.model, self.config = model, model.config
        self.expert_strength = expert_strength
        self.training = training
        self.adapter_id = adapter_id if adapter_id is not None else model.fingerprint()
        self.cache = cache or DeviceCache(model)
        self._token_layers = {s.name for s in self.config.layers if s.routing == "token"}
        if merged and council is None and self.config.instruction_layers:
            raise RoutingError(
                "merged mode folds one council into the weights: pass council=adapter.route(...) (or a council "
                "from the Route node)"
            )
        if merged and training:
            raise RoutingError("a merged council is folded into the weights and cannot train; train in auto mode")
        self.merged = merged
        # Where a per-forward term goes: every MoLE layer, or once merged only the token-routed ones.
        self.layers = set(self._token_layers) if merged else set(self.config.layer_names)
        self._renormalise = self.config.token_weights == "renormalised"
        self._council: Council | None = None
        self._fixed: dict[torch.device, tuple[Tensor, Tensor]] = {}  # compacted fixed council per device
        self._active: dict[str, tuple[Tensor, Tensor]] | None = None
        # Inference with one council for every row: per layer the council's (down, up) matrices,
        # gathered once and kept while the council stays the same (every step of one sampling).
        self._shared: tuple[Tensor, Tensor] | None = None  # the council they were made for
        self._factors: dict[tuple, tuple[Tensor, Tensor]] = {}
        self._last: tuple[Tensor, Tensor, Tensor] | None = None  # router output, left on the device
        self._records: dict[str, Any] = {}  # training: what the aux losses need, per forward
        self._token_choices: dict[str, Tensor] = {}  # inference: each token's first choice, per token layer
        self._seeds: Tensor | None = None  # training: per-row seeds of the current forward
        self._set_council(council)

    # ---- configuration ------------------------------------------------------------------------

    @property
    def mode(self) -> Mode:
        return "merged" if self.merged else ("fixed" if self._council is not None else "auto")

    @property
    def council(self) -> Council | None:
        return self._council

    @council.setter
    def council(self, council: Council | None) -> None:
        """Switch between auto (None) and a fixed council; a merged council is in the weights already."""
        if self.merged:
            raise RoutingError("a merged council is folded into the weights: apply the adapter again to change it")
        self._set_council(council)

    def _set_council(self, council: Council | None) -> None:
        if council is not None:
            council.check_adapter(self.config.instruction_layers, self.config.num_experts, self.adapter_id)
        self._council, self._fixed = council, {}

    def folded(
        self, *, factors: bool = False, dtype: torch.dtype = torch.float32
    ) -> Iterator[tuple[str, Tensor | tuple[Tensor, Tensor]]]:
        """Merged mode: per instruction-routed layer, the council's weight term at this runtime's
        strength, ``ΔW [out, in]`` or its ``(down, up)`` factors, one layer at a time (``iter_fold``).
        Nothing in the other modes."""
        if not self.merged or self._council is None:
            return iter(())
        council = with_strength(self._council, self.expert_strength) if self.expert_strength != 1.0 else self._council
        return iter_fold(self.model, council, factors=factors, dtype=dtype)

    @property
    def last_council(self) -> Council | None:
        """The councils of the latest auto-routed forward (built on demand: no device sync per step)."""
        if self._last is None:
            return None
        probs, indices, weights = (t.detach().cpu() for t in self._last)
        return Council.from_topk(self.config.instruction_layers, probs, indices, weights, adapter_id=self.adapter_id)

    @property
    def token_choices(self) -> dict[str, Tensor]:
        """The latest forward's first choices as they are (``[rows, tokens]`` on the device): a host
        may keep them past later forwards (each forward starts a new dict) without a device sync."""
        return self._token_choices

    @property
    def last_token_experts(self) -> dict[str, Tensor]:
        """Per token-routed layer, the expert each token ranked first in the latest inference forward
        (``[rows, tokens]``, on the CPU; built on demand: nothing waits on the device per step)."""
        return {name: choice.cpu() for name, choice in self._token_choices.items()}

    # ---- per forward --------------------------------------------------------------------------

    def route(
        self, text: Tensor, pooled: Tensor | None, seeds: Tensor | None = None, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The router's ``(probs, indices, weights)`` for a batch: ``[b, L, n]``, ``[b, L, k]``, ``[b, L, k]``.

        The one routing function: every host, ``Adapter.route`` and the trainer come here, so a
        council routed anywhere is the council a patched model routes. The router maths always run
        in fp32 with autocast off, whatever dtype the adapter stores, so that a mixed-precision run
        picks the councils inference will pick. Inference runs the cached eval copy (``DeviceCache``)
        without gradients; training runs the live module, whose ``train()`` mode decides gate noise
        and dropout. ``seeds`` (one integer per row, training): draw each row's gate noise and
        dropout mask from its own seed instead of the global generator, so a row routes the same on
        one process or many, and after a resume. ``pooled``: the CLIP pooled vector (None for a text
        router, ``config.router_pool == "text"``); ``mask [b, t]``: the instruction's tokens (text
        routers; None: every token).
        """
        noise = keep = None
        if self.training:
            router, gates, noise_std = self.model.router, self.model.gates(), self.model.gate_noise_std
            if seeds is not None and self.model.training:
                noise, keep = self._row_draws(seeds, text.device)
            device, grad = next(router.parameters()).device, torch.is_grad_enabled()
        else:
            (router, gates), noise_std, device, grad = self.cache.router(text.device), 0.0, text.device, False
        with torch.autocast(device.type, enabled=False), torch.set_grad_enabled(grad):
            pooled = None if pooled is None else pooled.to(device, torch.float32)
            mask = None if mask is None else mask.to(device, torch.bool)
            signal = router(text.to(device, torch.float32), pooled, keep, mask)
            return route_instances(signal, gates, self.config.top_k, noise_std, noise)

    @torch.no_grad()
    def routing_counts(
        self, text: Tensor, pooled: Tensor | None, seeds: Tensor | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """Routing slots per instruction layer and expert (``[L, n]``) that a training forward of this
        batch would give (the same code and draws as ``route``), without gradients: a trainer adds
        them over an optimizer step for ``StepRouting``. Needs the row ``seeds`` when the module is
        in training mode, so that the gate noise and dropout equal the forward's."""
        probs, indices, _ = self.route(text, pooled, seeds, mask)
        return balance_statistics(probs, indices)[1]

    def _row_draws(self, seeds: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
        """Per row: gate noise ``[L, n]`` and a router-dropout keep mask ``[d]`` from its seed."""
        cfg = self.config
        noise, keep = [], []
        for seed in seeds.tolist():
            g = torch.Generator().manual_seed(int(seed))
            noise.append(torch.randn(len(cfg.instruction_layers), cfg.num_experts, generator=g))
            keep.append(torch.rand(cfg.router_dim, generator=g) >= cfg.router_dropout)
        return torch.stack(noise).to(device), torch.stack(keep).to(device)

    def _token_noise(self, name: str, shape: torch.Size, device: torch.device) -> Tensor | None:
        """Per row, the token gate noise of layer ``name`` from the row's seed (None: draw globally)."""
        if self._seeds is None:
            return None
        layer = self.config.layer_names.index(name)
        rows = [
            torch.randn(shape[1:], generator=torch.Generator().manual_seed(_layer_seed(int(seed), layer)))
            for seed in self._seeds.tolist()
        ]
        return torch.stack(rows).to(device)

    def begin(
        self,
        text: Tensor | None,
        pooled: Tensor | None,
        *,
        rows: int | None = None,
        device: torch.device | None = None,
        seeds: Tensor | None = None,
        routed: tuple[Tensor, Tensor, Tensor] | None = None,
        mask: Tensor | None = None,
    ) -> None:
        """Route the batch of one transformer forward of ``rows`` rows on ``device`` (default: the
        text's). ``text``/``pooled`` may be None when nothing is routed (fixed council, merged).
        ``seeds``: per-row seeds for training's random draws (see ``route``). ``routed``: the
        ``route`` output of every row, already computed (rows whose signals differ in length are
        routed apart and joined; the router is row-independent, so that is the same council).
        ``mask``: a text router's instruction tokens (see ``route``)."""
        layers = self.config.instruction_layers
        self._records = {"grams": {}, "token": {}}
        self._token_choices = {}
        self._seeds = seeds if self.training else None
        if not layers or not self.layers.intersection(layers):
            self._active = None
            return
        if self._council is not None:
            where = device if device is not None else text.device if text is not None else torch.device("cpu")
            indices, weights = self._fixed_on(where)
            if rows is not None and indices.shape[0] not in (1, rows):
                raise RoutingError(
                    f"the fixed council holds {indices.shape[0]} instances but the batch has {rows} rows"
                )
        else:
            if routed is not None:
                probs, indices, weights = routed
            else:
                self._check_signal(text, pooled, mask, rows)
                if device is not None:  # a host may hold the signal elsewhere than the model (e.g. on the CPU)
                    text = text.to(device)
                    pooled = None if pooled is None else pooled.to(device)
                    mask = None if mask is None else mask.to(device)
                probs, indices, weights = self.route(text, pooled, self._seeds, mask)
            self._last = (probs, indices, weights)
            if self.training:
                self._records["instruction"] = (probs, indices)
            if self.expert_strength != 1.0:
                weights = weights * self.expert_strength
        shared = indices.shape[0] == 1  # one council for every row: the shared-matrix fast path
        if shared and not self.training:
            self._keep_factors(indices, weights)
        self._active = {
            name: (indices[0, row], weights[0, row]) if shared else (indices[:, row], weights[:, row])
            for row, name in enumerate(layers)
        }

    def _keep_factors(self, indices: Tensor, weights: Tensor) -> None:
        """Keep the gathered council matrices if this forward's shared council is the last one's.

        A fixed council is the very same tensors every forward. An auto council is routed anew
        each forward, but from the same instruction it is the same council at every sampling step;
        on the CPU its few numbers are compared (the gathers it saves are megabytes of memory
        traffic per layer), on an accelerator that comparison would wait on the device every
        step, and the gathers cost little there, so they are redone."""
        last = self._shared
        same = last is not None and last[0] is indices and last[1] is weights
        if not same and last is not None and indices.device.type == "cpu" and last[0].device == indices.device:
            same = torch.equal(last[0], indices) and torch.equal(last[1], weights)
        if not same:
            self._shared, self._factors = (indices, weights), {}

    def _check_signal(self, text: Tensor | None, pooled: Tensor | None, mask: Tensor | None, rows: int | None) -> None:
        """Shapes only (no device sync): a signal of another width or batch would fail deep in a layer."""
        cfg = self.config
        clip = cfg.router_pool == "clip"
        if text is None or (clip and pooled is None):
            what = "T5 features and CLIP pooled vector" if clip else "text features"
            raise RoutingError(f"auto routing needs the instruction's {what}")
        if text.ndim != 3 or text.shape[-1] != cfg.text_dim:
            raise RoutingError(
                f"the instruction's text features are {tuple(text.shape)}, but the router reads "
                f"[rows, tokens, {cfg.text_dim}]; encode with the text encoder of {cfg.base_model}"
            )
        if clip and (pooled.ndim != 2 or pooled.shape[-1] != cfg.router_dim):
            raise RoutingError(
                f"the instruction's pooled vector is {tuple(pooled.shape)}, but the router reads "
                f"[rows, {cfg.router_dim}]; encode with the FLUX text encoders"
            )
        if not clip and pooled is not None:
            raise RoutingError(
                f"this adapter (for {cfg.base_model}) routes from the text alone, but a pooled vector was given; "
                "pass no pooled vector, and the instruction's token mask"
            )
        if mask is not None and (mask.is_floating_point() or mask.is_complex()):
            raise RoutingError(
                f"the instruction's token mask is {mask.dtype}; give a bool (or 0/1 integer) mask, true on the "
                "instruction's tokens (an additive 0/-inf attention mask would read inverted)"
            )
        if mask is not None and tuple(mask.shape) != tuple(text.shape[:2]):
            raise RoutingError(
                f"the instruction's token mask is {tuple(mask.shape)} for text features {tuple(text.shape)}; "
                "give one mask entry per token"
            )
        if (clip and text.shape[0] != pooled.shape[0]) or (rows is not None and text.shape[0] != rows):
            pooled_rows = f" and {pooled.shape[0]} pooled rows" if clip else ""
            raise RoutingError(
                f"the instruction signal has {text.shape[0]} text rows{pooled_rows} for a batch "
                f"of {rows} images; give one instruction per image"
            )

    def _fixed_on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """The fixed council compacted to ``[b, L, K]`` and moved to ``device`` once, not every step."""
        if device not in self._fixed:
            indices, weights = self._council.compact()
            self._fixed = {device: (indices.to(device), (weights * self.expert_strength).to(device))}
        return self._fixed[device]

    def end(self) -> None:
        """Inference: forget the routing. Training keeps it for recomputation (module docstring)."""
        if not self.training:
            self._active = None

    # ---- per layer ----------------------------------------------------------------------------

    def add_term(self, name: str, x: Tensor, out: Tensor) -> Tensor:
        """``out`` (layer ``name``'s output for input ``x``) plus its expert term.

        Inference with one council for every row adds ``(x · downᵀ) · upᵀ`` straight into ``out``
        (one ``addmm_``: no term tensor, no second pass over the output) with the council's
        factors gathered once per council (``_keep_factors``); every other case adds ``delta``."""
        factors = self._shared_factors(name, x, out)
        if factors is None:
            delta = self.delta(name, x)
            return out if delta is None else out + delta.to(out.dtype)
        down, up = factors
        out.view(-1, out.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]) @ down.t(), up.t())
        return out

    def _shared_factors(self, name: str, x: Tensor, out: Tensor) -> tuple[Tensor, Tensor] | None:
        """Layer ``name``'s ``council_factors`` when its term may go into ``out`` in place: inference,
        one council for every row, an instruction-routed layer, no autograd on ``out``, and an output
        of the term's width and dtype laid out row by row. None otherwise."""
        active = None if self._active is None or self.training else self._active.get(name)
        if (
            active is None
            or active[0].ndim != 1
            or name in self._token_layers
            or name not in self.layers
            or (out.requires_grad and torch.is_grad_enabled())
            or not out.is_contiguous()
            or out.dtype != x.dtype
        ):
            return None
        key = (name, x.device, x.dtype)
        if key not in self._factors:
            A, B = self.cache.experts(name, x.device, x.dtype)
            self._factors[key] = council_factors(A, B, *active, self.config.scale)
        factors = self._factors[key]
        return factors if factors[1].shape[0] == out.shape[-1] else None

    def delta(self, name: str, x: Tensor) -> Tensor | None:
        """The expert term of layer ``name`` for its input ``x`` (``None``: nothing to add)."""
        if name not in self.layers:
            return None
        cfg = self.config
        if self.training:
            layer = self.model.layer(name)
            A, B = layer.A.to(x.dtype), layer.B.to(x.dtype)
        else:
            A, B = self.cache.experts(name, x.device, x.dtype)
        if name in self._token_layers:
            return self._token_delta(name, x, A, B)
        if self._active is None:
            return None
        indices, weights = self._active[name]
        if not self.training:
            return council_delta(x, A, B, indices, weights, cfg.scale)
        if indices.ndim == 1:  # a fixed council while training (evaluation): one council for all rows
            indices, weights = indices.expand(x.shape[0], -1), weights.expand(x.shape[0], -1)
        out, proj = council_delta_with_projections(x, A, B, indices, weights, cfg.scale)
        self._record(name, gram=projection_gram(proj))
        return out

    def _token_delta(self, name: str, x: Tensor, A: Tensor, B: Tensor) -> Tensor:
        cfg = self.config
        if not self.training:
            gate = self.cache.token_gate(name, x.device, x.dtype)
            _, indices, weights = token_route(x, gate, cfg.top_k, renormalise=self._renormalise)
            self._token_choices[name] = indices[..., 0].reshape(x.shape[0], -1)
            return token_delta(x, A, B, indices, weights * self.expert_strength, cfg.scale)
        gate = self.model.layer(name).gate.weight
        std = self.model.gate_noise_std
        noise = self._token_noise(name, (x.shape[0], x[0].numel() // x.shape[-1], cfg.num_experts), x.device)
        with torch.autocast(x.device.type, enabled=False):
            probs, indices, weights = token_route(
                x.float(), gate.float(), cfg.top_k, std, noise if std else None, renormalise=self._renormalise
            )
        out, proj = token_delta_with_projections(x, A, B, indices, weights.to(x.dtype), cfg.scale)
        self._record(name, gram=projection_gram(proj), token=(probs, indices))
        return out

    def _record(self, name: str, **values: Any) -> None:
        """Keep what the first pass of this forward computed for layer ``name``.

        A block recomputed by gradient checkpointing (during backward) computes the same values
        again, and must, so that it saves the same tensors; storing those would keep the
        recomputed block's activations alive until the next forward (measured: 0.7-1.3 GiB at
        the scaled benchmark size), so they are dropped.
        """
        for kind, value in values.items():
            self._records["grams" if kind == "gram" else kind].setdefault(name, value)

    # ---- training losses ----------------------------------------------------------------------

    def aux_losses(
        self, reduce: Reduce = "sum", *, distributed: bool = False, step: StepRouting | None = None
    ) -> AuxLosses:
        """Load balancing and orthogonality of the latest forward, reduced over layers.

        ``reduce="sum"`` adds the layers' losses (the reference recipe's weights were tuned so);
        ``"mean"`` averages them. ``distributed=True`` (several processes in one
        ``torch.distributed`` group) first adds every process's routing and Gram sums, so each
        process computes the loss of the global batch; with DDP's gradient averaging this gives
        exactly the gradients of a single process running the whole batch.

        ``step``: the instruction layers' ``f`` comes from the whole optimizer step (see
        ``StepRouting``) instead of this forward alone. Token-routed layers and orthogonality stay
        per forward: their units are tokens (thousands per image), and their statistics depend on
        the layer inputs, which only the forward itself computes.
        """
        if not self.training:
            raise RoutingError("aux_losses needs a runtime created with training=True")
        agg = torch.sum if reduce == "sum" else torch.mean
        zero = next(self.model.parameters()).new_zeros(())

        def balance(probs: Tensor, indices: Tensor, step: StepRouting | None = None) -> Tensor:
            prob_sum, counts, units = balance_statistics(probs, indices)
            if distributed:
                prob_sum = _all_sum(prob_sum)
            if step is not None:
                counts = step.counts.to(prob_sum.device, prob_sum.dtype)
                return load_balancing_from_statistics(prob_sum, counts, step.units, step.units / step.micro_batches)
            if distributed:
                counts, units = _all_sum(counts, grad=False), _all_sum_int(units)
            return load_balancing_from_statistics(prob_sum, counts, units)

        lb = zero
        if "instruction" in self._records:
            lb = agg(balance(*self._records["instruction"], step))
        token = [balance(p[..., None, :], i[..., None, :]) for p, i in self._records["token"].values()]
        lb_token = agg(torch.cat(token)) if token else zero
        grams = self._records["grams"]
        ortho = zero
        if grams:
            names = list(grams)
            stacked = torch.stack([grams[n] for n in names])
            if distributed:
                stacked = _all_sum(stacked)
            layers = [orthogonality_from_gram(g, self.model.layer(n).B) for n, g in zip(names, stacked, strict=True)]
            ortho = agg(torch.stack(layers))
        return AuxLosses(lb, lb_token, ortho)


def _layer_seed(seed: int, layer: int) -> int:
    """A seed for one row's draws in one token-routed layer: a hash of (row seed, layer index).

    Row seeds use the whole 63-bit range (the trainer draws them so), so arithmetic such as
    ``seed * 1000 + layer`` would overflow the generator's 64-bit seed; a hash never does, and
    nearby pairs give unrelated streams.
    """
    digest = hashlib.blake2b(f"{seed}:{layer}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _all_sum(t: Tensor, grad: bool = True) -> Tensor:
    """Sum over processes; differentiable (its backward sums the gradients back) when ``grad``."""
    import torch.distributed as dist

    if grad:
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(t, op=dist.ReduceOp.SUM)
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _all_sum_int(value: int) -> Tensor:
    import torch.distributed as dist

    t = torch.tensor(float(value), device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
