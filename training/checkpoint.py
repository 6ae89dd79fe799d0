"""Checkpoints that survive a kill at any moment, hold only what was trained, and resume exactly.

A checkpoint is ``<output_dir>/checkpoints/step-NNNNNNN/``: accelerate's state (the trainable
weights only, the optimizer, the scheduler, every process's RNG and the train state with the
step), the adapter exported at that step, its routing report and ``checkpoint.json`` (what run it
belongs to). Everything is written into a hidden ``.tmp-…`` folder first and renamed when whole,
so a kill during a save leaves the previous checkpoint usable and no half-written one that
``--resume latest`` could pick; leftovers of a killed save are removed at the next save. Only
then are checkpoints beyond ``save.keep`` deleted, oldest first, and only those of this run (the
marker names the run), so nothing another run left in the folder is ever pruned. A save that fails
(a full disk) removes its half-made folder and leaves every earlier checkpoint as it was.

A checkpoint's marker holds the whole config it was trained with, and a resume refuses a config
that differs in a key a resumed run may not change (``training.config.RESUME_MAY_CHANGE``).

Why not accelerate's automatic checkpoint naming: it deletes the oldest checkpoint *before* it
writes the new one, and writes in place, so a kill at the wrong moment loses both.

Every exported adapter carries a card (``instructmole/card.py``): ``adapter_card`` gathers what the
run knows (base model, the manifest's tasks with example instructions, the settings, the step) into
its metadata, and ``instructmole.card.seal`` then stamps the tensor hash and writes the preview and
the ``.sha256`` file beside it, inside the same hidden folder, so they are published with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from instructmole.card import build_card, summarize_tasks

from .config import TrainConfig, resume_conflicts
from .errors import CheckpointError

__all__ = [
    "EMA",
    "TrainState",
    "adapter_card",
    "card_settings",
    "check_resumable",
    "checkpoints",
    "install_state_hooks",
    "read_marker",
    "resolve_resume",
    "save_checkpoint",
]

_NAME = re.compile(r"^step-(\d+)$")
MARKER = "checkpoint.json"


@dataclass
class TrainState:
    """What accelerate saves for us beside the model and optimizer: the optimizer step reached."""

    step: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with their marker), oldest first."""
    root = Path(output_dir) / "checkpoints"
    found = []
    if root.is_dir():
        for path in root.iterdir():
            m = _NAME.match(path.name)
            if m and (path / MARKER).is_file():
                found.append((int(m.group(1)), path))
    return sorted(found)


def resolve_resume(output_dir: Path, resume: str | None) -> Path | None:
    """``None``: start fresh. ``"latest"``: the newest complete checkpoint (fresh if there is none,
    so a preemptible job can always pass it). Anything else: that checkpoint folder."""
    if resume is None:
        return None
    if resume == "latest":
        done = checkpoints(output_dir)
        return done[-1][1] if done else None
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"--resume {resume}: no such checkpoint folder; pass 'latest' or a step-N folder")
    if not (path / MARKER).is_file():
        raise CheckpointError(
            f"--resume {resume}: the folder has no {MARKER}, so its save never finished; "
            "resume from an earlier checkpoint or 'latest'"
        )
    return path


def read_marker(path: Path) -> dict[str, Any]:
    """The marker of checkpoint folder ``path``; a damaged one is the user's to replace, not a traceback."""
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"{path / MARKER} cannot be read ({getattr(err, 'strerror', None) or err}); resume from another checkpoint"
        ) from None
    if not isinstance(marker, dict) or not isinstance(marker.get("step"), int):
        raise CheckpointError(f"{path / MARKER} is not a checkpoint marker; resume from another checkpoint")
    return marker


# What the markers of checkpoints from before whole configs were recorded compared.
_LEGACY_KEYS = {
    "adapter": ("the adapter section", lambda c: c["adapter"]),
    "seed": ("train.seed", lambda c: c["train"]["seed"]),
    "batch_size": ("train.batch_size", lambda c: c["train"]["batch_size"]),
    "gradient_accumulation": ("train.gradient_accumulation", lambda c: c["train"]["gradient_accumulation"]),
}


def check_resumable(path: Path, config: dict[str, Any], data: str | None) -> dict[str, Any]:
    """The marker of checkpoint ``path`` if a run with ``config`` (``TrainConfig.to_dict()``) on data
    with fingerprint ``data`` (None: not checked) may continue it; else ``CheckpointError`` naming what
    changed."""
    saved = read_marker(path)
    if "config" in saved and isinstance(saved["config"], dict):
        conflicts = [(key, f"{old!r}, now {new!r}") for key, old, new in resume_conflicts(saved["config"], config)]
    else:
        conflicts = [(what, "") for key, (what, get) in _LEGACY_KEYS.items() if saved.get(key) != get(config)]
    if conflicts:
        key, change = conflicts[0]
        more = f" (and {len(conflicts) - 1} other keys)" if len(conflicts) > 1 else ""
        raise CheckpointError(
            f"{path} was trained with another {key}{f' ({change})' if change else ''}{more}; a resumed run may "
            "change only the steps, the learning-rate schedule, saving, sampling, logging and data loading, so "
            "set it back, or start a new run in another train.output_dir"
        )
    if data is not None and saved.get("data") != data:
        raise CheckpointError(
            f"{path} was trained with another data set (rows or images); resume with the same data, or start a "
            "new run in another train.output_dir"
        )
    return saved


def save_checkpoint(
    accelerator: Any,
    output_dir: Path,
    step: int,
    keep: int,
    marker: dict[str, Any],
    write_extras: Callable[[Path], None],
) -> Path:
    """Save the state of every process, let the main process add its extras, then publish atomically.

    ``marker["run"]`` names the run: only its checkpoints are pruned to the newest ``keep``."""
    root = Path(output_dir) / "checkpoints"
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    main = accelerator.is_main_process
    error: Exception | None = None
    if main:
        try:
            _clear_leftovers(root)
            tmp.mkdir(parents=True)
        except OSError as err:
            error = err
    error = _agree(accelerator, error)
    if error is None:
        try:
            accelerator.save_state(str(tmp))
        except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
            error = err
        error = _agree(accelerator, error)
    if error is None and main:
        try:
            write_extras(tmp)
            (tmp / MARKER).write_text(json.dumps({**marker, "step": step}, indent=2))
            _publish(tmp, final)
        except OSError as err:
            error = err
    error = _agree(accelerator, error)
    if error is not None:  # a full disk, a folder gone read-only: the earlier checkpoints stay as they were
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        done = [p.name for _, p in checkpoints(output_dir)]
        kept = f"the newest complete one, {done[-1]}, is intact" if done else "no earlier checkpoint exists"
        reason = getattr(error, "strerror", None) or " ".join(str(error).split())[:120]
        raise CheckpointError(
            f"could not write checkpoint {final.name} in {root} ({reason}); {kept}; free space or fix the folder, "
            "then continue with --resume latest"
        )
    if main:
        ours = [p for _, p in checkpoints(output_dir) if _run_of(p) == marker.get("run")]
        for old in ours[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _agree(accelerator: Any, error: Exception | None) -> Exception | None:
    """Tell every process whether any of them failed (one all-reduce), so that all stop together
    instead of the others waiting at the next barrier for a process that has given up."""
    if accelerator.num_processes == 1:
        return error
    import torch

    flag = torch.tensor([0.0 if error is None else 1.0], device=accelerator.device)
    failed = float(accelerator.reduce(flag, "sum")) > 0  # every process takes part, failed or not
    if error is None and failed:
        return OSError("another process could not write its part of the checkpoint")
    return error


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` to ``final``; an earlier ``final`` (a resumed run re-reaching that step)
    is moved aside first and deleted only once the new one is in place."""
    if not final.exists():
        os.rename(tmp, final)
        return
    old = final.with_name(f".old-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _clear_leftovers(root: Path) -> None:
    """Remove what a killed save left: half-made ``.tmp-`` folders, and ``.old-`` folders whose
    replacement is in place (one whose replacement is not is renamed back: it is the only copy)."""
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in root.glob(".old-step-*"):
        final = old.with_name(old.name[len(".old-") :])
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(old, final)


def _run_of(path: Path) -> str | None:
    try:
        return read_marker(path).get("run")
    except CheckpointError:
        return "unreadable"  # never ours: a damaged marker is left for the user to look at


class EMA:
    """An exponential moving average of the trainable weights (``train.ema``), updated after each
    optimizer step: ``ema ← decay·ema + (1 − decay)·weight``, in fp32. Registered with accelerate's
    checkpointing, so a resumed run continues the same average."""

    def __init__(self, weights: dict[str, torch.Tensor], decay: float) -> None:
        self.decay = decay
        self.shadow = {n: w.detach().float().clone() for n, w in weights.items()}

    @torch.no_grad()
    def update(self, weights: dict[str, torch.Tensor]) -> None:
        for name, w in weights.items():
            self.shadow[name].lerp_(w.detach().float(), 1 - self.decay)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["shadow"]) != set(self.shadow):
            raise CheckpointError(
                "the checkpoint's EMA weights do not match this run's adapter; resume with the config it was made with"
            )
        with torch.no_grad():
            for name, value in state["shadow"].items():
                self.shadow[name].copy_(value)

    @contextlib.contextmanager
    def applied(self, model: Any) -> Iterator[None]:
        """``model`` (a ``TrainingModel``) carries the EMA weights inside the block, its own after it."""
        own = {n: w.clone() for n, w in model.trainable_state().items()}
        model.load_trainable_state(self.shadow)
        try:
            yield
        finally:
            model.load_trainable_state(own)


# The data settings a card shows: how the rows were trained, not where they lie.
_CARD_DATA_KEYS = ("resolution", "max_references", "instruction_dropout", "reference_dropout", "latent_sample")


def card_settings(config: TrainConfig) -> dict[str, Any]:
    """The training settings a card records: the adapter, the optimisation and loss weights, what
    shapes the data, the dtypes. Left out: every local path (output folder, model files, manifest,
    cache), which would tell strangers about the maker's disk and nothing about the weights."""
    full = config.to_dict()
    return {
        "adapter": full["adapter"],
        "train": {k: v for k, v in full["train"].items() if k != "output_dir"},
        "data": {k: full["data"][k] for k in _CARD_DATA_KEYS if k in full["data"]},
        "model": {"dtype": full["model"]["dtype"]},
        "save": {"dtype": full["save"]["dtype"]},
    }


def adapter_card(
    config: TrainConfig,
    data: Any,
    step: int,
    family: str,
    base: dict[str, str] | None = None,
    ema: float | None = None,
) -> dict[str, str]:
    """The card metadata of the adapter a run exports at ``step`` (``instructmole/card.py``).

    ``data``: the run's data set (``loop.Dataset``: ``rows``, the ``train`` and ``holdout`` row
    numbers, ``fingerprint()``); the tasks and example instructions come from its training rows,
    the ones the weights saw. ``family``: the adapter's ``MoLEConfig.base_model``. ``base``: the
    base model's part fingerprints (``KontextParts.identity``); the transformer's is the card's base
    fingerprint. ``ema``: the decay, for the EMA's own card."""
    m = config.model
    source = m.pretrained or m.diffusion_model
    title = f"{config.save.name} step {step}" + (f" (EMA {ema:g})" if ema is not None else "")
    card = build_card(
        title=title,
        family=family,
        step=step,
        tasks=summarize_tasks((data.rows[i].task, data.rows[i].instruction) for i in data.train),
        source=Path(source).name if source else None,
        fingerprint=(base or {}).get("transformer"),
        settings=card_settings(config),
        rows=len(data.train),
        holdout=len(data.holdout),
        data_fingerprint=data.fingerprint(),
        resolution=config.data.resolution,
    )
    return card.to_metadata()


def install_state_hooks(accelerator: Any, unwrap: Callable[[Any], Any]) -> None:
    """Make ``save_state``/``load_state`` carry only the trainable weights, never the frozen base."""

    def save_hook(models: list, weights: list, _output_dir: str) -> None:
        for i, model in enumerate(models):
            weights[i] = {k: v.contiguous() for k, v in unwrap(model).trainable_state().items()}

    def load_hook(models: list, input_dir: str) -> None:
        for i, model in enumerate(models):
            suffix = f"_{i}" if i else ""
            path = Path(input_dir) / f"model{suffix}.safetensors"
            if not path.is_file():
                raise CheckpointError(f"{input_dir} holds no trainable weights ({path.name}); it is not a checkpoint")
            unwrap(model).load_trainable_state(load_file(str(path)))
        models.clear()  # loaded: accelerate must not load them again (strictly, as full models)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
