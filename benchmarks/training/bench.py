"""The bench: one frozen transformer set up by the trainer's code, the variants on it, and one step.

Why one object: the variants share the transformer (each installs its own adapter on it), so
which variant is installed, where its state lives (on CUDA the others' is parked on the CPU, so a
peak is the variant's own) and how a step is taken (the trainer's loop: forward under autocast,
backward, clip, AdamW) are decided in one place for all of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from instructmole import MoLEConfig
from training.modules import build_mole_config, setup_transformer

from .reference_way import ReferenceWay
from .setting import (
    FP8_NAME,
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
        seed: int = 0,
        variants: Sequence[str] = VARIANTS,
    ) -> None:
        self.shape, self.device, self.seed = shape, device, seed
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.autocast = device.type == "cuda"  # bf16 autocast on CUDA (the trainer's mixed_precision=bf16)
        self.config = trainer_config(shape, self.dtype, fp8_base)
        self.transformer = build_transformer(shape, device, self.dtype, seed)
        self.mole_config: MoLEConfig = build_mole_config(self.config, self.transformer)
        self.lora_modules = setup_transformer(self.transformer, self.config, self.mole_config)
        self.transformer.train()
        self.variants: list[TrainVariant] = []
        for name in variants:
            if name == "ours":
                self.variants.append(Ours(self, FP8_NAME if fp8_base else "ours"))
            elif name == "plain LoRA":
                self.variants.append(PlainLoRA(self))
            elif name == "reference way":
                self.variants.append(ReferenceWay(self))
            else:
                raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")
        self._installed: TrainVariant | None = None
        if device.type == "cuda":
            for v in self.variants:
                v.move_state(torch.device("cpu"))

    def variant(self, name: str) -> TrainVariant:
        return next(v for v in self.variants if v.name == name)

    def frozen_bytes(self) -> int:
        """The frozen base (every transformer weight and buffer that is no adapter's)."""
        params = [p for n, p in self.transformer.named_parameters() if "lora_" not in n]
        return tensor_bytes(params) + tensor_bytes(list(self.transformer.buffers()))

    def inputs(self, side: int) -> StepInputs:
        # With autocast the trainer feeds fp32 inputs (training/loop.py: input_dtype).
        dtype = torch.float32 if self.autocast else self.dtype
        return make_inputs(self.shape, side, self.device, dtype, self.seed + 1)

    @contextlib.contextmanager
    def installed(self, variant: TrainVariant) -> Iterator[TrainVariant]:
        if self.device.type == "cuda":
            variant.move_state(self.device)
        variant.install()
        self._installed = variant
        try:
            yield variant
        finally:
            variant.uninstall()
            self._installed = None
            if self.device.type == "cuda":
                variant.move_state(torch.device("cpu"))

    def forward_losses(self, variant: TrainVariant, x: StepInputs) -> dict[str, Tensor]:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return variant.losses(x)

    def step(self, variant: TrainVariant, x: StepInputs) -> dict[str, float]:
        """One training step as the trainer's loop takes it: forward, backward, clip, AdamW, zero grads."""
        out = self.forward_losses(variant, x)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(variant.params, self.config.train.max_grad_norm)
        variant.optimizer.step()
        variant.optimizer.zero_grad(set_to_none=True)
        return {k: float(v.detach().float().mean()) for k, v in out.items()}
