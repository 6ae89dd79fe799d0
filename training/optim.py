"""The optimizer (``train.optimizer``) and the optional libraries that options need.

* ``adamw``: torch's AdamW, the fused kernel where every parameter is on the CPU or CUDA (the recipe's).
* ``adamw8bit``: bitsandbytes' AdamW8bit: both moments in 8 bits, quantised per block of 256 with
  dynamic (non-linear) codes, 2 bytes of state per parameter instead of 8 (tensors under 4096 elements
  keep 32-bit state). Chosen over torchao's ``AdamW8bit`` because bitsandbytes runs on the CPU as is
  (0.50), where torchao compiles its step with ``torch.compile`` (21 s for the first step of one
  4096 × 64 tensor here, and a C++ compiler needed) — and it is the library ``model.quantize_base=nf4``
  uses anyway.
* ``adafactor``: transformers' Adafactor with an explicit learning rate (no relative step, no parameter
  scaling) and no first moment: a factored second moment, a few bytes of state per row and column of
  each matrix. ``train.betas`` are not used.
* ``prodigy``: prodigyopt's Prodigy, which estimates the step size ``d`` as it trains: ``train.lr`` is a
  multiplier of ``d`` (its authors recommend 1.0). ``d`` is one step size for all weights, and Prodigy
  refuses groups with different multipliers, so the gates train at ``train.lr`` too (``train.gate_lr``
  is not used). Betas and weight decay (decoupled, as AdamW) are ``train.betas`` and ``train.weight_decay``.

Every optimizer's state is a plain ``state_dict`` (tensors and numbers), so accelerate's ``save_state`` /
``load_state`` carry it and a resumed run continues bit for bit. The per-group learning rates are the
groups' ``lr`` (``TrainingModel.parameter_groups``), which the learning-rate schedule scales.

A missing library is a one-line ``ConfigError`` naming the option and the pip command, raised when the
config is loaded (``config._check_together`` calls ``missing``), before any data is cached.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import logging
from typing import Any

import torch

from .errors import ConfigError

__all__ = ["OPTIMIZERS", "PACKAGES", "build_optimizer", "missing", "require"]

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "prodigy")

# (config key, value) -> (module imported, the pip requirement that installs it)
PACKAGES: dict[tuple[str, str], tuple[str, str]] = {
    ("model.quantize_base", "nf4"): ("bitsandbytes", "bitsandbytes>=0.50"),
    ("train.optimizer", "adamw8bit"): ("bitsandbytes", "bitsandbytes>=0.50"),
    ("train.optimizer", "adafactor"): ("transformers", "transformers>=4.44"),
    ("train.optimizer", "prodigy"): ("prodigyopt", "prodigyopt>=1.1"),
}


def _message(key: str, value: str, detail: str = "") -> str:
    module, requirement = PACKAGES[(key, value)]
    why = f" ({detail})" if detail else ""
    return f"{key}={value} needs {module}, which cannot be imported{why}: pip install '{requirement}'"


def missing(key: str, value: str) -> str | None:
    """The error sentence if ``key=value`` needs a library that is not installed, else None (nothing is
    imported: a check while the config loads)."""
    if (key, value) not in PACKAGES:
        return None
    module = PACKAGES[(key, value)][0]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, a broken package
        found = False
    return None if found else _message(key, value)


def require(key: str, value: str) -> Any:
    """The library ``key=value`` needs, imported; a ``ConfigError`` naming the option and pip command if it
    cannot be (not installed, or broken: its own message is kept in brackets)."""
    module = PACKAGES[(key, value)][0]
    # bitsandbytes' CPU backend logs a warning at import when it cannot fetch an optional hub kernel (it
    # falls back to its own code): noise in a training log. The library's loggers are quiet while it imports.
    quiet = logging.getLogger(module)
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return importlib.import_module(module)
    except ImportError as err:
        detail = "" if isinstance(err, ModuleNotFoundError) and err.name == module else " ".join(str(err).split())
        raise ConfigError(_message(key, value, detail[:200])) from None
    finally:
        quiet.setLevel(level)


def build_optimizer(
    name: str, groups: list[dict[str, Any]], betas: tuple[float, float], weight_decay: float
) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``groups`` (each with its ``lr`` and ``weight_decay``)."""
    if name == "adamw":
        # The fused kernel (CPU and CUDA): one call per step instead of a dozen tensor ops per parameter,
        # measured 6-7 ms of a 30 ms step on the demo's CPU run; the same update, rounded differently.
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, betas=betas, weight_decay=weight_decay, fused=fused or None)
    if name == "adamw8bit":
        bnb = require("train.optimizer", name)
        return bnb.optim.AdamW8bit(groups, lr=groups[0]["lr"], betas=betas, weight_decay=weight_decay)
    if name == "adafactor":
        require("train.optimizer", name)
        from transformers.optimization import Adafactor

        return Adafactor(
            groups,
            lr=groups[0]["lr"],
            weight_decay=weight_decay,
            scale_parameter=False,  # the lr is the step size, not a share of each weight's RMS
            relative_step=False,  # ... and not a 1/sqrt(step) schedule of its own: ours applies
            warmup_init=False,
            beta1=None,  # no first moment: the memory Adafactor exists to save
        )
    if name == "prodigy":
        prodigyopt = require("train.optimizer", name)
        # One estimated step size for every weight: Prodigy refuses groups with different multipliers, so the
        # gates take train.lr too (train.gate_lr is not used).
        groups = [{**group, "lr": groups[0]["lr"]} for group in groups]
        with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using decoupled weight decay"
            return prodigyopt.Prodigy(groups, lr=groups[0]["lr"], betas=betas, weight_decay=weight_decay, decouple=True)
    raise ValueError(f"unknown optimizer {name!r}; one of {OPTIMIZERS}")  # a bug: the config checks it
