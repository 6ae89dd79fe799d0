"""Block swap (``model.block_swap``): the frozen weights of the transformer's last N blocks live in
CPU memory and visit the compute device only while their block runs, in the forward and again in
the backward.

Why: FLUX.1 Kontext's transformer is 24 GB in bf16, 57 blocks (19 double + 38 single) of about 0.4
GB each. Keeping N of them off the GPU saves about N × 0.4 GB for the price of copying each of them
twice per step (forward, backward) over PCIe, which a side stream overlaps with the previous block's
compute. The prior art is musubi-tuner's ``ModelOffloader`` (``--blocks_to_swap``) and SimpleTuner's
block swap; this is its own design, described below.

What moves: every frozen tensor of a swapped block (parameters with ``requires_grad=False`` and all
buffers, e.g. a quantized base's int8/fp8 data and scales, ``training/quantize.py``). Trainable
parameters never move and are never replaced: the optimizer holds them (peft's ``lora_A`` /
``lora_B`` inside a swapped Linear stay where they are; the experts live in ``InstructMoLE``, not in
the transformer, and reach the Linears through ``instructmole.attach``'s hooks).

How, per storage (not per tensor, so views and tied tensors stay tied): the bytes are copied once
into a *master* on the CPU (pinned when the compute device is CUDA, so the copies can be
asynchronous), and every tensor that used the storage is re-pointed (``tensor.data = ...``, the
same Parameter object) at a fresh storage on the compute device. That storage is the "compute copy":
*released* means ``storage.resize_(0)`` (its memory goes back to the allocator), *loaded* means
``resize_(nbytes)`` and a copy from the master. The tensor objects, their shapes, strides, dtype and
device never change; only the bytes behind them come and go.

What autograd keeps, and why the memory is still freed: a Linear's forward saves its weight (or a
view ``weight.t()``) for the backward, where the input's gradient needs it; RMSNorm saves its scale.
Those saved tensors hold the *storage object*, not a copy. Releasing resizes that very storage to 0
bytes, so between the forward and the backward the weights take no memory although autograd still
references them; the backward of the block then finds them again because the block is loaded into
the same storage before its first backward node runs. The copies go through ``.data``, which has its
own version counter, so autograd's "modified by an inplace operation" check is not tripped (the
bytes are bit for bit the same). Two caveats: a weight that the forward *casts* (an fp32 base under
bf16 autocast) is saved as the cast copy, which stays alive until the backward (the trainer's base
is stored in its compute dtype, where autocast casts nothing); and diffusers' own weight hooks
(layerwise casting, group offload) replace ``.data`` themselves and are refused.

When (module hooks; blocks run in the order ``transformer_blocks.*``, ``single_transformer_blocks.*``):

* forward: block i's pre-hook makes sure block i is loaded (waits for its copy) and starts the copy
  of block i+1 (on the side stream); block i's post-hook releases block i. The block before the
  first swapped one (or the transformer's pre-hook) starts the first copy. After the transformer's
  forward nothing swapped is resident.
* backward: the post-hooks put a gradient hook on each block's outputs; it fires when the gradient
  of block j's output is complete, i.e. just before block j's first backward node runs, and then
  loads block j, releases every swapped block after j (their backward is over: the engine runs the
  nodes of later blocks first, they have the higher sequence numbers) and starts the copy of block
  j-1. A hook on the transformer's output starts the copy of the last block when the backward
  begins; a callback at the end of each backward releases whatever is still loaded.
* gradient checkpointing (diffusers' default, ``use_reentrant=False``): the forward saves no weights
  at all; in the backward the block's recompute runs its forward hooks again *inside* the backward,
  where the pre-hook finds the block loaded already and the post-hook keeps it (it is released by
  the next block's backward, as above). With the reentrant variant it also works, with one extra
  copy per block (the recompute releases, the nested backward loads again).

CUDA: the copy runs on a side stream after ``side.wait_stream(compute)`` (its bytes may reuse memory
that queued compute kernels still read); the compute stream waits on the copy's event before the
block runs or is released; memory is always allocated on the compute stream. On the CPU the same
path runs with synchronous copies into separate storages, which the tests use.

Several processes (DDP): each process swaps its own copy onto its own device; the host then holds
one master per process. Swapped tensors are frozen, so DDP must ignore them (the trainer already
ignores every frozen parameter; buffers in swapped blocks must be ignored too).

Order of set-up: after the base is frozen, quantized and given its LoRA (what is frozen then moves),
before ``accelerator.prepare`` (which moves the rest of the model to the device: a swapped tensor
is already there, with 0 bytes, and ``.to`` leaves it alone). Nothing may read a swapped tensor's
data outside its block's forward (``.to(dtype)``, ``state_dict`` serialisation): call ``remove()``
first, which loads everything back and removes the hooks.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from instructmole.validation import checked_int

from .errors import ConfigError, TrainingError

__all__ = ["BlockSwap", "BlockSwapError", "transformer_blocks"]

_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")  # in the order the forward runs them


class BlockSwapError(TrainingError):
    """The transformer's blocks hold something block swap cannot move (it says what)."""


def transformer_blocks(transformer: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` in the order the forward runs them: double blocks, then single blocks."""
    blocks: list[tuple[str, nn.Module]] = []
    for attr in _BLOCK_LISTS:
        for i, block in enumerate(getattr(transformer, attr, None) or ()):
            blocks.append((f"{attr}.{i}", block))
    if not blocks:
        raise BlockSwapError(
            f"block swap needs a diffusers Flux transformer (with {' and '.join(_BLOCK_LISTS)}); "
            f"got a {type(transformer).__name__} without them"
        )
    return blocks


def _bytes(storage: torch.UntypedStorage) -> Tensor:
    """A uint8 tensor over all of ``storage``: copies of whole storages go through it."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def _tensors(obj: Any) -> Iterator[Tensor]:
    """Every tensor in a nest of tuples, lists and dicts (a block's inputs and outputs)."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, tuple | list):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _in_backward() -> bool:
    """True while an autograd backward runs on this thread (a checkpointed block's recompute)."""
    return torch._C._current_graph_task_id() != -1


def _storage_key(t: Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


@dataclass(eq=False)
class _Storage:
    compute: torch.UntypedStorage  # on the compute device; 0 bytes while released
    master: Tensor  # uint8 on the CPU (pinned for CUDA): the bytes, never modified
    nbytes: int


@dataclass(eq=False)
class _Block:
    name: str
    index: int  # position in the forward
    storages: list[_Storage]
    state: str = "off"  # "off" (released) | "loading" (copy queued on the side stream) | "on"
    event: Any = None  # CUDA: the copy's completion event while "loading"

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.storages)


class BlockSwap:
    """Keep the frozen weights of the transformer's last ``count`` blocks on the CPU (module docstring).

    ``device``: where the blocks compute (the accelerator's device); ``offload_device``: where the
    weights wait (only the CPU). ``prefetch``: copy the next block while the current one runs
    (False: each block is copied only when it starts, which the tests use to show that nothing else
    is resident). ``count=0`` swaps nothing. ``remove()`` (or leaving a ``with`` block) loads every
    weight back onto ``device`` (bit for bit) and removes the hooks.
    """

    def __init__(
        self,
        transformer: nn.Module,
        count: int,
        device: torch.device | str,
        offload_device: torch.device | str = "cpu",
        *,
        prefetch: bool = True,
    ) -> None:
        blocks = transformer_blocks(transformer)
        count = checked_int("model.block_swap", count, {"min": 0, "max": len(blocks)}, ConfigError)
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if torch.device(offload_device).type != "cpu":
            raise BlockSwapError(f"block swap offloads to the CPU; got offload_device={offload_device}")
        self.transformer, self.device, self.prefetch = transformer, device, prefetch
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._callback_task: int | None = None  # the backward whose end-of-backward callback is queued
        self._removed = False
        self._count_all = len(blocks)
        first = len(blocks) - count
        chosen = blocks[first:]
        _check_movable(chosen)
        self._blocks: dict[int, _Block] = {}
        swapped = _frozen_tensors(chosen)
        outside = {_storage_key(t) for t in _all_tensors(transformer) if id(t) not in swapped.ids and t.numel()}
        for index, (name, _block) in enumerate(chosen, start=first):
            self._blocks[index] = _Block(name, index, self._offload(name, swapped.by_block[name], outside))
        if not self._blocks:
            return
        self._hooks.append(transformer.register_forward_pre_hook(self._transformer_pre))
        self._hooks.append(transformer.register_forward_hook(self._transformer_post))
        for index, (_name, block) in enumerate(blocks[max(first - 1, 0) :], start=max(first - 1, 0)):
            self._hooks.append(block.register_forward_pre_hook(functools.partial(self._block_pre, index)))
            self._hooks.append(
                block.register_forward_hook(functools.partial(self._block_post, index), with_kwargs=True)
            )

    # ---- set-up ---------------------------------------------------------------------------------

    def _offload(self, name: str, tensors: list[Tensor], outside: set[tuple[str, int]]) -> list[_Storage]:
        """Copy the bytes of each storage behind ``tensors`` to a CPU master; point the tensors at a
        fresh, released storage on the compute device."""
        groups: dict[tuple[str, int], list[Tensor]] = {}
        for t in tensors:
            groups.setdefault(_storage_key(t), []).append(t)
        pin = self.device.type == "cuda"
        out = []
        for key, group in groups.items():
            if key in outside:
                raise BlockSwapError(
                    f"a frozen tensor of {name} shares its memory with a tensor outside the swapped blocks "
                    "(tied weights?); block swap cannot take it off the device"
                )
            original = group[0].untyped_storage()
            nbytes = original.nbytes()
            master = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
            master.copy_(_bytes(original))
            compute = torch.UntypedStorage(nbytes, device=self.device)
            with torch.no_grad():
                for t in group:  # the same tensor objects: only the storage behind them changes
                    t.data = torch.empty(0, dtype=t.dtype, device=self.device).set_(
                        compute, t.storage_offset(), t.size(), t.stride()
                    )
            compute.resize_(0)
            out.append(_Storage(compute, master, nbytes))
        return out

    # ---- what the tests and the log read ---------------------------------------------------------

    @property
    def blocks(self) -> list[str]:
        """Names of the swapped blocks, in forward order."""
        return [b.name for b in self._blocks.values()]

    @property
    def swapped_bytes(self) -> int:
        """Bytes of frozen weights kept off the compute device between uses."""
        return sum(b.nbytes for b in self._blocks.values())

    def resident(self) -> list[str]:
        """Names of the swapped blocks whose weights are on the compute device now (or being copied)."""
        return [b.name for b in self._blocks.values() if b.state != "off"]

    # ---- moving bytes -----------------------------------------------------------------------------

    def _compute_stream(self) -> Any:
        return torch.cuda.current_stream(self.device)

    def _load(self, block: _Block, wait: bool) -> None:
        """Bring ``block``'s weights onto the compute device (on the side stream for CUDA); ``wait``:
        make the compute stream wait for them (the block is about to run)."""
        if block.state == "off":
            for s in block.storages:  # allocated on the compute stream: see _release
                s.compute.resize_(s.nbytes)
            if self._stream is None:
                for s in block.storages:
                    _bytes(s.compute).copy_(s.master)
                block.state = "on"
            else:
                # The new bytes may be memory that kernels queued on the compute stream still read
                # (a block released a moment ago): the copy starts after them.
                self._stream.wait_stream(self._compute_stream())
                with torch.cuda.stream(self._stream):
                    for s in block.storages:
                        _bytes(s.compute).copy_(s.master, non_blocking=True)
                    block.event = torch.cuda.Event()
                    block.event.record(self._stream)
                block.state = "loading"
        if wait and block.state == "loading":
            self._compute_stream().wait_event(block.event)
            block.state, block.event = "on", None

    def _release(self, block: _Block) -> None:
        """Give ``block``'s compute copy back to the allocator. Its memory was allocated on the
        compute stream, so the allocator reuses it only for work queued after the kernels that read
        it; a copy still in flight is waited for first."""
        if block.state == "off":
            return
        if block.state == "loading":
            self._compute_stream().wait_event(block.event)
        for s in block.storages:
            s.compute.resize_(0)
        block.state, block.event = "off", None

    # ---- hooks ----------------------------------------------------------------------------------

    def _transformer_pre(self, _module: nn.Module, _args: tuple) -> None:
        first = self._blocks.get(0)
        if first is not None and self.prefetch and not _in_backward():
            self._load(first, wait=False)

    def _transformer_post(self, _module: nn.Module, _args: tuple, output: Any) -> None:
        if _in_backward():
            return
        if torch.is_grad_enabled():  # the backward begins here: start copying the last block
            for t in _tensors(output):
                if t.requires_grad:
                    t.register_hook(functools.partial(self._backward_reached, self._count_all))
        for block in self._blocks.values():  # a prefetched block that did not run
            self._release(block)

    def _block_pre(self, index: int, _module: nn.Module, _args: tuple) -> None:
        block = self._blocks.get(index)
        if block is not None:
            self._load(block, wait=True)
        following = self._blocks.get(index + 1)
        if following is not None and self.prefetch and not _in_backward():
            self._load(following, wait=False)

    def _block_post(self, index: int, _module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        recompute = _in_backward()  # gradient checkpointing: the backward of this block comes next
        if torch.is_grad_enabled():
            inputs = {id(t) for t in _tensors((args, kwargs))}
            for t in _tensors(output):  # an input passed through is no sign of this block's backward
                if t.requires_grad and id(t) not in inputs:
                    t.register_hook(functools.partial(self._backward_reached, index))
        block = self._blocks.get(index)
        if block is not None and not recompute:
            self._release(block)

    def _backward_reached(self, index: int, _grad: Tensor) -> None:
        """The gradient of block ``index``'s output is complete: its backward is about to run."""
        if self._removed:
            return
        task = torch._C._current_graph_task_id()
        if self._callback_task != task:
            self._callback_task = task
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
        for block in self._blocks.values():
            if block.index > index:
                self._release(block)
        block = self._blocks.get(index)
        if block is not None:
            self._load(block, wait=True)
        previous = self._blocks.get(index - 1)
        if previous is not None and self.prefetch:
            self._load(previous, wait=False)

    def _end_of_backward(self) -> None:
        self._callback_task = None
        if self._removed:
            return
        for block in self._blocks.values():
            self._release(block)

    # ---- lifetime -------------------------------------------------------------------------------

    def remove(self) -> None:
        """Load every swapped weight back onto the compute device (the same bytes, the same tensor
        objects) and remove the hooks; the model is then as ``model.to(device)`` would have left it."""
        if self._removed:
            return
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for block in self._blocks.values():
            self._load(block, wait=True)
        if self._stream is not None:
            self._stream.synchronize()  # the masters are freed next: no copy may still read them
        self._blocks.clear()
        self._removed = True

    def __enter__(self) -> BlockSwap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


@dataclass
class _Frozen:
    by_block: dict[str, list[Tensor]]
    ids: set[int]


def _frozen_tensors(chosen: list[tuple[str, nn.Module]]) -> _Frozen:
    """Each chosen block's frozen parameters and buffers (what moves), each tensor once."""
    by_block: dict[str, list[Tensor]] = {}
    ids: set[int] = set()
    for name, block in chosen:
        found = [p for p in block.parameters() if not p.requires_grad] + list(block.buffers())
        mine = []
        for t in found:
            if id(t) in ids or not t.numel():
                continue
            if type(t) not in (Tensor, nn.Parameter, nn.Buffer):
                raise BlockSwapError(
                    f"{name} holds a {type(t).__name__} (a tensor subclass); block swap moves plain tensors "
                    "only: quantize with model.quantize_base, not a tensor-subclass library"
                )
            if t.device.type == "meta":
                raise BlockSwapError(f"{name} has weights on the meta device: load the model before block swap")
            ids.add(id(t))
            mine.append(t)
        by_block[name] = mine
    return _Frozen(by_block, ids)


def _all_tensors(module: nn.Module) -> Iterator[Tensor]:
    yield from module.parameters()
    yield from module.buffers()


def _check_movable(chosen: list[tuple[str, nn.Module]]) -> None:
    """diffusers' own weight hooks (layerwise casting, group offload) replace ``.data`` in every
    forward, which would swap our compute storage out from under us."""
    for name, block in chosen:
        for sub, module in block.named_modules():
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None and getattr(registry, "hooks", None):
                where = f"{name}.{sub}" if sub else name
                raise BlockSwapError(
                    f"{where} carries diffusers hooks ({', '.join(registry.hooks)}) that move its weights "
                    "themselves; block swap cannot be combined with enable_layerwise_casting or group offload"
                )
