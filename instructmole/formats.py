"""Reading adapter files: the one place that opens a ``.safetensors`` file and decides its format.

Two formats are read, both into the one ``Adapter`` type (``adapter.py``):

* InstructMoLE's own (``__metadata__`` ``format = "instructmole"``): the version, config and model
  family are checked here, then ``Adapter.from_tensors`` validates every tensor;
* ICEdit's MoE-LoRA (no such metadata, but ``lora_route``/``expert_<j>`` keys): converted on load by
  ``icedit.convert_icedit``, which is exact (the same formula).

Anything else is one sentence naming what the file is not and what to do instead. Every failure of
the reader or the OS becomes an ``AdapterError`` saying whether the file is unreadable (permissions,
disk) or not a safetensors file at all, except running out of memory, which stays itself.

Why a module of its own: the readers depend on both the type and the ICEdit converter, and the
converter depends on the type. Kept here, imports run one way (``adapter`` <- ``icedit`` <-
``formats``) and none of them needs a late import to dodge a cycle.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from .adapter import FORMAT, FORMAT_VERSION, RESERVED_METADATA, Adapter, AdapterError, _as_path, _short
from .config import ConfigError, MoLEConfig, _show
from .icedit import ICEDIT_BASE, convert_icedit, is_icedit

__all__ = ["load_adapter", "read_metadata", "read_tensors"]


def _source_path(path: Any) -> Path:
    """An existing adapter file, or one sentence saying why not."""
    path = _as_path(path, "adapter path")
    try:
        is_dir, is_file = path.is_dir(), path.is_file()
    except OSError as err:
        raise AdapterError(f"adapter path '{path}' cannot be examined: {err.strerror or _short(err)}") from None
    if is_dir:
        raise AdapterError(f"adapter path '{path}' is a folder, not a file; pass the .safetensors file inside it")
    if not is_file:
        raise AdapterError(f"adapter file '{path}' does not exist; put it in models/instructmole or models/loras")
    return path


def _read_failure(path: Path, err: Exception) -> AdapterError:
    """One sentence for any failure of safetensors/the OS while reading ``path``."""
    if isinstance(err, OSError):
        return AdapterError(
            f"'{path}' could not be read: {err.strerror or _short(err)}; check the file and its permissions"
        )
    return AdapterError(
        f"'{path.name}' is not a readable .safetensors file (truncated or corrupt?): {_short(err)}; "
        "download or export it again"
    )


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, with errors a user can act on."""
    path = _source_path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as err:  # safetensors, the OS, or anything else the reader raises for a bad file
        raise _read_failure(path, err) from None
    return dict(meta or {})


def _device(device: Any) -> torch.device:
    """A user's ``device`` argument as a ``torch.device``, checked before any file is touched."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise AdapterError(f"device {_show(device)} is not a torch device; use e.g. 'cpu' or 'cuda:0'") from None


def load_adapter(
    path: str | os.PathLike, device: str | torch.device = "cpu", expect_base: str | None = None
) -> Adapter:
    """Load and validate an adapter file. ``expect_base``: refuse adapters made for another model family."""
    device = _device(device)
    path = _source_path(path)
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        icedit = _load_icedit(path, meta, device, expect_base)
        if icedit is not None:
            return icedit
        raise AdapterError(
            f"'{path.name}' is a safetensors file but not an InstructMoLE adapter (its metadata has no "
            f"format '{FORMAT}' and no ICEdit MoE-LoRA keys); load a plain LoRA with a LoRA loader, or convert "
            "a reference checkpoint with 'python -m instructmole convert'"
        )
    version = meta.get("format_version", "")
    if version != str(FORMAT_VERSION):
        raise AdapterError(
            f"'{path.name}' has adapter format version {version[:40]!r}, but this InstructMoLE reads version "
            f"{FORMAT_VERSION}; update the InstructMoLE pack"
        )
    if "config" not in meta:
        raise AdapterError(f"'{path.name}' has no 'config' in its metadata; export or convert it again")
    try:
        config = MoLEConfig.from_json(meta["config"])
    except ConfigError as err:
        raise AdapterError(f"'{path.name}' carries an invalid config: {err}") from None
    if expect_base is not None and config.base_model != expect_base:
        raise AdapterError(
            f"'{path.name}' was made for {config.base_model!r}, not {_show(expect_base)}; pick an adapter for "
            "this model"
        )
    tensors = read_tensors(path, device)
    extra = {k: v for k, v in meta.items() if k not in RESERVED_METADATA}
    return Adapter.from_tensors(config, tensors, extra, source=path.name)


def read_tensors(path: Path, device: torch.device) -> dict[str, Tensor]:
    """Every tensor of the safetensors file ``path``, put on ``device`` by the reader itself (no CPU
    copy first); a reader's failure becomes the same ``AdapterError`` sentences as ``read_metadata``.

    On the CPU the reader hands out views of the file's memory mapping: a file overwritten in place
    (``cp`` over it while ComfyUI runs) would then change a loaded adapter's weights under it, or
    crash the process if it shrank. Each tensor gets memory of its own instead."""
    own = torch.device(device).type == "cpu"
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {k: f.get_tensor(k).clone() if own else f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as err:  # safetensors, the OS, an unknown dtype, a device that is not there
        raise _read_failure(path, err) from None


def _load_icedit(path: Path, meta: dict[str, str], device: torch.device, expect_base: str | None) -> Adapter | None:
    """An ICEdit MoE-LoRA file converted on the fly (see ``icedit.py``), or None if it is not one.

    Only the key names decide (ICEdit files carry no format metadata); the tensors are read after."""
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except (MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as err:
        raise _read_failure(path, err) from None
    if not is_icedit(keys):
        return None
    if expect_base is not None and expect_base != ICEDIT_BASE:
        raise AdapterError(
            f"'{path.name}' is an ICEdit MoE-LoRA, made for {ICEDIT_BASE!r}, not {_show(expect_base)}; pick an "
            "adapter for this model"
        )
    return convert_icedit(read_tensors(path, device), metadata=meta, source=path.name)
