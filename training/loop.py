"""The training run: data checks, feature cache, model set-up, the accelerate loop, checkpoints.

``train(config)`` is the importable entry point (``python -m training`` is a thin CLI over it).
It works the same on one CPU, one GPU, and N processes under ``accelerate launch`` or
``torchrun``: ``train.batch_size`` is the global batch, each process takes an equal contiguous
share of every global micro-batch, and every random draw is a function of (seed, step, sample).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from instructmole import InstructMoLE, InstructMoLEError
from instructmole.card import copy_sealed, seal
from instructmole.files import atomic_path
from instructmole.runtime import StepRouting

from .buckets import BucketBatches, buckets_for, nearest_bucket
from .cache import FeatureCache, ImageJob, encode_latents, encode_masks, encode_texts
from .checkpoint import EMA, TrainState, adapter_card, check_resumable, install_state_hooks, save_checkpoint
from .config import TrainConfig
from .data import Row, check_rows, image_size, read_rows
from .errors import CheckpointError, DataError, TrainingError
from .evaluate import Evaluator, model_inputs, render_samples
from .families import FamilyParts, KontextRecipe, recipe_for, recipe_of_model
from .fsdp import autocast_forward, check_launch, install_state, is_sharded, root_unsharded, snapshot
from .fsdp import plugin as fsdp_plugin
from .loading import KontextParts
from .modules import DTYPES, TrainingModel, build_mole_config, setup_transformer
from .offload import BlockSwap
from .optim import build_optimizer
from .plan import plan_for_device
from .preflight import METRICS_FILE, OutputPlan, check_cache_entries, claim_output, preflight
from .quantize import quantized_buffer_names
from .recipe import MicroBatch, MicroBatches, aux_weight, lr_scheduler

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["CheckpointRecord", "RunResult", "train"]


@dataclass
class RunResult:
    adapter: Path  # the final adapter file
    steps: int
    output_dir: Path
    model: TrainingModel  # the trained module (this process's copy), for programmatic use
    cache_entries_written: int  # by this process: 0 when every feature came from the cache
    evaluator: Evaluator | None = None  # the run's routing report inputs (its councils: ``Evaluator.councils``)


def _say(accelerator: Any, message: str) -> None:
    if accelerator.is_main_process:
        print(message, file=sys.stderr, flush=True)


# ---- data -------------------------------------------------------------------------------------


@dataclass
class Dataset:
    rows: list[Row]
    sizes: list[tuple[int, int]]  # bucket (width, height) per row
    digests: dict[Path, str]  # content hash per image path
    train: list[int]
    holdout: list[int]
    problems: list[str]

    def fingerprint(self) -> str:
        """A hash of what was trained on (instructions, splits and image contents), for the adapter."""
        h = hashlib.sha256()
        for r in self.rows:
            h.update(json.dumps([r.instruction, r.split, r.task, self.digests[r.target]]).encode())
            h.update(json.dumps([self.digests[p] for p in r.references]).encode())
            if r.mask is not None:  # rows without one hash as before: earlier checkpoints still resume
                h.update(json.dumps(["mask", self.digests[r.mask]]).encode())
        return h.hexdigest()[:16]


def _prepare_data(config: TrainConfig, cache: FeatureCache) -> Dataset:
    d = config.data
    rows = read_rows(d.manifest)
    checked = check_rows(rows, min_side=d.min_side, max_references=d.max_references, on_error=d.on_error)
    rows = checked.rows
    buckets = buckets_for(d.resolution * d.resolution)
    sizes = [nearest_bucket(*image_size(r.target), buckets) for r in rows]
    images = {p for r in rows for p in (r.target, *r.references)}
    digests = cache.content_hashes(images | {r.mask for r in rows if r.mask is not None})
    train = [i for i, r in enumerate(rows) if r.split == "train"]
    holdout = [i for i, r in enumerate(rows) if r.split == "holdout"]
    if not train:
        raise DataError(f"{d.manifest} has no rows with split=train (all {len(rows)} are held out)")
    return Dataset(rows, sizes, digests, train, holdout, checked.problems)


def _batch_order(config: TrainConfig, data: Dataset, world: int) -> BucketBatches:
    """The optimizer steps' batches of the training rows, grouped by (bucket, reference count)."""
    t = config.train
    keys = [(data.sizes[i], len(data.rows[i].references)) for i in data.train]
    return BucketBatches(keys, t.batch_size, t.seed, multiple=t.gradient_accumulation * world)


def _batch_lines(batches: BucketBatches, data: Dataset) -> list[str]:
    """What trains each epoch (every bucket, its rows and batches) and the rows that never train, and why:
    printed at the start of a run and by ``--check``. Bad rows skipped by the data checks have their
    own lines (``data.problems``)."""

    def label(key: tuple) -> str:
        (width, height), references = key
        return f"{width}x{height} px, {references} reference{'s' if references != 1 else ''}"

    lines = batches.summary(label)
    if data.holdout:
        lines.append(f"{len(data.holdout)} held-out rows (split=holdout) never train: they measure the routing report")
    return lines


def _broadcast(accelerator: Any, make: Any) -> Any:
    """``make()`` on the main process, the result on every process (one set of file reads)."""
    from accelerate.utils import broadcast_object_list

    box = [None]
    if accelerator.is_main_process:
        try:
            box[0] = ("ok", make())
        except InstructMoLEError as err:  # a user's mistake (TrainingError or ConfigError): every process raises it
            box[0] = ("error", err)
    if accelerator.num_processes > 1:
        broadcast_object_list(box)
    status, value = box[0]
    if status == "error":
        raise value
    return value


# ---- models -----------------------------------------------------------------------------------


def _load(config: TrainConfig, parts: tuple[str, ...], dtype: torch.dtype) -> KontextParts | FamilyParts:
    """The asked-for parts of the family's model (``Recipe.load``; Kontext: ``loading.py``)."""
    return recipe_for(config).load(config, parts, dtype)


def _latent_norm(config: TrainConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """The family's latent normalisation (Kontext: ``LatentNorm`` from the VAE's config)."""
    return recipe_for(config).latent_norm(config)


def _build_cache(
    accelerator: Any, config: TrainConfig, cache: FeatureCache, data: Dataset, samples: dict[Path, tuple[str, tuple]]
) -> int:
    """Encode what the cache lacks, split between the processes; encoders are freed afterwards.

    The main process alone decides what is missing, and every process splits that one list: lists
    each process made for itself could differ (another process may already have written some
    entries), leaving entries that nobody encodes. Writes are atomic renames, and every process
    waits at the end until all entries are on disk, so none reads an entry still being written.

    ``samples``: the sample items' references (content hash, bucket); their instructions are cached too.
    """
    extra = {item.instruction for item in config.sample.items}
    texts = sorted({r.instruction for r in data.rows} | {""} | extra)
    images = {
        ImageJob(path, data.digests[path], data.sizes[i])
        for i, row in enumerate(data.rows)
        for path in (row.target, *row.references)
    }
    images |= {ImageJob(path, digest, size) for path, (digest, size) in samples.items()}
    jobs = sorted(images, key=lambda j: (j.digest, j.size))
    masks = sorted(
        {ImageJob(r.mask, data.digests[r.mask], data.sizes[i]) for i, r in enumerate(data.rows) if r.mask is not None},
        key=lambda j: (j.digest, j.size),
    )
    masks = _broadcast(accelerator, lambda: [j for j in masks if not cache.has(cache.mask_key(j.digest, j.size))])
    my_masks = masks[accelerator.process_index :: accelerator.num_processes]
    encode_masks(my_masks, write=lambda job, tensors: cache.write(cache.mask_key(job.digest, job.size), tensors))
    texts, jobs = _broadcast(
        accelerator,
        lambda: (
            [t for t in texts if not cache.has(cache.text_key(t))],
            [j for j in jobs if not cache.has(cache.latent_key(j.digest, j.size))],
        ),
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    my_texts, my_jobs = texts[rank::world], jobs[rank::world]
    written = 0
    if texts or jobs:
        _say(accelerator, f"caching {len(texts)} instructions and {len(jobs)} images in {cache.root}")
    if my_texts or my_jobs:
        recipe = recipe_for(config)
        need = (recipe.text_parts if my_texts else ()) + (("vae",) if my_jobs else ())
        parts = _load(config, need, DTYPES[config.model.dtype])
        device = accelerator.device
        bar = _bar(accelerator, len(texts) + len(jobs), "caching", config.log.progress)
        if my_texts:
            for part in recipe.text_parts:  # Kontext: T5 and CLIP; the chat-LLM families: their LLM
                getattr(parts, "text_encoder" if part == "text" else part).to(device).eval()

            def write_text(text, tensors):
                cache.write(cache.text_key(text), tensors)

            how = {
                "text_length": config.adapter.text_length,
                "batch_size": config.data.encode_batch_size,
                "write": write_text,
                "progress": lambda n: bar.update(n * world),
            }
            if isinstance(recipe, KontextRecipe):  # T5 padded to text_length, CLIP pooled
                t5, clip = (parts.t5, parts.t5_tokenizer), (parts.clip, parts.clip_tokenizer)
                encode_texts(my_texts, t5=t5[0], t5_tokenizer=t5[1], clip=clip[0], clip_tokenizer=clip[1], **how)
            else:  # the chat-LLM families: conditioning and the router's masked signal (``families.py``)
                recipe.encode_texts(parts, my_texts, **how)
        if my_jobs:
            parts.vae.to(device).eval()
            encode_latents(
                my_jobs,
                vae=parts.vae,
                batch_size=config.data.encode_batch_size,
                write=lambda job, tensors: cache.write(cache.latent_key(job.digest, job.size), tensors),
                progress=lambda n: bar.update(n * world),
                posterior=recipe.posterior,
            )
        bar.close()
        written = len(my_texts) + len(my_jobs)
        del parts  # the encoders leave memory before the transformer arrives
        _free(device)
    accelerator.wait_for_everyone()
    return written + len(my_masks)


def _sample_references(config: TrainConfig, cache: FeatureCache) -> dict[Path, tuple[str, tuple[int, int]]]:
    """Each sample reference's content hash and bucket (its own aspect ratio, the data's pixel budget)."""
    paths = sorted({Path(p) for item in config.sample.items for p in item.references})
    if not paths:
        return {}
    buckets = buckets_for(config.data.resolution * config.data.resolution)
    digests = cache.content_hashes(paths)
    return {p: (digests[p], nearest_bucket(*image_size(p), buckets)) for p in paths}


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _bar(accelerator: Any, total: int, desc: str, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not (enabled and accelerator.is_main_process),
        dynamic_ncols=True,
        smoothing=0.05,
        mininterval=0.5 if sys.stderr.isatty() else 30,  # a log file gets a line every 30 s, not every step
    )


# ---- the run ----------------------------------------------------------------------------------


def _accelerator(config: TrainConfig) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    t = config.train
    out = Path(t.output_dir)
    trackers = config.log.trackers
    if trackers is None:
        try:
            import tensorboard  # noqa: F401

            trackers = ["tensorboard"]
        except ImportError:
            trackers = []
    # torchrun on a machine without CUDA: accelerate runs the processes as one gloo group (MULTI_CPU)
    # only when told to use the CPU; otherwise every process would train alone on the whole batch.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = launched and not torch.cuda.is_available()
    return Accelerator(
        cpu=cpu,
        mixed_precision=t.mixed_precision,
        gradient_accumulation_steps=t.gradient_accumulation,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        step_scheduler_with_optimizer=False,  # one scheduler step per optimizer step, whatever the process count
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        fsdp_plugin=fsdp_plugin() if t.fsdp else None,  # training/fsdp.py; replaces a config file's fsdp_config
    )


def _marker(config: TrainConfig, data: Dataset, plan: OutputPlan) -> dict[str, Any]:
    """What a checkpoint records of its run: the run's id (pruning), the whole config and the data's
    fingerprint (a resume checks both, see ``checkpoint.check_resumable``)."""
    return {"run": plan.run, "config": config.to_dict(), "data": data.fingerprint()}


def train(config: TrainConfig, *, resume: str | None = None, overwrite: bool = False) -> RunResult:
    """Train an adapter as ``config`` says; ``resume``: ``"latest"`` or a checkpoint folder.

    ``overwrite``: a fresh run into a folder that holds an earlier run deletes that run's files first
    (after every check has passed); without it such a folder is refused (``preflight.plan_output``)."""
    with cudnn_attention_restored():
        return _train(config, resume=resume, overwrite=overwrite)


@contextlib.contextmanager
def cudnn_attention_restored() -> Iterator[None]:
    """Training turns cuDNN's SDPA off on CUDA (its backward failed on our H100s); whatever the caller's
    process had is restored afterwards, so a notebook's later attention is not changed by a run."""
    enabled = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(enabled)


def _train(config: TrainConfig, *, resume: str | None, overwrite: bool) -> RunResult:
    accelerator = _accelerator(config)
    t = config.train
    out = Path(t.output_dir)
    if accelerator.device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)  # its SDPA backward failed on our H100s
    world = accelerator.num_processes
    check_launch(accelerator, t.fsdp)  # the launcher's sharding and train.fsdp agree
    if int(os.environ.get("WORLD_SIZE", "1")) != world:
        raise TrainingError(
            f"{os.environ['WORLD_SIZE']} processes were launched but accelerate formed a group of {world}; "
            "check the launcher's environment (MASTER_ADDR, RANK) or run accelerate config"
        )
    micro_global = t.batch_size // t.gradient_accumulation
    if micro_global % world:
        raise TrainingError(
            f"train.batch_size / train.gradient_accumulation = {micro_global} samples per micro-batch do not divide "
            f"among {world} processes; make it a multiple of {world}"
        )
    plan = _broadcast(accelerator, lambda: preflight(config, resume, overwrite))  # checks; writes nothing
    recipe = _broadcast(accelerator, lambda: recipe_for(config))  # the family: what is loaded, cached and fed

    # 1. data and cache
    identity = _load_identity(config)
    cache = FeatureCache(config.cache_dir, identity, config.adapter.text_length)
    data = _broadcast(accelerator, lambda: _prepare_data(config, cache))
    if data.problems:
        _say(accelerator, f"skipped {len(data.problems)} bad rows (data.on_error=skip); first: {data.problems[0]}")
    samples = _broadcast(accelerator, lambda: _sample_references(config, cache))
    _broadcast(accelerator, lambda: check_cache_entries(config, cache, data, samples))  # none damaged
    _broadcast(accelerator, lambda: claim_output(plan, config))  # the data is good: the folder is this run's
    _say(accelerator, f"{world} process(es) on {accelerator.device} ({accelerator.distributed_type})")
    written = _build_cache(accelerator, config, cache, data, samples)
    vae = None
    if config.sample.items and accelerator.is_main_process:  # decodes the samples at each checkpoint
        vae = _load(config, ("vae",), DTYPES[config.model.dtype]).vae.to(accelerator.device).eval()
    batches = _batch_order(config, data, world)
    for line in _batch_lines(batches, data):
        _say(accelerator, line)
    norm = _latent_norm(config)

    # 2. model
    if accelerator.device.type == "cuda" and accelerator.is_main_process and recipe.key == KontextRecipe.key:
        # what the planner expects of this card (it traces FLUX.1's transformer)
        references = max((len(data.rows[i].references) for i in data.train), default=1)
        _say(accelerator, plan_for_device(config, accelerator.device, references=references, processes=world))
    dtype = DTYPES[config.model.dtype]
    transformer = _load(config, ("transformer",), dtype).transformer
    mole_config = build_mole_config(config, transformer, recipe_of_model(transformer, recipe.key))
    with torch.random.fork_rng(devices=[]):  # the initial adapter: the same in every run and process
        torch.manual_seed(t.seed)
        lora_modules = setup_transformer(transformer, config, mole_config, accelerator.device)
        mole = InstructMoLE(mole_config, init=config.adapter.expert_init)  # fp32
    lora = config.adapter.lora
    model = TrainingModel(
        transformer, mole, lora_modules, lora.alpha if lora.alpha is not None else lora.rank, recipe=recipe
    )
    if config.model.block_swap:  # after the base is frozen, quantized and has its LoRA; prepare moves the rest
        swap = BlockSwap(transformer, config.model.block_swap, accelerator.device)
        away = f"{len(swap.blocks)} blocks ({swap.swapped_bytes / 2**30:.2f} GiB)"
        _say(accelerator, f"block swap: the frozen weights of {away} wait in CPU memory")
    model.train()
    groups = model.parameter_groups(t.lr, t.gate_lr, t.weight_decay)
    optimizer = build_optimizer(t.optimizer, groups, tuple(t.betas), t.weight_decay)
    scheduler = lr_scheduler(optimizer, t.lr_schedule, t.warmup_steps, t.max_steps)
    if world > 1:  # the frozen base is the same file on every process: never broadcast or reduce it
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad] + quantized_buffer_names(model)
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    install_state_hooks(accelerator, accelerator.unwrap_model)
    if is_sharded(model):  # FSDP: checkpoints of the trainable weights only, the forward under autocast
        install_state(accelerator, model, optimizer)
        autocast_forward(accelerator, model)
    inner: TrainingModel = accelerator.unwrap_model(model)
    ema = EMA(inner.trainable_state(), t.ema) if t.ema else None
    if ema is not None:  # after TrainState: earlier checkpoints' custom state keeps its number
        accelerator.register_for_checkpointing(ema)
    marker = _marker(config, data, plan)

    start = plan.start
    if start is not None:
        step = check_resumable(start, marker["config"], marker["data"])["step"]
        accelerator.load_state(str(start))
        _say(accelerator, f"resumed from {start} (step {state.step})")
        if state.step != step:
            raise CheckpointError(f"{start}: its state says step {state.step} but its marker says {step}")
    elif resume == "latest":
        _say(accelerator, f"no checkpoint in {out / 'checkpoints'} yet: starting from step 0")

    # 3. loop
    mb_data = MicroBatches(
        config,
        data.rows,
        data.sizes,
        data.digests,
        _TrainView(batches, data.train),
        cache,
        norm,
        rank=accelerator.process_index,
        world=world,
        recipe=recipe,
    )
    input_dtype = torch.float32 if t.mixed_precision != "no" else dtype
    evaluator = Evaluator(
        inner,
        mb_data,
        data.train,
        data.holdout,
        config.save.report_rows,
        max(micro_global // world, 1),
        accelerator.device,
        input_dtype,
        t.mixed_precision,
        vae,
    )
    record = CheckpointRecord(
        accelerator=accelerator,
        config=config,
        state=state,
        model=inner,
        evaluator=evaluator,
        marker=marker,
        data=data,
        samples=samples,
        ema=ema,
    )
    metrics_path = out / METRICS_FILE
    if accelerator.is_main_process:
        _trim_metrics(metrics_path, state.step)
        if config.save.report and state.step == 0:
            _write_report(evaluator, 0, (out / "reports", "step-0000000"))
    accelerator.wait_for_everyone()
    if accelerator.log_with:
        accelerator.init_trackers("instructmole", config=_flat_hparams(config))

    loader = torch.utils.data.DataLoader(
        mb_data,
        batch_size=None,
        sampler=range(state.step * t.gradient_accumulation, t.max_steps * t.gradient_accumulation),
        num_workers=config.data.workers,
        persistent_workers=False,
        prefetch_factor=2 if config.data.workers else None,
    )
    decay = t.aux_decay_steps or t.max_steps
    bar = _bar(accelerator, t.max_steps, "training", config.log.progress, initial=state.step)
    sums: dict[str, float] = {}
    count, tick = 0, time.perf_counter()
    final_adapter = None
    params = [p for p in model.parameters() if p.requires_grad]
    first_step = state.step
    for mb, routing in _routed_steps(accelerator, inner, loader, t.gradient_accumulation, input_dtype):
        with accelerator.accumulate(model):
            outputs = model(
                **model_inputs(mb, accelerator.device, input_dtype, t.guidance),
                aux_reduction=t.aux_reduction,
                distributed=world > 1,
                step_routing=routing,
                weight=None if mb.weight is None else mb.weight.to(accelerator.device),  # masked rows
            )
            w = aux_weight(state.step, decay)
            flow = outputs["flow"].mean()
            aux = (
                t.load_balance * outputs["load_balance"]
                + t.load_balance_token * outputs["load_balance_token"]
                + t.orthogonality * outputs["orthogonality"]
            )
            loss = flow + w * aux
            _check_finite(accelerator, loss, outputs, state.step, lambda: _save(record))
            accelerator.backward(loss)
            if accelerator.sync_gradients and t.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, t.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        for key in ("flow", "load_balance", "load_balance_token", "orthogonality"):
            sums[key] = sums.get(key, 0.0) + float(outputs[key].detach().mean())
        count += 1
        if not accelerator.sync_gradients:
            continue
        scheduler.step()
        state.step += 1
        if accelerator.device.type == "cuda" and state.step == first_step + 1:  # to compare with the plan
            peak = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
            _say(accelerator, f"GPU memory: {peak:.2f} GiB allocated at the peak of the first step (process 0)")
        if ema is not None:
            ema.update(inner.trainable_state())
        bar.update(1)
        if state.step % config.log.every == 0 or state.step == t.max_steps:
            line = _log_line(accelerator, sums, count, state.step, w, optimizer, time.perf_counter() - tick)
            bar.set_postfix({k: f"{line[k]:.4f}" for k in ("flow", "load_balance", "orthogonality")}, refresh=False)
            if accelerator.is_main_process:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(line) + "\n")
            accelerator.log(line, step=state.step)
            sums, count, tick = {}, 0, time.perf_counter()
        if state.step % config.save.every == 0 or state.step == t.max_steps:
            final_adapter = _save(record)
    bar.close()
    if final_adapter is None:  # resumed at the end: nothing left to train
        final_adapter = _adapter_path(out / "checkpoints" / f"step-{state.step:07d}", config, state.step)
    result = out / f"{config.save.name}.safetensors"
    if accelerator.is_main_process and final_adapter.is_file():
        copy_sealed(final_adapter, result)  # with its preview and its own .sha256
        final_ema = final_adapter.with_name(_adapter_path(final_adapter.parent, config, state.step, "-ema").name)
        if ema is not None and final_ema.is_file():
            copy_sealed(final_ema, out / f"{config.save.name}-ema.safetensors")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return RunResult(result, state.step, out, inner, written, evaluator)


class _TrainView:
    """``BucketBatches`` over the training rows, speaking manifest row numbers."""

    def __init__(self, batches: BucketBatches, train: list[int]) -> None:
        self.inner, self.train = batches, train

    def position(self, micro: int) -> tuple[int, int]:
        return self.inner.position(micro)

    def epoch(self, e: int) -> list[list[int]]:
        return [[self.train[i] for i in batch] for batch in self.inner.epoch(e)]


def _routed_steps(
    accelerator: Any, inner: TrainingModel, loader: Any, micro_batches: int, dtype: torch.dtype
) -> Iterator[tuple[MicroBatch, StepRouting | None]]:
    """The loader's micro-batches, each with the instruction routing of its whole optimizer step.

    The load-balancing loss is defined over the batch of one optimizer step. Under gradient
    accumulation a micro-batch alone can hold a single row, whose routing scores balanced and
    collapsed routers alike; so the step's rows are routed first (no gradient: the router alone,
    with each row's own draws, exactly as its forward will route it), their counts added over the
    micro-batches and processes, and each micro-batch's term uses that step-level ``f``
    (``StepRouting``). The loader starts at a step boundary, so its items group into steps.
    """
    step: list[MicroBatch] = []
    for mb in loader:
        step.append(mb)
        if len(step) < micro_batches:
            continue
        routing = _step_routing(accelerator, inner, step, dtype)
        for item in step:
            yield item, routing
        step = []


def _step_routing(
    accelerator: Any, inner: TrainingModel, step: list[MicroBatch], dtype: torch.dtype
) -> StepRouting | None:
    """Routing counts and rows of one optimizer step over all processes (None: no instruction layer)."""
    if not inner.mole.config.instruction_layers:
        return None
    device = accelerator.device
    route = inner.handle.runtime.routing_counts  # the signal as the forward's router reads it (``model_inputs``)

    def counts_of(mb: MicroBatch) -> torch.Tensor:
        if mb.route_mask is None:  # Kontext: T5 features and CLIP pooled
            return route(mb.text.to(device, dtype), mb.pooled.to(device, dtype), mb.seeds)
        text = mb.text if mb.route_text is None else mb.route_text  # the chat-LLM families: the masked signal
        return route(text.to(device, dtype), None, mb.seeds, mb.route_mask.to(device))

    with root_unsharded(inner):  # FSDP: the router's weights gathered (every process routes its rows)
        counts = sum(counts_of(mb) for mb in step)
    rows = counts.new_tensor([float(sum(len(mb.rows) for mb in step))])
    total = torch.cat([counts.flatten(), rows])
    if accelerator.num_processes > 1:
        total = accelerator.reduce(total, "sum")
    return StepRouting(total[:-1].view_as(counts), int(total[-1]), len(step))


def _load_identity(config: TrainConfig) -> dict[str, str]:
    """The cache's identity of the encoders: their files' fingerprints and the dtype they run in."""
    return {**_load(config, (), DTYPES[config.model.dtype]).identity, "dtype": config.model.dtype}


def _adapter_path(folder: Path, config: TrainConfig, step: int, kind: str = "") -> Path:
    """``kind``: "" for the adapter, "-ema" for its EMA (``train.ema``)."""
    return folder / f"{config.save.name}{kind}-step{step:07d}.safetensors"


@dataclass(frozen=True)
class CheckpointRecord:
    """What every checkpoint of a run is written from, gathered once the run is set up: ``_save`` (at
    each ``save.every``, at the end, and before a non-finite loss stops the run) takes this one
    argument. ``state`` is the run's live step counter: a save writes the step it holds then."""

    accelerator: Accelerator
    config: TrainConfig
    state: TrainState
    model: TrainingModel  # unwrapped: its adapter is exported
    evaluator: Evaluator  # the routing reports, and the samples' VAE and cache
    marker: dict[str, Any]  # ``_marker``: the run's id, config and data fingerprint, which a resume checks
    data: Dataset
    samples: dict[Path, tuple[str, tuple[int, int]]]  # ``_sample_references``: the sample images
    ema: EMA | None = None  # ``train.ema``: its weights are exported beside the adapter

    @property
    def out(self) -> Path:
        return Path(self.config.train.output_dir)


def _save(record: CheckpointRecord) -> Path:
    """A checkpoint of the run now (state, adapter, report, samples); returns its adapter file."""
    accelerator, config, out, step = record.accelerator, record.config, record.out, record.state.step
    inner, evaluator, data, samples = record.model, record.evaluator, record.data, record.samples
    if is_sharded(inner):  # FSDP: the trainable weights gathered whole (every process), exported by process 0
        inner = snapshot(inner)

    def extras(folder: Path) -> None:
        meta = {
            "source": "instructmole trainer",
            "training": json.dumps(
                {"steps": step, "data": data.fingerprint(), "rows": len(data.train), "config": config.to_dict()}
            ),
        }
        family, base = inner.mole.config.base_model, _load_identity(config)
        card = adapter_card(config, data, step, family, base)
        adapter_file = _adapter_path(folder, config, step)
        inner.export({**meta, **card}).save(adapter_file, dtype=DTYPES[config.save.dtype])
        if record.ema is not None:
            with record.ema.applied(inner):
                ema_meta = {**meta, **adapter_card(config, data, step, family, base, record.ema.decay)}
                ema_meta["ema"] = str(record.ema.decay)
                ema_path = _adapter_path(folder, config, step, "-ema")
                inner.export(ema_meta).save(ema_path, dtype=DTYPES[config.save.dtype])
            seal(ema_path)  # no preview: the samples show the live weights, not their average
        if config.save.report:  # in the checkpoint, and in reports/ (kept when checkpoints are pruned)
            _write_report(evaluator, step, (folder, "report"), (out / "reports", f"step-{step:07d}"))
        if config.sample.items:
            s = config.sample
            sheet = render_samples(
                inner,
                evaluator.vae,
                evaluator.data.cache,
                s.items,
                samples,
                evaluator.data.norm,
                steps=s.steps,
                guidance=s.guidance,
                seed=s.seed,
            )
            sheet.save(folder / "samples.png")
            (out / "samples").mkdir(exist_ok=True)
            sheet.save(out / "samples" / f"step-{step:07d}.png")
        seal(adapter_file, preview=folder / "samples.png")  # tensor hash in the card, .sha256, preview

    final = save_checkpoint(accelerator, out, step, config.save.keep, {**record.marker, "step": step}, extras)
    _say(accelerator, f"checkpoint {final}")
    return _adapter_path(final, config, step)


def _write_report(evaluator: Evaluator, step: int, *places: tuple[Path, str]) -> dict:
    """The routing report at ``step``, written to every ``(folder, name)`` given."""
    from .report import write_report

    data, picture = evaluator.report(step)
    for folder, name in places:
        write_report(folder, name, data, picture)
    return data


def _check_finite(accelerator, loss, outputs, step, save) -> None:
    bad = torch.tensor(0.0 if bool(torch.isfinite(loss.detach())) else 1.0, device=loss.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, "sum")
    if float(bad) == 0:
        return
    parts = ", ".join(f"{k} {float(v.detach().float().mean()):.4g}" for k, v in outputs.items())
    path = save()
    raise TrainingError(
        f"the loss became non-finite at step {step + 1} ({parts}); the state before this step is saved "
        f"({path.parent}); lower train.lr, check the data, or use train.mixed_precision=bf16 instead of fp16"
    )


def _log_line(accelerator, sums, count, step, w, optimizer, seconds) -> dict[str, float]:
    values = torch.tensor([sums[k] / max(count, 1) for k in sorted(sums)], device=accelerator.device)
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values, "mean")
    line = dict(zip(sorted(sums), values.tolist(), strict=True))
    line.update(step=step, aux_weight=w, seconds=round(seconds, 3))
    for group in optimizer.param_groups:
        line[f"lr_{group.get('name', 'group')}"] = group["lr"]
        if "d" in group:  # train.optimizer=prodigy: its estimated step size (the lr is a multiplier of it)
            line[f"d_{group.get('name', 'group')}"] = float(group["d"])
    return line


def _trim_metrics(path: Path, step: int) -> None:
    """A resumed run rewrites the metrics after its checkpoint (the killed run's lines are gone)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in keep))


def _flat_hparams(config: TrainConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for section, values in config.to_dict().items():
        for key, value in values.items():
            if isinstance(value, int | float | str | bool):
                out[f"{section}.{key}"] = value
    return out
