"""The loaders follow the adapter file's content, not only its modification time."""

from __future__ import annotations

import os
import shutil

from tests.helpers import random_adapter


def test_replaced_file_with_its_old_mtime_is_reloaded(setup, tmp_path):
    """``cp -p`` / ``rsync -t`` keep the old modification time: the loaders must still see the new file
    (ComfyUI re-runs them because their fingerprint changes) and serve the new adapter, keeping one
    version of a path in memory."""
    import folder_paths

    common, loaders = setup["nodes"].common, setup["nodes"].loaders
    path = os.path.join(folder_paths.get_folder_paths("instructmole")[0], "replaced.safetensors")
    random_adapter(setup["transformer"], seed=31).save(path)
    first = common.load_adapter_input("test", "replaced.safetensors").adapter_id
    before = loaders.LoadAdapter.fingerprint_inputs(adapter="replaced.safetensors", lora_strength=1.0)
    assert loaders.AdapterFile.fingerprint_inputs(adapter="replaced.safetensors") == before  # stable
    stat = os.stat(path)
    newer = random_adapter(setup["transformer"], seed=32).save(tmp_path / "newer.safetensors")
    shutil.copyfile(newer, path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as cp -p leaves it
    assert os.stat(path).st_mtime_ns == stat.st_mtime_ns and os.stat(path).st_size == stat.st_size
    assert loaders.LoadAdapter.fingerprint_inputs(adapter="replaced.safetensors") != before
    second = common.load_adapter_input("test", "replaced.safetensors")
    assert second.adapter_id != first
    assert second.adapter_id == random_adapter(setup["transformer"], seed=32).adapter_id
    assert sum(1 for p in common._ADAPTERS._entries if p == path) == 1
    assert common.load_adapter_input("test", "replaced.safetensors") is second  # unchanged file: cached
