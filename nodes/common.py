"""What every node shares: the socket types, the adapter folder, and user-facing errors."""

from __future__ import annotations

import hashlib
import math
import os
from collections import OrderedDict
from typing import Any

import torch
from comfy_api.latest import io

from ..instructmole import Adapter, AdapterError, InstructMoLEError, load_adapter
from ..instructmole.checks import real_number
from ..instructmole.council import describe_value

# The node library's tree: one branch per job. Node ids never change (saved workflows name them);
# display names all read "InstructMoLE <what it does>".
CATEGORY = "InstructMoLE"
LOADERS = f"{CATEGORY}/loaders"  # adapter files, alone or onto a model
ROUTING = f"{CATEGORY}/routing"  # instruction -> routing signal or council
COUNCILS = f"{CATEGORY}/councils"  # edit, blend, apply, show, load a council
ICEDIT = f"{CATEGORY}/ICEdit"  # ICEdit's diptych and its per-token expert map
# The loaders' names, which other nodes' tooltips and errors point to.
LOAD_ADAPTER = "InstructMoLE Load Adapter"
LOAD_KONTEXT = "InstructMoLE Load Kontext + Adapter"
ADAPTER_FILE = "InstructMoLE Adapter File"
APPLY_ADAPTER = "InstructMoLE Apply Adapter"
ADAPTER = io.Custom("INSTRUCTMOLE_ADAPTER")
COUNCIL = io.Custom("INSTRUCTMOLE_COUNCIL")
FOLDER = "instructmole"


class NodeInputError(InstructMoLEError):
    """A user's mistake on one node input: the message names the input and the way out."""

    def __init__(self, node: str, input_name: str, message: str) -> None:
        super().__init__(f"{node}, input '{input_name}': {message}")


# ComfyUI imports a pack under its folder path, which would make the error's type name a long path.
NodeInputError.__module__ = "instructmole"


def fraction_input(node: str, name: str, value: Any) -> float:
    """A number from 0 to 1 (ComfyUI's own range check lets NaN through, and skips inputs that
    ``validate_inputs`` takes)."""
    number = real_number(value)
    if number is None or not (math.isfinite(number) and 0 <= number <= 1):
        raise NodeInputError(node, name, f"{describe_value(value)} is not possible; choose a number from 0 to 1")
    return number


def image_input(node: str, name: str, value: Any) -> torch.Tensor:
    """A ComfyUI IMAGE: ``[batch, height, width, 3 or 4]``, not empty."""
    if not isinstance(value, torch.Tensor) or value.ndim != 4 or value.shape[-1] not in (3, 4) or value.numel() == 0:
        raise NodeInputError(node, name, f"got {describe_value(value)}; connect an IMAGE (e.g. Load Image)")
    return value


def register_folder() -> None:
    """models/instructmole, listing .safetensors only (unless extra_model_paths.yaml set it up)."""
    import folder_paths

    if FOLDER not in folder_paths.folder_names_and_paths:
        path = os.path.join(folder_paths.models_dir, FOLDER)
        folder_paths.folder_names_and_paths[FOLDER] = ([path], {".safetensors", ".sft"})


def adapter_files() -> list[str]:
    """Adapter choices: models/instructmole first, then models/loras (adapters may live there too)."""
    import folder_paths

    register_folder()
    names = list(folder_paths.get_filename_list(FOLDER))
    names += [n for n in folder_paths.get_filename_list("loras") if n not in names and n.endswith(".safetensors")]
    return names


def adapter_path(name: str) -> str | None:
    import folder_paths

    return folder_paths.get_full_path(FOLDER, name) or folder_paths.get_full_path("loras", name)


def file_identity(path: str) -> str:
    """What tells one version of a file from another, cheaply: size, modification and change times,
    inode, and a hash of its first and last MiB (header and tensor data). A file replaced with its
    old modification time kept (``cp -p``, ``rsync -t``) still differs: new change time, new bytes."""
    st = os.stat(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        if st.st_size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            digest.update(f.read())
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:{digest.hexdigest()[:16]}"


class _AdapterCache:
    """The loaded adapters, one version per path (a changed file replaces its old version in RAM),
    at most ``size`` paths (the least recently used goes)."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._entries: OrderedDict[str, tuple[str, Adapter]] = OrderedDict()

    def get(self, path: str) -> Adapter:
        identity = file_identity(path)
        entry = self._entries.pop(path, None)
        if entry is None or entry[0] != identity:
            entry = (identity, load_adapter(path))
        self._entries[path] = entry
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return entry[1]


_ADAPTERS = _AdapterCache()


def adapter_fingerprint(name: str | None) -> str:
    """For the loaders' ``fingerprint_inputs``: ComfyUI re-runs them when the named file changes."""
    path = adapter_path(name) if isinstance(name, str) else None
    if path is None:
        return f"missing:{name}"
    try:
        return file_identity(path)
    except OSError:
        return f"unreadable:{name}"


def load_adapter_input(node: str, name: str) -> Adapter:
    """Load the adapter a combo names; a missing or bad file is the 'adapter' input's error."""
    path = adapter_path(name)
    if path is None:
        raise NodeInputError(node, "adapter", f"'{name}' was not found in models/instructmole or models/loras")
    try:
        return _ADAPTERS.get(path)
    except AdapterError as err:
        raise NodeInputError(node, "adapter", str(err)) from None
    except OSError as err:
        raise NodeInputError(node, "adapter", f"'{name}' cannot be read ({err.strerror}); check the file") from None
