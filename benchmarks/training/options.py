"""The trainer's memory options as the benchmark names them: one ``MemoryOption`` per row of ``ours``.

Why apart: ``python -m benchmarks.training`` (``--quantize-base``, ``--block-swap``, ``--optimizer``,
``--memory-options``) and the GPU check's ``training`` stage measure the same options, named and
configured the same way: ``model.quantize_base``, ``model.block_swap`` and ``train.optimizer`` of the
trainer's own config, applied by the trainer's own code (``setup_transformer`` quantizes,
``training.offload.BlockSwap`` swaps, ``training.optim.build_optimizer`` builds the optimizer).

An option is written as a spec, ``+``-separated parts: a base format (``fp8``, ``int8``, ``nf4``), an
optimizer (``adamw``, ``adamw8bit``, ``adafactor``, ``prodigy``), ``swap-all`` or ``swapN`` (the last N
blocks swapped); ``base`` alone is the trainer's default (unquantized base, AdamW, nothing swapped).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from training.optim import OPTIMIZERS
from training.optim import missing as missing_package
from training.quantize import QUANTIZE_FORMATS

from .setting import TrainShape

__all__ = [
    "ALL_BLOCKS",
    "BASELINE",
    "DEFAULT_OPTIONS",
    "GPU_CHECK_OPTIONS",
    "MemoryOption",
    "parse_option",
    "parse_options",
]

ALL_BLOCKS = -1  # block_swap: every block of the transformer, whatever its depth
OPTIMIZER_NAMES = {"adamw": "AdamW", "adamw8bit": "AdamW 8-bit", "adafactor": "Adafactor", "prodigy": "Prodigy"}


@dataclass(frozen=True)
class MemoryOption:
    """One combination of ``model.quantize_base``, ``model.block_swap`` and ``train.optimizer``."""

    quantize: str = "none"
    block_swap: int = 0  # blocks swapped (the last ones); ALL_BLOCKS: all of them
    optimizer: str = "adamw"

    def __post_init__(self) -> None:
        if self.quantize not in QUANTIZE_FORMATS:
            raise ValueError(f"unknown base format {self.quantize!r}; one of {', '.join(QUANTIZE_FORMATS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; one of {', '.join(OPTIMIZERS)}")
        if self.block_swap < ALL_BLOCKS:
            raise ValueError(f"block_swap must be a count of blocks, or ALL_BLOCKS; got {self.block_swap}")

    @property
    def is_baseline(self) -> bool:
        return self == BASELINE

    @property
    def spec(self) -> str:
        """The option as ``parse_option`` reads it: ``base``, ``fp8``, ``nf4+adamw8bit+swap-all``."""
        parts = [] if self.quantize == "none" else [self.quantize]
        if self.optimizer != "adamw":
            parts.append(self.optimizer)
        if self.block_swap:
            parts.append("swap-all" if self.block_swap == ALL_BLOCKS else f"swap{self.block_swap}")
        return "+".join(parts) or "base"

    @property
    def label(self) -> str:
        """What the option changes, in words: ``nf4 base + AdamW 8-bit + block swap all`` ('' for the baseline)."""
        parts = [] if self.quantize == "none" else [f"{self.quantize} base"]
        if self.optimizer != "adamw":
            parts.append(OPTIMIZER_NAMES[self.optimizer])
        if self.block_swap:
            parts.append("block swap all" if self.block_swap == ALL_BLOCKS else f"block swap {self.block_swap}")
        return " + ".join(parts)

    @property
    def variant_name(self) -> str:
        """The row's variant: ``ours`` for the baseline, ``ours, <label>`` otherwise (``ours, fp8 base``)."""
        return f"ours, {self.label}" if self.label else "ours"

    def swap_count(self, shape: TrainShape) -> int:
        blocks = shape.num_double + shape.num_single
        return blocks if self.block_swap == ALL_BLOCKS else self.block_swap

    def overrides(self, shape: TrainShape) -> list[str]:
        """The trainer's config keys for this option."""
        keys = [
            f"model.quantize_base={self.quantize}",
            f"model.block_swap={self.swap_count(shape)}",
            f"train.optimizer={self.optimizer}",
        ]
        if self.optimizer == "prodigy":  # train.lr multiplies the step size Prodigy finds (its authors' 1)
            keys.append("train.lr=1")
        return keys

    def describe(self, shape: TrainShape, base_dtype: str) -> dict[str, object]:
        """The option in the JSON: its spec and the trainer's settings it stands for."""
        return {
            "spec": self.spec,
            "model.quantize_base": self.quantize,
            "base_dtype": base_dtype if self.quantize == "none" else self.quantize,
            "model.block_swap": self.swap_count(shape),
            "train.optimizer": self.optimizer,
        }

    def missing(self) -> str | None:
        """Why the option cannot run here (a library it needs is not installed), else None."""
        for key, value in (("model.quantize_base", self.quantize), ("train.optimizer", self.optimizer)):
            problem = missing_package(key, value)
            if problem:
                return problem
        return None


BASELINE = MemoryOption()


def parse_option(text: str) -> MemoryOption:
    """``"nf4+adamw8bit+swap-all"`` → ``MemoryOption("nf4", ALL_BLOCKS, "adamw8bit")``; ValueError if not one."""
    spec = text.strip().lower()
    if spec in ("base", "none", ""):
        return BASELINE
    quantize, optimizer, swap = "none", "adamw", 0
    for part in spec.split("+"):
        part = part.strip()
        if part in QUANTIZE_FORMATS[1:] and quantize == "none":
            quantize = part
        elif part in OPTIMIZERS and optimizer == "adamw":
            optimizer = part
        elif part in ("swap-all", "swapall") and not swap:
            swap = ALL_BLOCKS
        elif part.startswith("swap") and part[4:].lstrip("=").isdigit() and not swap:
            swap = int(part[4:].lstrip("="))
        else:
            raise ValueError(
                f"memory option {text!r}: cannot read {part!r} (once each: a base format "
                f"{'/'.join(QUANTIZE_FORMATS[1:])}, an optimizer {'/'.join(OPTIMIZERS)}, swap-all or swapN; "
                "or 'base')"
            )
    return MemoryOption(quantize, swap, optimizer)


def parse_options(text: str | Sequence[str]) -> tuple[MemoryOption, ...]:
    """A comma-separated list of specs (or a list of them), in order, each once."""
    items = text.split(",") if isinstance(text, str) else list(text)
    options: list[MemoryOption] = []
    for item in items:
        option = parse_option(item)
        if option not in options:
            options.append(option)
    return tuple(options)


# ``--memory-options`` without a list: the base, each quantization, the smallest state, every block swapped.
DEFAULT_OPTIONS = parse_options("base,fp8,int8,nf4,nf4+adamw8bit,swap-all,nf4+swap-all")
# The GPU check's training stage: one step each, in the order that matters if its time runs out first: the
# baseline, the design's fp8 target, the README's 24 GB configuration, block swap, then nf4 and int8 alone.
GPU_CHECK_OPTIONS = parse_options("base,fp8,nf4+adamw8bit,swap-all,nf4,int8")
