"""Everything about a run that can be checked before a model loads: its output folder, free space, the
cache folder, and (for ``--check``) the data and the cache entries.

A training run costs hours of GPU time, so what would stop it later is found first, and ``python -m
training --check`` runs these same checks (everything but the GPU work itself) and fails where
training would. Nothing here writes, except ``claim_output`` once every check has passed.

The output folder belongs to one run. A fresh run into a folder that holds another run's files is
refused with the three ways out (``--resume latest``, another ``train.output_dir``, or ``--overwrite``,
which deletes that run's files first); this is what diffusers' and ai-toolkit's users meet as "resume
or pick a new folder", without their silent mixing of two runs. Only the files a run writes are ever
removed (``RUN_FILES`` and the adapter), never anything else the folder holds. The config.yaml of a run
is written only after its data has been checked, and atomically.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from instructmole.files import atomic_path

from .checkpoint import check_resumable, checkpoints, read_marker, resolve_resume
from .config import TrainConfig, resume_conflicts
from .errors import CheckpointError, ConfigError, ModelLoadError, TrainingError

__all__ = [
    "CONFIG_FILE",
    "METRICS_FILE",
    "RUN_FILES",
    "OutputPlan",
    "check_cache_entries",
    "check_space",
    "checkpoint_bytes",
    "claim_output",
    "plan_output",
    "preflight",
    "run_checks",
]

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
# What a run writes into its output folder, besides its adapter (``<save.name>.safetensors``).
RUN_FILES = (CONFIG_FILE, METRICS_FILE, "checkpoints", "reports", "samples", "logs")
_SLACK_BYTES = 64 << 20  # reports, samples, scheduler and RNG states, file-system overhead


@dataclass
class OutputPlan:
    """What the run will do with its output folder, decided before anything is written."""

    out: Path
    start: Path | None  # the checkpoint to resume from; None: step 0
    run: str  # the run's id, recorded in every checkpoint marker (pruning touches only its own)
    remove: list[Path] = field(default_factory=list)  # an earlier run's files (--overwrite)
    need_bytes: int = 0  # free space the first checkpoint and the adapter need


def _run_files(out: Path, config: TrainConfig) -> list[Path]:
    adapters = (config.save.name, f"{config.save.name}-ema")  # each with its card's hash and preview beside it
    names = (*RUN_FILES, *(f"{a}{ext}" for a in adapters for ext in (".safetensors", ".sha256", ".preview.png")))
    return [out / name for name in names if (out / name).exists() or (out / name).is_symlink()]


def _describe(out: Path, found: list[Path]) -> str:
    done = checkpoints(out)
    if done:
        return f"an earlier run (checkpoints up to step {done[-1][0]})"
    return f"an earlier run's files ({', '.join(p.name for p in found[:3])})"


def plan_output(config: TrainConfig, resume: str | None, overwrite: bool) -> OutputPlan:
    """Check the output folder for this run and decide where it starts; raises a ``ConfigError`` or
    ``CheckpointError`` naming the way out. Writes nothing."""
    out = Path(config.train.output_dir)
    if resume is not None and overwrite:
        raise ConfigError("--overwrite starts a new run and --resume continues one; pass only one of them")
    _check_folder(out, "train.output_dir")
    for name in ("checkpoints", "reports", "samples", "logs"):
        if (out / name).exists() and not (out / name).is_dir():
            raise ConfigError(
                f"train.output_dir: '{out / name}' is a file, but the run keeps its {name} there; move the file "
                "away or choose another train.output_dir"
            )
    found = _run_files(out, config) if out.is_dir() else []
    current = config.to_dict()
    start = resolve_resume(out, resume)
    if start is not None:
        saved = check_resumable(start, current, data=None)  # train() checks the data's fingerprint too
        run = str(saved.get("run") or "")
        others = sorted({str(read_marker(p).get("run") or "") for _, p in checkpoints(out)} - {run})
        foreign = found and not checkpoints(out) and not _same_run_config(out, current)
        if others or foreign:
            raise CheckpointError(
                f"train.output_dir '{out}' holds files of another run than {start}; continue that run there, or "
                "write this one into another train.output_dir"
            )
        return OutputPlan(out, start, run or uuid.uuid4().hex, need_bytes=checkpoint_bytes(config))
    plan = OutputPlan(out, None, uuid.uuid4().hex, need_bytes=checkpoint_bytes(config))
    if not found:
        return plan
    if overwrite:
        plan.remove = found
        return plan
    if resume == "latest" and not checkpoints(out) and _same_run_config(out, current):
        return plan  # the same run, stopped before its first checkpoint: it starts again
    raise CheckpointError(
        f"train.output_dir '{out}' holds {_describe(out, found)}; continue it with --resume latest, choose "
        "another train.output_dir, or pass --overwrite to delete that run's files and start again"
    )


def _same_run_config(out: Path, current: dict[str, Any]) -> bool:
    try:
        saved = yaml.safe_load((out / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(saved, dict) and not resume_conflicts(saved, current)


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_folder(folder: Path, key: str) -> None:
    """``folder`` is (or can be made) a writable folder; else ``ConfigError`` naming ``key``."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{key}: '{folder}' is a file, not a folder; choose a folder path")
    parent = _existing_parent(folder)
    if not parent.is_dir():
        raise ConfigError(f"{key}: '{folder}' cannot be made, since '{parent}' is a file; choose another path")
    reason = _unwritable(parent)
    if reason:
        raise ConfigError(f"{key}: '{parent}' is not writable ({reason}); choose a folder you can write to")


def _unwritable(folder: Path) -> str | None:
    """Why no file can be created in ``folder`` (None: one can); probed for real, since permission bits
    lie (root, ACLs, read-only mounts)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".imole-probe-", dir=folder)
    except OSError as err:
        return err.strerror or str(err)
    os.close(fd)
    os.unlink(name)
    return None


def checkpoint_bytes(config: TrainConfig) -> int:
    """Bytes one checkpoint and the final adapter take: the trainable weights in fp32, AdamW's two
    moments, and the adapter at ``save.dtype`` twice (in the checkpoint and as the run's adapter);
    with ``train.ema`` also its fp32 average and its adapter, twice.

    The trainable weights are counted on a transformer built on the meta device from the model's
    config (no weights are read); this also checks ``adapter.targets`` against the model."""
    from .families import _meta_transformer, recipe_of
    from .loading import SHIPPED_CONFIGS, _empty_weights
    from .modules import _lora_modules, build_mole_config

    m = config.model
    folder = Path(m.pretrained) if m.pretrained else SHIPPED_CONFIGS
    try:
        transformer = _meta_transformer(folder)  # the family's transformer class, from its config's _class_name
    except (OSError, ValueError, TypeError, KeyError, ModelLoadError):
        return 0  # the model's own loader names what is wrong with it; do not guess here
    from instructmole import InstructMoLE

    mole_config = build_mole_config(config, transformer)
    with _empty_weights():
        params = sum(p.numel() for p in InstructMoLE(mole_config).parameters())
    lora = config.adapter.lora
    if lora.rank > 0:
        for name in _lora_modules(transformer, recipe_of(mole_config.base_model).lora_targets(lora.targets)):
            linear = transformer.get_submodule(name)
            params += lora.rank * (linear.in_features + linear.out_features)
    export = {"bf16": 2, "fp16": 2, "fp32": 4}[config.save.dtype]
    copies = 4 if config.train.ema else 2  # the adapter (and its EMA), in the checkpoint and as the run's
    ema = 4 if config.train.ema else 0  # the EMA's fp32 average in the checkpoint's state
    return params * (4 + 8 + ema + copies * export) + _SLACK_BYTES


def check_space(folder: Path, need: int, key: str) -> None:
    """Free space for ``need`` bytes where ``folder`` is (or will be); ``ConfigError`` naming ``key`` if not."""
    try:
        free = shutil.disk_usage(_existing_parent(folder)).free
    except OSError:
        return  # no figure to check against; a failed write still reports itself
    if free < need:
        raise ConfigError(
            f"{key}: '{folder}' has {_size(free)} free, but one checkpoint and the adapter need about "
            f"{_size(need)}; free space or choose a folder on another disk"
        )


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def check_cache_dir(config: TrainConfig) -> None:
    """The feature cache folder is a folder (or can be made) that can be written."""
    _check_folder(config.cache_dir, "data.cache_dir")


def preflight(config: TrainConfig, resume: str | None, overwrite: bool) -> OutputPlan:
    """Every check that needs no model weights and writes nothing: output folder, space, cache folder."""
    plan = plan_output(config, resume, overwrite)
    check_space(plan.out, plan.need_bytes, "train.output_dir")
    check_cache_dir(config)
    return plan


def claim_output(plan: OutputPlan, config: TrainConfig) -> None:
    """Make the output folder this run's: remove an earlier run's files (``--overwrite`` only, after every
    check has passed) and write config.yaml atomically. Main process only."""
    for path in plan.remove:
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError as err:
            raise TrainingError(
                f"--overwrite could not delete '{path}' ({err.strerror or err}); delete it yourself or choose "
                "another train.output_dir"
            ) from None
    try:
        plan.out.mkdir(parents=True, exist_ok=True)
        with atomic_path(plan.out / CONFIG_FILE) as tmp:
            tmp.write_text(config.to_yaml(), encoding="utf-8")
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise ConfigError(f"train.output_dir: '{plan.out}' is on a full disk; free space and run again") from None
        raise ConfigError(
            f"train.output_dir: '{plan.out}' cannot be written ({err.strerror or err}); choose a folder you can "
            "write to"
        ) from None


def run_checks(config: TrainConfig, *, resume: str | None = None, overwrite: bool = False) -> list[str]:
    """``--check``: every check a run makes before its GPU work, in the same functions, so it fails
    exactly where training would; returns the report lines (bad rows skipped, cache state, plan).

    Beyond ``preflight``: the rows and every image (opened, hashed), the buckets and batches (and rows
    that cannot train), the sample references, the model files' fingerprints, the data a resumed
    checkpoint was trained on, and every cache entry this data would read (``check_cache_entries``)."""
    from .cache import FeatureCache
    from .loop import _batch_lines, _batch_order, _load_identity, _prepare_data, _sample_references

    plan = preflight(config, resume, overwrite)
    cache = FeatureCache(config.cache_dir, _load_identity(config), config.adapter.text_length)
    data = _prepare_data(config, cache)
    samples = _sample_references(config, cache)
    if plan.start is not None:
        check_resumable(plan.start, config.to_dict(), data.fingerprint())
    present, total = check_cache_entries(config, cache, data, samples)
    # Every bucket and its batches, as the run's start prints them (for one process: --check cannot know
    # how many a launcher will start; more processes only round the batches up to their multiple).
    lines = [*data.problems, *_batch_lines(_batch_order(config, data, 1), data)]
    where = "a fresh run" if plan.start is None else f"resuming from {plan.start}"
    if plan.remove:
        where += f", deleting the earlier run's {', '.join(p.name for p in plan.remove)} first (--overwrite)"
    lines.append(
        f"config OK; {len(data.train)} training and {len(data.holdout)} held-out rows usable, "
        f"{len(data.problems)} skipped; {present} of {total} features cached in {cache.root}; "
        f"{where} in {plan.out} (about {_size(plan.need_bytes)} per checkpoint)"
    )
    return lines


def check_cache_entries(config: TrainConfig, cache: Any, data: Any, samples: dict) -> tuple[int, int]:
    """``(present, needed)``: the cache entries the run will read, each one already there checked to open
    (its header, not its tensors), since the run would skip encoding it and then fail at its first read.

    ``cache``: the run's ``FeatureCache``; ``data``: its ``loop.Dataset``; ``samples``: the sample
    references' (content hash, bucket)."""
    texts = {r.instruction for r in data.rows} | {""} | {item.instruction for item in config.sample.items}
    keys = [cache.text_key(t) for t in sorted(texts)]
    images = {(data.digests[p], data.sizes[i]) for i, r in enumerate(data.rows) for p in (r.target, *r.references)}
    images |= set(samples.values())
    keys += [cache.latent_key(digest, size) for digest, size in sorted(images)]
    present = [k for k in keys if cache.has(k)]
    for key in present:
        _check_entry(cache.path(key))
    return len(present), len(keys)


def _check_entry(path: Path) -> None:
    """A cache entry opens as safetensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise ConfigError(
            f"data.cache_dir: the cache entry {path} is damaged ({_one(err)}); delete it and it will be encoded again"
        ) from None


def _one(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 100 else text[:97] + "..."
