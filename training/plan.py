"""How much GPU memory a training config needs, before anything loads, and what to change to fit a card.

``python -m training --plan config.yaml --gpu-memory 24`` (and the first lines of a run on a GPU).

The estimate runs the trainer's own setup and one training step on *fake tensors*
(``torch._subclasses.FakeTensorMode``: shapes, dtypes and strides without storage), with a dispatch
mode that keeps the bytes of every live storage and their peak, as ``torch.cuda.max_memory_allocated``
counts them. So it follows the trainer's code rather than a formula of it: the transformer built from
its config, the plain LoRA (peft), the experts and router, gradient checkpointing, autocast, the
flow and auxiliary losses, backward, and an AdamW step with its state already allocated (the
steady state from step 2 on). At full size (12 B parameters, 1024² + one reference) this takes about
half a minute on a CPU and no memory worth counting.

What the trace cannot run is added from the shapes: the base stored quantized (fp8 / int8: one byte
per weight plus a float scale per row; nf4: half a byte plus a float per 64 weights) with one layer
dequantized at a time, blocks swapped to the CPU (their weights leave the GPU, two blocks' worth stay
in flight), another optimizer's state (AdamW 8-bit: 2 bytes per parameter; Adafactor: a row and a
column vector per matrix; Prodigy: 4 fp32 tensors per parameter), and the EMA (an fp32 copy of the
trainable weights). What no trace sees is the CUDA context and the caching allocator's slack; a card
is said to fit when the estimate plus ``CONTEXT`` and ``SLACK`` stays within its memory.
"""

from __future__ import annotations

import contextlib
import copy
import json
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from instructmole.errors import InstructMoLEError

from .config import TrainConfig
from .errors import ConfigError

__all__ = [
    "CONTEXT",
    "SLACK",
    "Estimate",
    "LiveBytes",
    "Options",
    "Planner",
    "load_for_plan",
    "plan_for_device",
    "references_of",
    "transformer_config",
]

GIB = 2**30
CONTEXT = int(0.6 * GIB)  # the CUDA context and kernels: outside what PyTorch allocates
SLACK = 0.10  # the caching allocator's fragmentation, on top of the allocated peak
QUANT_BYTES = {"fp8": 1.0, "int8": 1.0, "nf4": 0.5}  # per weight, before the scales
OPTIMIZER_BYTES = {"adamw": 8.0, "prodigy": 16.0}  # per trainable parameter (the others: by shape)


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the storages created under it that are still alive, and their peak.

    A storage is counted once however many views share it, and uncounted when Python frees it
    (``weakref.finalize`` on the storage object, which PyTorch keeps alive as long as the storage)."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: Any = WeakIdKeyDictionary()
        self.now = 0
        self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.now -= nbytes

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self._seen:
            return
        nbytes = storage.nbytes()
        self._seen[storage] = nbytes
        self.now += nbytes
        weakref.finalize(storage, self._free, nbytes)
        self.peak = max(self.peak, self.now)

    def count(self, tensor: torch.Tensor) -> None:
        """Count a tensor made before the mode was entered (a model loaded earlier)."""
        self._track(tensor)

    def reset_peak(self) -> None:
        self.peak = self.now

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for value in tree_leaves(out):
            if isinstance(value, torch.Tensor):
                self._track(value)
        return out


@dataclass(frozen=True)
class Options:
    """The memory options a plan compares (the rest of the config stays as given)."""

    gradient_checkpointing: bool
    quantize_base: str = "none"
    block_swap: int = 0
    optimizer: str = "adamw"

    def describe(self) -> str:
        parts = [f"model.gradient_checkpointing={str(self.gradient_checkpointing).lower()}"]
        parts.append(f"model.quantize_base={self.quantize_base}")
        parts.append(f"model.block_swap={self.block_swap}")
        parts.append(f"train.optimizer={self.optimizer}")
        return " ".join(parts)


@dataclass(frozen=True)
class Estimate:
    """Bytes at the step's peak, by what holds them."""

    options: Options
    base: int  # frozen weights kept on the GPU
    trainable: int  # trainable weights (fp32 masters)
    optimizer: int  # optimizer state
    ema: int  # the EMA copy
    step: int  # everything else at the peak: activations, gradients, workspaces, swap buffers

    @property
    def total(self) -> int:
        return self.base + self.trainable + self.optimizer + self.ema + self.step

    def card_bytes(self) -> int:
        """What a card must have free for it: the allocated peak, the allocator's slack, the context."""
        return int(self.total * (1 + SLACK)) + CONTEXT

    def lines(self) -> list[str]:
        rows = [
            ("frozen base", self.base),
            ("trainable weights", self.trainable),
            ("optimizer state", self.optimizer),
            ("EMA", self.ema),
            ("activations, gradients, workspace", self.step),
        ]
        rows += [("peak allocated", self.total), ("with CUDA context and allocator slack", self.card_bytes())]
        return [f"  {name:<38} {_size(value):>10}" for name, value in rows if value]


def _size(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB else f"{nbytes / 2**20:.1f} MiB"


# ---- the trace ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Trace:
    frozen: int  # bytes of frozen parameters and buffers
    trainable: int
    adamw: int  # AdamW state bytes as allocated
    peak: int  # the step's peak, everything included
    linears: tuple[tuple[str, int, int, int], ...]  # frozen block Linears: (block, numel, out_features, bytes)
    blocks: tuple[str, ...]  # block names in execution order
    trainable_shapes: tuple[tuple[int, ...], ...]


class _Planned:
    """The adapter model of a plan: its fingerprint hashes the gate weights, which fake tensors lack."""

    def fingerprint(self) -> str:
        return "planned"


def transformer_config(config: TrainConfig) -> dict[str, Any]:
    """The transformer's diffusers config: the pretrained folder's, else the shipped Kontext one."""
    from .loading import SHIPPED_CONFIGS

    folder = Path(config.model.pretrained) if config.model.pretrained else SHIPPED_CONFIGS
    path = folder / "transformer" / "config.json"
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.pretrained: cannot read {path} ({err}); give a diffusers FLUX folder") from None
    kind = found.get("_class_name", "FluxTransformer2DModel") if isinstance(found, dict) else None
    family = getattr(config.model, "family", None)
    if kind != "FluxTransformer2DModel" or family not in (None, "flux.1-kontext-dev"):
        given = f" and model.family is {family}" if family else ""
        raise ConfigError(
            f"the memory plan traces FLUX.1 Kontext's transformer, and {path} holds a {kind}{given}; plan a FLUX.1 "
            "Kontext config"
        )
    return found


def _fake_weights(module: nn.Module) -> None:
    """Give every parameter and buffer of ``module`` (on the meta device) a fake CPU tensor of its shape,
    dtype and ``requires_grad``: made under the fake mode, so they count like weights loaded to the GPU."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
        for name, b in list(sub._buffers.items()):
            if b is not None:
                sub._buffers[name] = torch.empty(b.shape, dtype=b.dtype)


def _inputs(config: TrainConfig, tc: dict[str, Any], references: int, batch: int) -> dict[str, torch.Tensor]:
    """One micro-batch at the config's largest bucket: ``resolution²`` pixels a side of 16 px per token."""
    side = max(config.data.resolution // 16, 1)
    target = side * side
    image = target * (1 + references)
    length = config.adapter.text_length
    channels = tc.get("in_channels", 64)
    return {
        "hidden_states": torch.randn(batch, image, channels),
        "text": torch.randn(batch, length, tc["joint_attention_dim"]),
        "pooled": torch.randn(batch, tc["pooled_projection_dim"]),
        "sigma": torch.full((batch,), 0.5),
        "img_ids": torch.zeros(image, 3),
        "txt_ids": torch.zeros(length, 3),
        "guidance": torch.full((batch,), 1.0),
        "target": torch.randn(batch, target, channels),
        "seeds": None,  # per-row draws read their seeds' values; the memory of the draws is nil
    }


def _trace(config: TrainConfig, tc: dict[str, Any], references: int, batch: int, fake: bool = True) -> _Trace:
    """Set the trainer's model up as ``train`` does and run one step, counting live bytes."""
    from diffusers import FluxTransformer2DModel

    from instructmole.model import InstructMoLE

    from .modules import DTYPES, TrainingModel, build_mole_config, setup_transformer

    plain = copy.deepcopy(config)
    plain.model.quantize_base = "none"  # added from the shapes: quantizers need real weights
    planned = type("PlannedMoLE", (_Planned, InstructMoLE), {})
    # Built on the meta device, then given fake CPU tensors: module.to() (peft moves its layers) cannot
    # swap fake parameters in place, and meta tensors alone would dodge autocast.
    with torch.device("meta") if fake else contextlib.nullcontext():
        transformer = FluxTransformer2DModel(**{k: v for k, v in tc.items() if not k.startswith("_")})
        transformer = transformer.to(DTYPES[config.model.dtype])
        mole_config = build_mole_config(plain, transformer)
        lora_modules = setup_transformer(transformer, plain, mole_config)
    live = LiveBytes()
    mode = FakeTensorMode() if fake else contextlib.nullcontext()
    with mode, live:
        if fake:
            _fake_weights(transformer)
        else:
            for t in [*transformer.parameters(), *transformer.buffers()]:
                live.count(t)
        mole = planned(mole_config, init=config.adapter.expert_init)
        lora = config.adapter.lora
        model = TrainingModel(transformer, mole, lora_modules, lora.alpha if lora.alpha is not None else lora.rank)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
        frozen += sum(b.numel() * b.element_size() for b in model.buffers())
        optimizer = torch.optim.AdamW(trainable, lr=1e-4, foreach=False)
        before = live.now
        for p in trainable:  # allocate the state, as every step after the first has it
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        adamw = live.now - before
        live.reset_peak()
        autocast = config.train.mixed_precision
        amp = torch.autocast("cpu", dtype=DTYPES[autocast]) if autocast != "no" else contextlib.nullcontext()
        with amp:
            out = model(**_inputs(config, tc, references, batch))
            loss = out["flow"].mean() + sum(v for k, v in out.items() if k != "flow")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        peak = live.peak
    blocks = [f"transformer_blocks.{i}" for i in range(tc["num_layers"])]
    blocks += [f"single_transformer_blocks.{i}" for i in range(tc["num_single_layers"])]
    linears = []
    for name, module in transformer.named_modules():
        if isinstance(module, nn.Linear) and not module.weight.requires_grad:
            block = next((b for b in blocks if name.startswith(b + ".")), "")
            w = module.weight
            linears.append((block, w.numel(), w.shape[0], w.numel() * w.element_size()))
    return _Trace(
        frozen=frozen,
        trainable=sum(p.numel() * p.element_size() for p in trainable),
        adamw=adamw,
        peak=peak,
        linears=tuple(linears),
        blocks=tuple(blocks),
        trainable_shapes=tuple(tuple(p.shape) for p in trainable),
    )


# ---- the options that are added from the shapes ------------------------------------------------------------


def _quantized(numel: int, rows: int, kind: str) -> int:
    if kind == "nf4":
        return int(numel * QUANT_BYTES["nf4"]) + numel // 64 * 4
    return int(numel * QUANT_BYTES[kind]) + rows * 4


def _optimizer_bytes(kind: str, shapes: tuple[tuple[int, ...], ...]) -> int:
    """State bytes of optimizer ``kind`` over trainable parameters of these shapes (``training/optim.py``)."""
    total = 0.0
    for shape in shapes:
        numel = int(torch.Size(shape).numel())
        if kind == "adafactor":  # no first moment; second moment factored over the last two dims, or full
            total += 4 * (numel // shape[-1] + numel // shape[-2]) if len(shape) >= 2 else 4 * numel
        elif kind == "adamw8bit":  # bitsandbytes: 8-bit blockwise states (an fp32 absmax per 256) from 4096 up
            total += 2 * numel + 8 * (numel // 256 + 1) if numel >= 4096 else 8 * numel
        else:
            total += OPTIMIZER_BYTES[kind] * numel
    return int(total)


def _apply(trace: _Trace, options: Options, ema: bool) -> Estimate:
    """An estimate from a trace made with the same checkpointing, for the other options."""
    base = trace.frozen
    step_extra = 0
    if options.quantize_base != "none":
        saved = sum(b - _quantized(n, r, options.quantize_base) for _, n, r, b in trace.linears)
        base -= saved
        step_extra += 2 * max(b for *_, b in trace.linears)  # one layer dequantized, and its gradient pass
    if options.block_swap:
        swapped = set(trace.blocks[-options.block_swap :])
        per_block: dict[str, int] = {}
        for block, n, r, b in trace.linears:
            size = _quantized(n, r, options.quantize_base) if options.quantize_base != "none" else b
            per_block[block] = per_block.get(block, 0) + size
        away = sum(per_block.get(b, 0) for b in swapped)
        in_flight = 2 * max((per_block.get(b, 0) for b in swapped), default=0)
        base -= away
        step_extra += in_flight
    optimizer = _optimizer_bytes(options.optimizer, trace.trainable_shapes)
    step = trace.peak - trace.frozen - trace.trainable - trace.adamw + step_extra
    ema_bytes = 4 * sum(int(torch.Size(s).numel()) for s in trace.trainable_shapes) if ema else 0
    return Estimate(options, base, trace.trainable, optimizer, ema_bytes, step)


def _options_of(config: TrainConfig) -> Options:
    return Options(
        gradient_checkpointing=config.model.gradient_checkpointing,
        quantize_base=config.model.quantize_base,
        block_swap=getattr(config.model, "block_swap", 0),
        optimizer=config.train.optimizer,
    )


class Planner:
    """Estimates for one config and its variants of the memory options. A trace is made once per
    gradient-checkpointing setting (the one option that changes what the step keeps); the others are
    added to it from the shapes, so comparing dozens of variants costs at most two traces."""

    def __init__(self, config: TrainConfig, *, references: int = 1, processes: int = 1, fake: bool = True) -> None:
        self.config, self.references, self.fake = config, references, fake
        self.micro_batch = max(config.train.batch_size // config.train.gradient_accumulation // max(processes, 1), 1)
        self.options = _options_of(config)
        self._transformer = transformer_config(config)
        self._traces: dict[bool, _Trace] = {}

    def estimate(self, options: Options | None = None) -> Estimate:
        """Peak GPU bytes of one process with ``options`` (default: the config's own)."""
        options = options or self.options
        checkpointing = options.gradient_checkpointing
        if checkpointing not in self._traces:
            config = copy.deepcopy(self.config)
            config.model.gradient_checkpointing = checkpointing
            self._traces[checkpointing] = _trace(
                config, self._transformer, self.references, self.micro_batch, fake=self.fake
            )
        return _apply(self._traces[checkpointing], options, ema=self.config.train.ema > 0)

    def advise(self, card_bytes: int) -> tuple[Estimate, Estimate | None]:
        """The config's estimate, and the cheapest change of memory options that fits ``card_bytes``
        (None when it fits as it is, or when nothing does). Cheapest: each option costs time, in this
        order: checkpointing (~30 %), an 8-bit optimizer (nothing measurable), fp8 then nf4 storage (a
        dequantisation per layer), then each block swapped (a transfer per block and pass)."""
        mine = self.estimate()
        if mine.card_bytes() <= card_bytes:
            return mine, None
        blocks = self._transformer["num_layers"] + self._transformer["num_single_layers"]
        eight_bit = "adamw8bit" if mine.options.optimizer == "adamw" else mine.options.optimizer
        checkpointed = replace(mine.options, gradient_checkpointing=True)
        smaller = replace(checkpointed, optimizer=eight_bit)
        candidates = [checkpointed, smaller, *(replace(smaller, quantize_base=q) for q in ("fp8", "nf4"))]
        candidates += [
            replace(smaller, quantize_base=q, block_swap=n) for q in ("fp8", "nf4") for n in range(1, blocks)
        ]
        for options in candidates:
            guess = self.estimate(options)
            if options != mine.options and guess.card_bytes() <= card_bytes:
                return mine, guess
        return mine, None

    def report(self, gpu_gib: float | None) -> str:
        """The text ``--plan`` prints: the estimate by part, and what to change if it does not fit."""
        head = (
            f"Memory plan: {self.config.data.resolution}² target + {self.references} reference(s), micro-batch "
            f"{self.micro_batch} per process, {self.config.model.dtype} base, {self.options.describe()}"
        )
        if gpu_gib is None:
            return "\n".join([head, *self.estimate().lines()])
        mine, better = self.advise(int(gpu_gib * GIB))
        lines = [head, *mine.lines()]
        if mine.card_bytes() <= gpu_gib * GIB:
            lines.append(f"fits a {gpu_gib:g} GiB card as it is.")
        elif better is None:
            lines.append(
                f"does not fit {gpu_gib:g} GiB with any memory option here: lower data.resolution or "
                "adapter.lora.rank, or train on a larger card."
            )
        else:
            lines.append(f"does not fit {gpu_gib:g} GiB; the cheapest options that fit:")
            lines.append(f"  {better.options.describe()}")
            lines += better.lines()
        return "\n".join(lines)


def plan_for_device(config: TrainConfig, device: torch.device, *, references: int = 1, processes: int = 1) -> str:
    """The plan a run prints at its start on a GPU: the estimate for this card's memory. Advice only: a
    plan that cannot be made (an operation without a fake-tensor kernel, say) is one line, never the
    run's end."""
    total = torch.cuda.get_device_properties(device).total_memory / GIB
    try:
        return Planner(config, references=references, processes=processes).report(total)
    except Exception as err:  # the plan is advice; the run goes on without it
        return f"memory plan unavailable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"


def load_for_plan(path: str | None, overrides: list[str]) -> TrainConfig:
    """The config to plan, which may name no model and no data yet (``training/configs/kontext.yaml`` as
    shipped): the transformer's shapes then come from the shipped FLUX.1 Kontext [dev] config, and no
    data is read. Everything else is validated as for a run."""
    import yaml

    from .config import load_config
    from .loading import SHIPPED_CONFIGS

    written: dict[str, Any] = {}
    if path is not None and Path(path).is_file():
        with contextlib.suppress(OSError, ValueError, yaml.YAMLError):  # load_config words these errors
            written = yaml.safe_load(Path(path).read_text(encoding="utf-8-sig")) or {}
    given = {item.split("=", 1)[0].strip() for item in overrides if "=" in item}
    model = written.get("model") if isinstance(written.get("model"), dict) else {}
    data = written.get("data") if isinstance(written.get("data"), dict) else {}
    fill = []
    sources = ("pretrained", "diffusion_model")
    if not any(model.get(k) for k in sources) and not any(f"model.{k}" in given for k in sources):
        fill.append(f"model.pretrained={SHIPPED_CONFIGS}")
    if not data.get("manifest") and "data.manifest" not in given:
        fill.append(f"data.manifest={SHIPPED_CONFIGS}")  # any existing path: the plan reads no data
    return load_config(path, [*fill, *overrides])


def references_of(config: TrainConfig) -> int:
    """The most reference images a row of the config's data has (1 when there is no data to read)."""
    from .data import read_rows

    try:
        rows = read_rows(config.data.manifest)
    except InstructMoLEError:
        return 1
    return max((len(row.references) for row in rows), default=1) or 1
