"""Checkpoints that survive a kill at any moment, hold only what was trained, and resume exactly.

A checkpoint is ``<output_dir>/checkpoints/step-NNNNNNN/``: accelerate's state (the trainable
weights only, the optimizer, the scheduler, every process's RNG and the train state with the
step), the adapter exported at that step, its routing report and ``checkpoint.json`` (what run it
belongs to). Everything is written into a hidden ``.tmp-…`` folder first and renamed when whole,
so a kill during a save leaves the previous checkpoint usable and no half-written one that
``--resume latest`` could pick; leftovers of a killed save are removed at the next save. Only
then are checkpoints beyond ``save.keep`` deleted, oldest first.

Why not accelerate's automatic checkpoint naming: it deletes the oldest checkpoint *before* it
writes the new one, and writes in place, so a kill at the wrong moment loses both.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from .errors import CheckpointError

__all__ = ["TrainState", "checkpoints", "install_state_hooks", "resolve_resume", "save_checkpoint"]

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
    return json.loads((path / MARKER).read_text())


def save_checkpoint(
    accelerator: Any,
    output_dir: Path,
    step: int,
    keep: int,
    marker: dict[str, Any],
    write_extras: Callable[[Path], None],
) -> Path:
    """Save the state of every process, let the main process add its extras, then publish atomically."""
    root = Path(output_dir) / "checkpoints"
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    if accelerator.is_main_process:
        for stale in root.glob(".tmp-step-*"):  # a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_extras(tmp)
        (tmp / MARKER).write_text(json.dumps({**marker, "step": step}, indent=2))
        if final.exists():  # the same step saved before (a resumed run re-reaching it): replace it
            shutil.rmtree(final)
        tmp.rename(final)
        for _, old in checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


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
