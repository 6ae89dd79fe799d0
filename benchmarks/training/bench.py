"""The bench: one frozen transformer set up by the trainer's code, the variants on it, and one step.

Why one object: the variants share the transformer (each installs its own adapter on it), so
which variant is installed, where its state lives (on CUDA the others' is parked on the CPU, so a
peak is the variant's own) and how a step is taken (the trainer's loop: forward under autocast,
backward, clip, AdamW) are decided in one place for all of them.

A bench may carry a memory option (``options.MemoryOption``): its config then names the option's
``model.quantize_base`` (applied by ``setup_transformer``), ``model.block_swap`` (a
``training.offload.BlockSwap`` made after the variants, as the trainer makes it after its model) and
``train.optimizer``. ``trainer_optimizer``: ``ours`` takes the trainer's own optimizer
(``training.optim.build_optimizer``, fused AdamW) as the memory-options rows do; without it ``ours``
keeps the plain AdamW the comparison gives every variant (other optimizers are always the trainer's).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from instructmole import MoLEConfig
from training.modules import build_mole_config, setup_transformer
from training.offload import BlockSwap

from .options import BASELINE, MemoryOption
from .reference_way import ReferenceWay
from .setting import (
    VARIANTS,
    StepInputs,
    TrainShape,
    build_transformer,
    make_inputs,
    tensor_bytes,
    trainer_config,
)
from .variants import Ours, PlainLoRA, TrainVariant


class TrainingBench:
    """One frozen transformer set up by the trainer's code, and the variants that train on it."""

    def __init__(
        self,
        shape: TrainShape,
        device: torch.device,
        *,
        fp8_base: bool = False,
        option: MemoryOption | None = None,
        seed: int = 0,
        variants: Sequence[str] = VARIANTS,
        trainer_optimizer: bool = False,
    ) -> None:
        self.shape, self.device, self.seed = shape, device, seed
        self.option = option if option is not None else MemoryOption("fp8") if fp8_base else BASELINE
        self.trainer_optimizer = trainer_optimizer
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.autocast = device.type == "cuda"  # bf16 autocast on CUDA (the trainer's mixed_precision=bf16)
        self.config = trainer_config(shape, self.dtype, self.option.overrides(shape))
        self.transformer = build_transformer(shape, device, self.dtype, seed)
        self.mole_config: MoLEConfig = build_mole_config(self.config, self.transformer)
        self.lora_modules = setup_transformer(self.transformer, self.config, self.mole_config)
        self.transformer.train()
        self.variants: list[TrainVariant] = []
        for name in variants:
            if name == "ours":
                self.variants.append(Ours(self, self.option.variant_name, keep_attached=len(variants) == 1))
            elif name == "plain LoRA":
                self.variants.append(PlainLoRA(self))
            elif name == "reference way":
                self.variants.append(ReferenceWay(self))
            else:
                raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")
        self._installed: TrainVariant | None = None
        # CUDA: the variants not being measured wait on the CPU, so each peak is one variant's; alone, it stays.
        self._park = device.type == "cuda" and len(self.variants) > 1
        if self._park:
            for v in self.variants:
                v.move_state(torch.device("cpu"))
        # After the base is frozen, quantized and has its LoRA, and after the variants (the trainer's order).
        count = self.option.swap_count(shape)
        self.swap = BlockSwap(self.transformer, count, device) if count else None

    def variant(self, name: str) -> TrainVariant:
        return next(v for v in self.variants if v.name == name)

    def frozen_bytes(self) -> int:
        """The frozen base kept on the compute device (every transformer weight and buffer that is no
        adapter's, less what block swap keeps in CPU memory between uses)."""
        params = [p for n, p in self.transformer.named_parameters() if "lora_" not in n]
        return tensor_bytes(params) + tensor_bytes(list(self.transformer.buffers())) - self.host_bytes()

    def host_bytes(self) -> int:
        """The frozen weights block swap keeps in CPU memory (its masters; 0 without block swap)."""
        return self.swap.swapped_bytes if self.swap is not None else 0

    def inputs(self, side: int) -> StepInputs:
        # With autocast the trainer feeds fp32 inputs (training/loop.py: input_dtype).
        dtype = torch.float32 if self.autocast else self.dtype
        return make_inputs(self.shape, side, self.device, dtype, self.seed + 1)

    @contextlib.contextmanager
    def installed(self, variant: TrainVariant) -> Iterator[TrainVariant]:
        if self._park:
            variant.move_state(self.device)
        variant.install()
        self._installed = variant
        try:
            yield variant
        finally:
            variant.uninstall()
            self._installed = None
            if self._park:
                variant.move_state(torch.device("cpu"))

    def forward_losses(self, variant: TrainVariant, x: StepInputs) -> dict[str, Tensor]:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return variant.losses(x)

    def step(self, variant: TrainVariant, x: StepInputs) -> dict[str, float]:
        """One training step as the trainer's loop takes it: forward, backward, clip, optimizer, zero grads."""
        out = self.forward_losses(variant, x)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(variant.params, self.config.train.max_grad_norm)
        variant.optimizer.step()
        variant.optimizer.zero_grad(set_to_none=True)
        return {k: float(v.detach().float().mean()) for k, v in out.items()}
