"""What is trained, and how the frozen FLUX transformer is set up around it.

The base transformer is frozen; the trainable parts are the InstructMoLE module (router, gates,
experts) and, optionally, a plain LoRA injected by peft. Trainable weights are kept in fp32 even
when the base runs in bf16 under autocast: the reference trains them in pure bf16, where an
update smaller than 2⁻⁸ of a weight is rounded away, and at lr 1e-4 with Adam most updates of
a well-trained expert are that small. fp32 masters cost 4 bytes per adapter parameter (about
1 GB for the reference adapter with its r=256 LoRA) and keep every step's update.

The frozen base, on the other hand, may be stored smaller (``model.quantize_base``): every frozen
Linear, also those carrying experts or the LoRA, keeps its weight as fp8, int8 or NF4 and dequantises
it per layer (``training/quantize.py``); the trainable terms are added to that layer's output as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from instructmole import Adapter, InstructMoLE, LayerSpec, MoLEConfig, attach
from instructmole.runtime import StepRouting

from .config import TrainConfig
from .errors import ConfigError, ModelLoadError
from .families import Recipe, recipe_of, recipe_of_model
from .quantize import quantize_base
from .recipe import flow_loss

__all__ = ["TrainingModel", "build_mole_config", "family_recipe", "setup_transformer"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def family_recipe(config: TrainConfig, transformer: nn.Module) -> Recipe:
    """The recipe of the family ``config`` trains on ``transformer`` (``families.recipe_of_model``)."""
    return recipe_of_model(transformer, getattr(config.model, "family", None))


def build_mole_config(config: TrainConfig, transformer: nn.Module, recipe: Recipe | None = None) -> MoLEConfig:
    """The adapter's ``MoLEConfig``: targets resolved against the transformer, widths read from it, the
    family (``base_model``) and its router pool from ``recipe`` (default: ``family_recipe``)."""
    a = config.adapter
    recipe = recipe if recipe is not None else family_recipe(config, transformer)
    names: list[str] = []
    for target in a.targets:
        names += recipe.mole_targets(transformer) if target == "reference" else [target]
    specs = []
    for name in dict.fromkeys(names):  # keep order, drop repeats
        try:
            module = transformer.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"adapter.targets: the transformer has no layer '{name}'") from None
        if not isinstance(module, nn.Linear):
            raise ConfigError(f"adapter.targets: '{name}' is a {type(module).__name__}, not a Linear")
        routing = "token" if name in a.token_routed else "instruction"
        specs.append(LayerSpec(name, module.in_features, module.out_features, routing))
    unknown = sorted(set(a.token_routed) - set(names))
    if unknown:
        raise ConfigError(f"adapter.token_routed: '{unknown[0]}' is not one of adapter.targets")
    return MoLEConfig(
        layers=tuple(specs),
        text_dim=recipe.text_dim(transformer),
        router_dim=recipe.router_dim(transformer, a.router_dim),
        **a.mole_settings(),
        base_model=recipe.key,
        router_pool=recipe.arch.router_pool,
    )


def _lora_modules(transformer: nn.Module, suffixes: list[str]) -> list[str]:
    """Names of the Linears peft will wrap: those whose name is or ends with ``.<suffix>``."""
    return [
        name
        for name, module in transformer.named_modules()
        if isinstance(module, nn.Linear) and any(name == s or name.endswith("." + s) for s in suffixes)
    ]


def setup_transformer(
    transformer: nn.Module, config: TrainConfig, mole: MoLEConfig, device: torch.device | None = None
) -> list[str]:
    """Freeze the base, add the plain LoRA (peft), the memory savers; returns the LoRA's module names.

    ``device``: where ``model.quantize_base`` quantizes (one layer at a time) and leaves the quantized
    weights; default where they are. The trainer passes its accelerator's: quantizing a 12 B base on the
    GPU takes seconds, and the base never has to fit the GPU unquantized."""
    transformer.requires_grad_(False)
    lora = config.adapter.lora
    lora_modules: list[str] = []
    if lora.rank > 0:
        targets = recipe_of(mole.base_model).lora_targets(lora.targets)  # "reference": the family's
        lora_modules = _lora_modules(transformer, targets)
        if not lora_modules:
            raise ConfigError(f"adapter.lora.targets {lora.targets} match no Linear of the transformer")
        overlap = sorted(set(lora_modules) & set(mole.layer_names))
        if overlap:
            raise ConfigError(
                f"'{overlap[0]}' is both a MoLE layer (adapter.targets) and a plain-LoRA target "
                "(adapter.lora.targets); remove it from one of them"
            )
        try:
            from peft import LoraConfig
        except ImportError:
            raise ModelLoadError("adapter.lora.rank > 0 needs peft: pip install 'peft>=0.13'") from None
        transformer.add_adapter(
            LoraConfig(
                r=lora.rank,
                lora_alpha=lora.alpha if lora.alpha is not None else lora.rank,
                init_lora_weights="gaussian" if lora.init == "gaussian" else True,
                target_modules=lora_modules,  # full names: peft matches them exactly
            )
        )
        for name, p in transformer.named_parameters():  # fp32 masters (module docstring)
            if "lora_" in name:
                p.data = p.data.float()
                p.requires_grad_(True)
    # After peft: its base_layers are quantized like every other frozen Linear, its lora_A/B (trainable) not.
    quantize_base(transformer, config.model.quantize_base, device)
    if config.model.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return lora_modules


class TrainingModel(nn.Module):
    """What accelerate prepares (and DDP wraps): the frozen transformer carrying the trainable parts.

    Its forward is one training forward: the adapter routes every row from its instruction
    (through the core runtime's hooks), the transformer predicts, and the per-sample flow loss on
    the target tokens and the auxiliary losses come back.
    """

    def __init__(
        self,
        transformer: nn.Module,
        mole: InstructMoLE,
        lora_modules: list[str],
        lora_alpha: float,
        recipe: Recipe | None = None,
    ) -> None:
        super().__init__()
        self.transformer, self.mole = transformer, mole
        self.lora_modules, self.lora_alpha = lora_modules, lora_alpha
        # How the family's transformer is called (default: the adapter's own family's recipe).
        self.recipe = recipe if recipe is not None else recipe_of(mole.config.base_model)
        self.handle = attach(transformer, Adapter(mole), training=True)

    def forward(
        self,
        hidden_states: Tensor,
        text: Tensor,
        pooled: Tensor,
        sigma: Tensor,
        img_ids: Tensor,
        txt_ids: Tensor,
        guidance: Tensor,
        target: Tensor,
        seeds: Tensor,
        aux_reduction: str = "sum",
        distributed: bool = False,
        step_routing: StepRouting | None = None,
        weight: Tensor | None = None,
        text_mask: Tensor | None = None,
        route_text: Tensor | None = None,
        route_mask: Tensor | None = None,
        img_shapes: list | None = None,
    ) -> dict[str, Tensor]:
        """``step_routing``: the optimizer step's instruction routing, for its load balancing
        (``StepRouting``; None: this forward's own). ``weight`` ``[b, target tokens]``: the masked
        loss's per-token weights (``flow_loss``; all ones give bit for bit the unweighted loss).

        The chat-LLM families (``families.py``): ``text_mask`` the conditioning's padding mask
        (Qwen-Image), ``img_shapes`` its image grids; ``route_mask`` the instruction's tokens, with
        which the router reads ``route_text`` (default: ``text``) through ``set_signal`` instead of
        the forward's own conditioning (which holds the template)."""
        self.handle.seeds = seeds
        signal = route_mask is not None and bool(self.mole.config.instruction_layers)  # token-routed only: none
        if signal:
            self.handle.set_signal(text if route_text is None else route_text, None, route_mask)
        try:
            out = self.transformer(
                **self.recipe.transformer_kwargs(
                    hidden_states=hidden_states,
                    text=text,
                    pooled=pooled,
                    sigma=sigma,
                    img_ids=img_ids,
                    txt_ids=txt_ids,
                    guidance=guidance,
                    text_mask=text_mask,
                    img_shapes=img_shapes,
                )
            )[0]
        finally:
            if signal:
                self.handle.set_signal(None)
        flow = flow_loss(out, target, weight)
        aux = self.handle.runtime.aux_losses(aux_reduction, distributed=distributed, step=step_routing)
        return {"flow": flow, **vars(aux)}

    def runtime_layers(self, layers: set[str] | None) -> None:
        """Which MoLE layers add their term (None: all; an empty set: the base model, for evaluation)."""
        self.handle.runtime.layers = set(self.mole.config.layer_names) if layers is None else set(layers)

    @contextlib.contextmanager
    def lora_disabled(self) -> Iterator[None]:
        """The plain LoRA off for the block (evaluation of the base model)."""
        if not self.lora_modules:
            yield
            return
        self.transformer.disable_adapters()
        try:
            yield
        finally:
            self.transformer.enable_adapters()

    # ---- trainable state ----------------------------------------------------------------------

    def trainable_state(self) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, Tensor]) -> None:
        own = dict(self.named_parameters())
        expected = {n for n, p in own.items() if p.requires_grad}
        if set(state) != expected:
            missing = sorted(expected - set(state)) or sorted(set(state) - expected)
            raise ModelLoadError(
                f"the checkpoint's trainable weights do not match this run's adapter (first difference: "
                f"'{missing[0]}'); resume with the config the checkpoint was made with"
            )
        with torch.no_grad():
            for name, value in state.items():
                own[name].copy_(value)

    def parameter_groups(self, lr: float, gate_lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Two groups: the gates at their own learning rate, everything else trainable at ``lr``."""
        gates, rest = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (gates if name.startswith("mole.experts.") and name.endswith(".gate.weight") else rest).append(p)
        return [
            {"params": rest, "lr": lr, "weight_decay": weight_decay, "name": "adapter"},
            {"params": gates, "lr": gate_lr, "weight_decay": weight_decay, "name": "gates"},
        ]

    def lora_tensors(self) -> dict[str, Tensor]:
        """The plain LoRA in the adapter file's key names (``transformer.<module>.lora_A.weight``, …)."""
        if not self.lora_modules:
            return {}
        from peft.utils import get_peft_model_state_dict

        out = {f"transformer.{k}": v.detach() for k, v in get_peft_model_state_dict(self.transformer).items()}
        for name in self.lora_modules:
            out[f"transformer.{name}.alpha"] = torch.tensor(float(self.lora_alpha))
        return out

    def export(self, metadata: dict[str, str]) -> Adapter:
        """An ``Adapter`` of the current weights (shares the tensors; save it with a dtype)."""
        return Adapter(self.mole, self.lora_tensors(), metadata)
