"""Import ComfyUI in-process and load this repo as its custom node pack.

Shared by the ComfyUI test suite (``conftest.py``) and ``benchmarks/comfyui.py``, so both import
ComfyUI the same way. Import design (why it looks like this):

- ``COMFYUI_PATH`` goes to the FRONT of ``sys.path``: ComfyUI's top-level modules (``nodes``,
  ``server``, ``utils``, ``app``, ``folder_paths``...) must win over anything of ours that has the
  same name -- notably this pack's ``nodes/`` folder, which is on ``sys.path`` through the repo root
  (``python -m pytest`` puts the cwd there). A regular package beats a module only if its path
  entry comes first, so front insertion is what makes ``import nodes`` mean ComfyUI's ``nodes.py``.
- ComfyUI parses ``sys.argv`` once, when ``comfy.cli_args`` is first imported, and only if
  ``comfy.options.enable_args_parsing()`` was called; the caller's own argv (pytest's, a
  benchmark's) would make argparse exit. So argv is swapped for ``[--cpu] --base-directory <dir>``
  just for that import: ``--cpu`` keeps model management off CUDA, the base directory keeps
  ``folder_paths`` (models, output, temp, user, custom_nodes) out of the ComfyUI checkout.
- The pack itself is never imported as top-level modules: ``load_pack`` loads the repo root
  through ComfyUI's own ``nodes.load_custom_node`` (``spec_from_file_location`` under a unique
  module name, the path with dots replaced), so the pack's relative imports (``from .nodes import
  ...``) resolve inside the pack and never collide with ComfyUI's ``nodes``.

Nothing here imports ComfyUI at module level: importing this file must work without a checkout.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

__all__ = ["REPO_ROOT", "bootstrap_comfy", "load_pack", "pack_module_name"]

REPO_ROOT = Path(__file__).resolve().parents[2]


def bootstrap_comfy(
    comfyui_path: str, base_directory: str, *, cpu: bool = True, extra_args: Sequence[str] = ()
) -> ModuleType:
    """Import ComfyUI in-process, once per interpreter; returns ``comfy.cli_args``.

    ``cpu=False`` lets ComfyUI pick its accelerator (benchmarks on CUDA); ``extra_args`` are more
    ComfyUI command-line arguments (e.g. ``--use-pytorch-cross-attention``). Both are fixed by the
    first call in a process (ComfyUI reads its arguments once and decides its device when
    ``comfy.model_management`` is imported): later calls ignore ``extra_args``, and asking for the
    other device is an error rather than a silent no-op.
    """
    root = str(Path(comfyui_path).resolve())
    if not Path(root, "comfy", "model_patcher.py").is_file():
        raise RuntimeError(f"COMFYUI_PATH={comfyui_path!r} is not a ComfyUI checkout")
    if root in sys.path:
        sys.path.remove(root)
    sys.path.insert(0, root)
    stale = sys.modules.get("nodes")
    if stale is not None and Path(getattr(stale, "__file__", "") or "").resolve() != Path(root, "nodes.py"):
        raise RuntimeError(f"a module named 'nodes' was imported before ComfyUI: {stale!r}")
    if "comfy.cli_args" not in sys.modules:
        saved = sys.argv
        sys.argv = [saved[0], *(["--cpu"] if cpu else []), "--base-directory", base_directory, *extra_args]
        try:
            import comfy.options

            comfy.options.enable_args_parsing()
            import comfy.cli_args
        finally:
            sys.argv = saved
    import comfy.cli_args

    if cpu and not comfy.cli_args.args.cpu:
        raise RuntimeError("comfy.cli_args was imported without --cpu before this bootstrap ran")
    if not cpu and comfy.cli_args.args.cpu:
        raise RuntimeError("ComfyUI was already imported with --cpu in this process; it cannot switch to CUDA")
    import comfy.model_management  # decides the device from args, so import it now

    return comfy.cli_args


def pack_module_name(pack_root: Path = REPO_ROOT) -> str:
    """The ``sys.modules`` name ComfyUI's ``load_custom_node`` gives a pack loaded from ``pack_root``."""
    return str(pack_root).replace(".", "_x_")


def load_pack(pack_root: Path = REPO_ROOT) -> ModuleType:
    """The pack at ``pack_root`` loaded the way ComfyUI loads ``custom_nodes/<pack>`` (once per process).

    Loading twice would execute the pack again under the same name and leave two sets of classes
    (adapters, councils) that no longer match each other, so an already loaded pack is returned.
    Call only after ``bootstrap_comfy``.
    """
    name = pack_module_name(pack_root)
    if name in sys.modules:
        return sys.modules[name]
    import nodes

    if not asyncio.run(nodes.load_custom_node(str(pack_root))):
        raise RuntimeError("ComfyUI failed to load the pack; see the log above")
    return sys.modules[name]
