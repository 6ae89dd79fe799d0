"""The feature cache: keys that change with everything that changes the features, and two processes
simulated faithfully with two threads: the main process's list of missing entries is the one every
process splits, even when the other process looks at the cache after the main one has started
writing (the race that once left entries unencoded)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from types import SimpleNamespace

import torch

import training.loop as loop
from tests.training.conftest import TINY_CONFIG, run_overrides
from training.cache import FeatureCache
from training.config import load_config


class FakeAccelerator:
    """What ``_build_cache`` uses of accelerate's ``Accelerator``, for one of two thread-"processes"."""

    def __init__(self, rank: int, barrier: threading.Barrier) -> None:
        self.process_index, self.num_processes, self.barrier = rank, 2, barrier
        self.is_main_process, self.device = rank == 0, torch.device("cpu")

    def wait_for_everyone(self) -> None:
        self.barrier.wait(timeout=60)


class Module:
    def to(self, *_):
        return self

    def eval(self):
        return self


def test_every_process_splits_the_main_process_list(tiny_kontext, tmp_path, monkeypatch):
    import accelerate.utils

    config = load_config(TINY_CONFIG, run_overrides(tiny_kontext, tmp_path / "run", f"data.cache_dir={tmp_path / 'c'}"))
    identity = loop._load_identity(config)
    data = loop._prepare_data(config, FeatureCache(config.cache_dir, identity, config.adapter.text_length))

    barrier, shared = threading.Barrier(2), {}
    first_write = threading.Event()
    writes: Counter = Counter()
    lock = threading.Lock()

    def broadcast_object_list(box):  # a collective: both "processes" take part, the main one's value wins
        if threading.current_thread().name == "rank0":
            shared["box"] = list(box)
        barrier.wait(timeout=60)
        box[:] = shared["box"]
        barrier.wait(timeout=60)

    def fake_encode(items, *, write, progress=lambda n: None, **_):
        for item in items:
            time.sleep(0.002)
            write(item, {"x": torch.zeros(1)})
            with lock:
                writes[(threading.current_thread().name, repr(item))] += 1
            first_write.set()

    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", broadcast_object_list)
    parts = SimpleNamespace(t5=Module(), clip=Module(), vae=Module(), t5_tokenizer=None, clip_tokenizer=None)
    monkeypatch.setattr(loop, "_load", lambda *a, **k: parts)
    monkeypatch.setattr(loop, "encode_texts", fake_encode)
    monkeypatch.setattr(loop, "encode_latents", fake_encode)

    errors, written = [], {}

    def process(rank: int) -> None:
        try:
            if rank == 1:  # this process looks at the cache late: after the main one wrote, if it could
                first_write.wait(timeout=1.0)
            cache = FeatureCache(config.cache_dir, identity, config.adapter.text_length)  # its own reader
            written[rank] = loop._build_cache(FakeAccelerator(rank, barrier), config, cache, data, {})
        except Exception as err:  # reported below, with the thread's name
            errors.append(f"rank {rank}: {err!r}")
            barrier.abort()

    threads = [threading.Thread(target=process, args=(r,), name=f"rank{r}") for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors

    cache = FeatureCache(config.cache_dir, identity, config.adapter.text_length)
    texts = {r.instruction for r in data.rows} | {""}
    keys = {cache.text_key(t) for t in texts}
    images = {(data.digests[p], data.sizes[i]) for i, r in enumerate(data.rows) for p in (r.target, *r.references)}
    keys |= {cache.latent_key(digest, size) for digest, size in images}
    missing = [k for k in keys if not cache.has(k)]
    assert not missing, f"{len(missing)} of {len(keys)} entries were encoded by nobody"
    items = Counter(item for _, item in writes)
    assert max(items.values()) == 1 and len(items) == len(keys)  # each entry encoded exactly once ...
    assert min(written.values()) > 0 and sum(written.values()) == len(keys)  # ... by one of the two processes


def test_cache_keys_change_with_everything_that_changes_the_features(tiny_kontext, tmp_path):
    def keys(*extra: str) -> tuple[str, str]:
        config = load_config(TINY_CONFIG, run_overrides(tiny_kontext, tmp_path / "run", *extra))
        cache = FeatureCache(tmp_path / "c", loop._load_identity(config), config.adapter.text_length)
        return cache.text_key("make it warmer"), cache.latent_key("ab" * 32, (32, 32))

    fp32 = keys()  # the tiny config's model.dtype
    assert keys() == fp32  # stable
    bf16 = keys("model.dtype=bf16")
    assert bf16[0] != fp32[0] and bf16[1] != fp32[1]  # bf16 features are not fp32 features
    longer = keys("adapter.text_length=64")
    assert longer[0] != fp32[0] and longer[1] == fp32[1]  # the T5 padding changes text features only
    cache = FeatureCache(tmp_path / "c", {"t5": "a", "clip": "b", "vae": "c", "dtype": "fp32"}, 32)
    other_vae = FeatureCache(tmp_path / "c", {"t5": "a", "clip": "b", "vae": "d", "dtype": "fp32"}, 32)
    assert cache.text_key("x") == other_vae.text_key("x") and cache.latent_key("e", (32, 32)) != other_vae.latent_key(
        "e", (32, 32)
    )
    assert cache.latent_key("e", (32, 32)) != cache.latent_key("e", (32, 48))
