"""``train.fsdp``: shard the transformer over the processes with accelerate's FSDP2 plugin instead of DDP.

Why: under DDP every GPU holds the whole frozen base (24 GB in bf16). FSDP2 (``fully_shard``) gives each
transformer block its own group, so each process keeps 1/N of every block (the frozen base too) and
all-gathers one block at a time for its forward and backward. The root group holds the rest: the
InstructMoLE module (router, gates, experts, called from the blocks' Linear hooks) and the base's small
non-block layers; it is gathered once per forward.

What differs from the DDP path, and lives here:

* the plugin: ``fsdp_version=2``, one group per ``FluxTransformerBlock`` / ``FluxSingleTransformerBlock``,
  and a mixed-precision policy that casts nothing: the base stays in its storage dtype and the trainable
  weights stay fp32 masters, exactly as under DDP; accelerate's FSDP2 path applies no autocast, so
  ``autocast_forward`` adds the one DDP gets (the router then runs in fp32 as everywhere else);
* checkpoints: accelerate's ``save_state`` under FSDP writes the *whole* model (the base included) and
  ignores the save hooks, so ``install_state`` makes ``save_state``/``load_state`` write and read only the
  trainable weights (gathered to full tensors, ``model.safetensors``, the file the DDP path writes) and the
  optimizer's full state keyed by parameter name (``optimizer_fsdp.bin``); RNG, scheduler and our custom
  state still go through accelerate. Every process gathers (collectives), process 0 writes;
* the exported adapter: ``snapshot`` gathers the trainable weights into a CPU copy that exports exactly
  as ``TrainingModel.export`` does;
* routing outside the forward (``_step_routing``): ``root_unsharded`` gathers the root group first.

accelerate selects FSDP only on accelerators: on a CPU-only machine a multi-process run is MULTI_CPU (gloo)
and the plugin is ignored. ``FORCE_CPU_ENV`` is a switch for tests: it sets accelerate's state to FSDP on
such a run, so the trainer's FSDP code paths (``fully_shard`` works on the CPU with gloo in torch 2.13) are
exercised without a GPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from instructmole import Adapter, InstructMoLE

from .errors import CheckpointError, TrainingError

__all__ = [
    "BLOCK_CLASSES",
    "FORCE_CPU_ENV",
    "OPTIMIZER_FILE",
    "Snapshot",
    "autocast_forward",
    "check_launch",
    "full_trainable_state",
    "install_state",
    "is_sharded",
    "load_full_trainable_state",
    "plugin",
    "root_unsharded",
    "snapshot",
]

BLOCK_CLASSES = ("FluxTransformerBlock", "FluxSingleTransformerBlock")  # one FSDP group each
FORCE_CPU_ENV = "INSTRUCTMOLE_FSDP_ON_CPU"  # tests only: FSDP on a gloo CPU group (module docstring)
OPTIMIZER_FILE = "optimizer_fsdp.bin"  # not accelerate's optimizer.bin: keyed by name, not by index
MODEL_FILE = "model.safetensors"


def plugin() -> Any:
    """accelerate's FSDP2 plugin as the trainer uses it (module docstring); an accelerate config's
    ``fsdp_config`` is not read: these values replace it."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=list(BLOCK_CLASSES),
        reshard_after_forward=True,  # a block's gathered weights are freed after its forward
        mixed_precision_policy=MixedPrecisionPolicy(),  # casts nothing: bf16 base, fp32 trainable masters
        cpu_offload=False,
        activation_checkpointing=False,  # model.gradient_checkpointing uses diffusers' own, per block
        cpu_ram_efficient_loading=False,  # every process loads the base (to CPU RAM); each keeps its shards
        state_dict_type="FULL_STATE_DICT",  # unused: install_state writes the checkpoints
    )


def check_launch(accelerator: Any, fsdp: bool) -> None:
    """Refuse a launch whose sharding differs from ``train.fsdp`` (one sentence each), after the
    ``FORCE_CPU_ENV`` test switch has been applied."""
    from accelerate.utils import DistributedType

    if fsdp and os.environ.get(FORCE_CPU_ENV) == "1" and accelerator.distributed_type == DistributedType.MULTI_CPU:
        accelerator.state.distributed_type = DistributedType.FSDP  # the shared state: what prepare reads
        accelerator.state.fsdp_plugin = plugin()
    sharded = accelerator.distributed_type == DistributedType.FSDP
    if fsdp and not sharded:
        raise TrainingError(
            f"train.fsdp=true but accelerate runs {accelerator.distributed_type} with {accelerator.num_processes} "
            "process(es); FSDP needs 2 or more CUDA processes (accelerate launch --config_file fsdp.yaml, "
            "docs/training.md)"
        )
    if sharded and not fsdp:
        raise TrainingError(
            "the launcher asks for FSDP (an accelerate config with distributed_type: FSDP) but train.fsdp is false; "
            "set train.fsdp=true, which also makes the checkpoints hold only the trainable weights"
        )


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def autocast_forward(accelerator: Any, model: nn.Module) -> None:
    """Run the prepared model's forward under accelerate's autocast, as its DDP path does (its FSDP2 path
    does not: it expects the mixed-precision policy to cast, which ours does not)."""
    if not accelerator.native_amp:
        return
    from accelerate.utils import convert_outputs_to_fp32
    from accelerate.utils.modeling import get_mixed_precision_context_manager

    context = get_mixed_precision_context_manager(accelerator.native_amp, accelerator.autocast_handler)
    model.forward = convert_outputs_to_fp32(context(model.forward))


def _full(t: Tensor) -> Tensor:
    """The whole tensor of a sharded parameter (a collective: every process must call it in turn)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


@contextlib.contextmanager
def root_unsharded(model: nn.Module) -> Iterator[None]:
    """The root group (InstructMoLE's router, gates and experts) gathered for the block: routing outside
    the forward reads them. A no-op without FSDP. Collective: every process enters it."""
    if not is_sharded(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def full_trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """Every trainable weight whole, on the CPU, in every process (one all-gather per weight, in the same
    order everywhere); the frozen base is never gathered."""
    return {n: _full(p.detach()).cpu() for n, p in model.named_parameters() if p.requires_grad}


def load_full_trainable_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Put whole trainable weights (``full_trainable_state``'s) into the shards of this process."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    own = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != set(own):
        first = sorted(set(own) ^ set(state))[0]
        raise CheckpointError(
            f"the checkpoint's trainable weights do not match this run's adapter (first difference: '{first}'); "
            "resume with the config the checkpoint was made with"
        )
    with torch.no_grad():
        for name, p in own.items():
            value = state[name].to(p.dtype)
            if isinstance(p, DTensor):
                p.to_local().copy_(distribute_tensor(value.to(p.device), p.device_mesh, p.placements).to_local())
            else:
                p.copy_(value)


class Snapshot:
    """The trainable weights of a sharded ``TrainingModel``, whole and on the CPU: ``export`` gives the
    adapter ``TrainingModel.export`` would (same keys, same values), for process 0 to save."""

    def __init__(self, model: nn.Module) -> None:
        full = {n: _full(p.detach()).cpu() for n, p in model.mole.named_parameters(prefix="mole")}
        trainable = full_trainable_state(model)
        buffers = {f"mole.{n}": b.detach().cpu() for n, b in model.mole.named_buffers()}
        with torch.device("meta"):  # no initialisation, no draw from the global generator
            self.mole = InstructMoLE(model.mole.config)
        own = {**full, **buffers}
        self.mole.load_state_dict({k.removeprefix("mole."): v for k, v in own.items()}, assign=True)
        self.lora: dict[str, Tensor] = {}
        for name, value in trainable.items():  # peft's own names, less its adapter name ("default")
            if ".lora_" in name:
                self.lora[name.replace(".default.", ".")] = value
        for module in model.lora_modules:
            self.lora[f"transformer.{module}.alpha"] = torch.tensor(float(model.lora_alpha))

    def export(self, metadata: dict[str, str]) -> Adapter:
        return Adapter(self.mole, dict(self.lora), metadata)


def snapshot(model: nn.Module) -> Snapshot:
    """``Snapshot`` of ``model``: a collective, every process calls it."""
    return Snapshot(model)


@contextlib.contextmanager
def _hidden(accelerator: Any) -> Iterator[None]:
    """accelerate's ``save_state``/``load_state`` without the model and optimizer, which ``install_state``
    handles (its FSDP branch would write and read the whole model, base included)."""
    models, optimizers = accelerator._models, accelerator._optimizers
    accelerator._models, accelerator._optimizers = [], []
    try:
        yield
    finally:
        accelerator._models, accelerator._optimizers = models, optimizers


def install_state(accelerator: Any, model: nn.Module, optimizer: Any) -> None:
    """Make this accelerator's ``save_state``/``load_state`` carry the trainable weights and the optimizer of
    the sharded ``model`` (module docstring), and leave the rest (RNG, scheduler, custom objects) to accelerate."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    save, load = accelerator.save_state, accelerator.load_state

    def save_state(output_dir: str, **kwargs: Any) -> Any:
        weights = full_trainable_state(model)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole, on process 0 only
        optim = get_optimizer_state_dict(model, optimizer, options=options)
        if accelerator.is_main_process:
            folder = Path(output_dir)
            folder.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / MODEL_FILE))
            torch.save(optim, folder / OPTIMIZER_FILE)
        with _hidden(accelerator):
            return save(output_dir, **kwargs)

    def load_state(input_dir: str, **kwargs: Any) -> Any:
        folder = Path(input_dir)
        for name in (MODEL_FILE, OPTIMIZER_FILE):
            if not (folder / name).is_file():
                raise CheckpointError(
                    f"{input_dir} holds no {name}; it was not written by a train.fsdp=true run, which a resume "
                    "with train.fsdp=true needs"
                )
        with _hidden(accelerator):
            result = load(input_dir, **kwargs)
        load_full_trainable_state(model, load_file(str(folder / MODEL_FILE)))
        optim = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        set_optimizer_state_dict(model, optimizer, optim, options=StateDictOptions(full_state_dict=True))
        return result

    accelerator.save_state, accelerator.load_state = save_state, load_state
