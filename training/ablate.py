"""``python -m training ablate``: what instruction routing buys, measured at the demo's scale on a CPU.

Four adapters are trained on the same data with the same budget (steps, batch, learning rates, data
order and draws) and the same seeds:

- **ours**: instruction routing, the config as it is;
- **per-token**: the same experts, every MoLE layer token-routed (the runtime's per-token policy,
  which ICEdit's MoE-LoRA uses): each token's gate reads the layer's input instead of the instruction;
- **plain LoRA**: no experts and no router: one LoRA on the same layers, of the rank that gives it
  ours' trainable parameter count, router included (``plan``);
- **no orthogonality**: ours with ``train.orthogonality=0``.

By default they train at the demo's scale (``training/demo.py``: a tiny Kontext-shaped pipeline, six
tonal edit tasks, ``training/configs/tiny_demo.yaml``), whose variant-free stages (the pipeline with
its taught VAE and transformer, the data set) are built once by the demo's own ``build`` and shared;
``--config`` trains them on a config's model and data instead (a real-size run on a GPU).

Every run goes through the trainer users call (``loop.train``) and is measured the same way on every
held-out row (``Judge``): the held-out flow loss (the routing report's own measure,
``Evaluator.flow_losses``), edit quality (PSNR and SSIM, ``training/quality.py``, of edits sampled in
28 steps by the trained model against the targets), and the routing report's metrics where they apply
(distinctness, decode accuracy, swap gap; expert usage entropy, of the instructions' councils or of
the tokens' choices). Each number is the mean ± standard deviation over the seeds, in a Markdown table
(``ablation.md``), a picture (``ablation.png``) and the raw numbers of every run (``ablation.json``).

At the demo's scale runs are independent, one thread each and deterministic: ``--jobs 2`` runs two at
a time on a two-core machine and gives the numbers ``--jobs 1`` gives.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from instructmole.errors import InstructMoLEError

from . import demo
from .errors import ConfigError, TrainingError
from .report import _jsonable

__all__ = ["METRICS", "VARIANTS", "Ablation", "Judge", "Setup", "Variant", "main", "plan", "run_ablation"]

Routing = Literal["instruction", "token", "none"]


@dataclass(frozen=True)
class Variant:
    """One arm of the ablation: its name, how it routes, and its config overrides (the per-token and
    plain-LoRA ones depend on the model and are made by ``plan``)."""

    key: str
    name: str  # for the table
    short: str  # for the picture's axis
    routing: Routing
    overrides: tuple[str, ...] = ()


VARIANTS = (
    Variant("ours", "instruction routing (ours)", "ours", "instruction"),
    Variant("token", "per-token routing", "per-token", "token"),
    Variant("lora", "plain LoRA, equal parameters", "LoRA", "none"),
    Variant("no_ortho", "ours without orthogonality loss", "no ortho", "instruction", ("train.orthogonality=0",)),
)

# The plain LoRA goes through the trainer's own plain-LoRA path (``adapter.lora``, peft), which trains
# beside a MoLE of at least one layer. Its MoLE is one layer that is not one of the LoRA's, with the
# smallest experts and a LoRA scale of 1e-30: its term is 1e-30 times an up-projection that starts at
# zero and that Adam moves by about lr·1e-22 per step (a gradient of ~1e-30 over Adam's eps of 1e-8),
# so the term stays below the smallest float32 and adds exactly nothing (``Judge.score`` checks that
# bit for bit); with no load-balancing or orthogonality weight its router gets no gradient either, and
# none of its parameters are counted.
INERT_LAYER = "transformer_blocks.0.ff_context.net.2"
_INERT = (
    f"adapter.targets=[{INERT_LAYER}]",
    "adapter.num_experts=2",
    "adapter.top_k=1",
    "adapter.rank=1",
    "adapter.alpha=1e-30",
    "train.load_balance=0",
    "train.orthogonality=0",
)

# The measures, in table order: key, column title, decimals (or "%"), the routings that have it.
METRICS: tuple[tuple[str, str, int | str, tuple[Routing, ...]], ...] = (
    ("flow", "held-out flow loss ↓", 3, ("instruction", "token", "none")),
    ("psnr", "edit PSNR (dB) ↑", 2, ("instruction", "token", "none")),
    ("ssim", "edit SSIM ↑", 3, ("instruction", "token", "none")),
    ("distinctness", "distinctness ↑", 2, ("instruction",)),
    ("decode_accuracy", "decode accuracy ↑", 2, ("instruction",)),
    ("swap_gap", "swap gap ↑", "%", ("instruction",)),
    ("usage_entropy", "expert usage entropy", 2, ("instruction", "token")),
)
DEFAULT_OUT = Path("out/ablate")
# The demo's steps (its config's train.max_steps), read rather than repeated.
DEFAULT_STEPS = int(yaml.safe_load(demo.CONFIG.read_text())["train"]["max_steps"])
EDIT_STEPS = 28  # sampling steps of an edit, as the demo's and the nodes' default
# What the ablation writes into --out; --overwrite removes its results (the pipeline and data are reused).
RESULTS = ("runs", "ablation.md", "ablation.png", "ablation.json")
SHARED = ("tiny-kontext", "tiny-kontext.partial", "data")


# ---- what every variant starts from, and the plan --------------------------------------------------


@dataclass(frozen=True)
class Setup:
    """The config every variant starts from: a YAML file and overrides. ``demo``: the demo's config on
    the built pipeline and data (CPU, one thread, deterministic algorithms), else a user's config."""

    config: Path
    overrides: tuple[str, ...]
    demo: bool

    def load(self, *extra: str) -> Any:
        """The ``TrainConfig`` with ``extra`` overrides on top."""
        from .config import load_config

        return load_config(self.config, [*self.overrides, *extra])

    def settings(self) -> contextlib.AbstractContextManager:
        """Around each run: the demo's thread count and determinism at its scale, the trainer's own else."""
        return demo.reproducible(demo.THREADS) if self.demo else contextlib.nullcontext()


def demo_setup(model: Path, manifest: Path) -> Setup:
    return Setup(demo.CONFIG, (f"model.pretrained={model}", f"data.manifest={manifest}"), demo=True)


@dataclass(frozen=True)
class Plan:
    """Each variant's overrides and trainable parameter count, decided from the model's shapes."""

    overrides: dict[str, tuple[str, ...]]
    parameters: dict[str, int]
    lora_rank: int


def plan(setup: Setup) -> Plan:
    """The variants' overrides. The plain LoRA's rank is the one whose parameters on ours' layers
    (``rank · Σ (in + out)``) come nearest ours' trainable parameters (experts, gates and router);
    the per-token variant keeps ours' experts, token gates replace the instruction gates, and its
    router is never read (not counted). The transformer is built from its config on the meta device:
    shapes without memory, at any size."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from .data import read_rows
    from .families import KontextRecipe, recipe_for
    from .loading import SHIPPED_CONFIGS
    from .modules import build_mole_config

    config = setup.load()
    family = recipe_for(config)
    if family.key != KontextRecipe.key:
        raise ConfigError(
            f"the ablation samples and decodes FLUX.1 Kontext edits, and this config trains {family.family.title}; "
            "pass a FLUX.1 Kontext config"
        )
    if config.adapter.lora.rank:
        raise ConfigError(
            f"adapter.lora.rank={config.adapter.lora.rank}: the ablation sets each variant's plain LoRA itself (a "
            "plain LoRA beside the experts would be in every variant); pass adapter.lora.rank=0"
        )
    if not any(row.split == "holdout" for row in read_rows(config.data.manifest)):
        raise ConfigError(
            f"data.manifest '{config.data.manifest}' has no held-out rows (split: holdout); the ablation measures "
            "every variant on them"
        )
    folder = Path(config.model.pretrained) if config.model.pretrained else SHIPPED_CONFIGS
    with init_empty_weights():
        transformer = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(folder / "transformer"))
    mole = build_mole_config(config, transformer)
    layers = "[" + ", ".join(mole.layer_names) + "]"
    ours = mole.parameter_count()
    per_rank = sum(s.in_features + s.out_features for s in mole.layers)
    rank = max(1, round(ours / per_rank))
    n, r = mole.num_experts, mole.rank
    token = sum(n * (s.in_features * r + r * s.out_features + s.in_features) for s in mole.layers)
    overrides = {v.key: v.overrides for v in VARIANTS}
    overrides["token"] = (*overrides["token"], f"adapter.token_routed={layers}")
    overrides["lora"] = (
        *_INERT,
        f"adapter.lora.rank={rank}",
        f"adapter.lora.alpha={rank}",
        f"adapter.lora.targets={layers}",
    )
    parameters = {"ours": ours, "no_ortho": ours, "token": token, "lora": rank * per_rank}
    return Plan(overrides, parameters, rank)


@dataclass(frozen=True)
class RunSpec:
    """One training run, everything a worker process needs (picklable)."""

    variant: str
    seed: int
    steps: int
    folder: Path
    setup: Setup
    overrides: tuple[str, ...]  # the variant's
    position: str = ""  # "3/12", for the progress lines
    epoch: float = 0.0  # time.time() at the ablation's start, for the progress lines

    def config_overrides(self) -> list[str]:
        """The ablation's own settings and the variant's overrides, on top of the setup's."""
        fixed = [
            f"train.output_dir={self.folder}",
            f"train.seed={self.seed}",
            f"train.max_steps={self.steps}",
            "save.report=false",  # the ablation measures every run itself, on every held-out row
            "log.progress=false",
        ]
        if self.setup.demo:  # minutes, not days: one checkpoint, at the end
            fixed += [f"save.every={self.steps}", "save.keep=1"]
        return [*fixed, *self.overrides]


def _variant(key: str) -> Variant:
    return next(v for v in VARIANTS if v.key == key)


# ---- measuring a run -----------------------------------------------------------------------------


class Judge:
    """What every run is measured with, made once per process (after its first run has filled the
    trainer's feature cache): the rows as ``loop.train`` reads them (the preflight's ``--check`` takes
    the same private helpers), their cached latents and instruction features, and the VAE that decodes
    the edits. The base model's edit quality is computed once, with the first run's model."""

    def __init__(self, config: Any) -> None:
        from .cache import FeatureCache
        from .loop import _latent_norm, _load, _load_identity, _prepare_data
        from .modules import DTYPES
        from .recipe import MicroBatches

        self.config = config
        cache = FeatureCache(config.cache_dir, _load_identity(config), config.adapter.text_length)
        data = _prepare_data(config, cache)
        # Evaluation assembles the rows it is given: no training batch order is needed.
        self.batches = MicroBatches(config, data.rows, data.sizes, data.digests, None, cache, _latent_norm(config))
        self.train_rows, self.holdout = data.train, data.holdout
        self.vae = _load(config, ("vae",), DTYPES[config.model.dtype]).vae.eval()
        self.base: dict[str, float] | None = None

    def evaluator(self, model: Any) -> Any:
        """The trainer's ``Evaluator`` for ``model`` over every held-out row, as ``loop.train`` sets it up."""
        from .evaluate import Evaluator
        from .modules import DTYPES

        t = self.config.train
        device = next(model.transformer.parameters()).device
        dtype = torch.float32 if t.mixed_precision != "no" else DTYPES[self.config.model.dtype]
        batch = max(t.batch_size // t.gradient_accumulation, 1)
        return Evaluator(
            model, self.batches, self.train_rows, self.holdout, len(self.holdout), batch, device, dtype,
            t.mixed_precision, self.vae.to(device),
        )  # fmt: skip

    def score(self, result: Any, variant: Variant, steps: int) -> dict[str, float]:
        """Every measure of a finished run (``loop.RunResult``) that its routing has, and the base model's."""
        from .evaluate import eval_mode
        from .report import balance, write_report

        model = result.model
        evaluator = self.evaluator(model)
        scores: dict[str, float] = {}
        counts: dict[str, torch.Tensor] = {}
        with eval_mode(model):
            with _token_choices(model, counts):
                own = evaluator.flow_losses(self.holdout)
            scores.update(self.edit_quality(evaluator))
            model.runtime_layers(set())  # every expert term off
            if variant.routing == "none" and not torch.equal(evaluator.flow_losses(self.holdout), own):
                raise TrainingError(f"the plain LoRA's inert MoLE layer ({INERT_LAYER}) changed the output")
            with model.lora_disabled():  # and the plain LoRA: the base model
                scores["base_flow"] = float(evaluator.flow_losses(self.holdout).mean())
                if self.base is None:
                    self.base = self.edit_quality(evaluator)
        scores["flow"] = float(own.mean())
        scores.update({f"base_{k}": v for k, v in self.base.items()})
        if variant.routing == "instruction":
            data, picture = evaluator.report(steps)
            write_report(result.output_dir, "report", data, picture)
            metrics = data["metrics"]
            scores.update({k: metrics[k] for k in ("distinctness", "decode_accuracy", "swap_gap") if k in metrics})
            if "balance" in metrics:
                scores["usage_entropy"] = metrics["balance"]
        elif variant.routing == "token":
            scores["usage_entropy"] = balance(torch.stack([counts[name] for name in sorted(counts)]))
        return scores

    def edit_quality(self, evaluator: Any) -> dict[str, float]:
        """Mean PSNR and SSIM over the held-out rows of edits sampled by the evaluator's model as it is
        set now (in eval mode, routed per row from its own instruction), against the rows' targets.
        Rows are sampled in the evaluator's batches (the same for every run, so the same noise), from
        the cached features, at the guidance the adapter trains at (as the demo's edits)."""
        from .buckets import load_image
        from .evaluate import _AUTOCAST
        from .quality import psnr, ssim
        from .sampling import decode, edit_latents

        mb, rows, t = self.batches, self.batches.rows, self.config.train
        cache, norm, device = mb.cache, mb.norm, evaluator.device
        values: dict[str, list[torch.Tensor]] = {"psnr": [], "ssim": []}
        for batch in evaluator._batches(self.holdout):  # by bucket and reference count
            if not rows[batch[0]].references:  # nothing to edit: generated, not edited
                continue
            size = mb.sizes[batch[0]]

            def latent(path: Path, size: tuple[int, int] = size) -> torch.Tensor:  # normalised posterior mean
                return (cache.read(cache.latent_key(mb.digests[path], size))["mean"] - norm.shift) * norm.scale

            count = len(rows[batch[0]].references)
            references = [torch.stack([latent(rows[r].references[i]) for r in batch]) for i in range(count)]
            texts = [cache.read(cache.text_key(rows[r].instruction)) for r in batch]
            t5, pooled = torch.stack([x["t5"] for x in texts]), torch.stack([x["pooled"] for x in texts])
            mixed = t.mixed_precision != "no"
            with torch.autocast(device.type, dtype=_AUTOCAST.get(t.mixed_precision), enabled=mixed):
                latents = edit_latents(
                    evaluator.model.transformer, t5, pooled, references, steps=EDIT_STEPS, guidance=t.guidance
                )
            images = decode(evaluator.vae, latents, norm).float().cpu()
            targets = (torch.stack([load_image(rows[r].target, size) for r in batch]) + 1) / 2
            values["psnr"].append(psnr(images, targets))
            values["ssim"].append(ssim(images, targets))
        return {k: float(torch.cat(v).mean()) if v else math.nan for k, v in values.items()}


@contextlib.contextmanager
def _token_choices(model: Any, counts: dict[str, torch.Tensor]) -> Iterator[None]:
    """Count, per token-routed layer, how often each expert is among a token's top k in the block's
    forwards: the choices the runtime makes in eval mode (no gate noise), from the layer's input."""
    from instructmole.experts import token_route

    cfg = model.mole.config
    handles = []
    for spec in cfg.layers:
        if spec.routing != "token":
            continue
        gate = model.mole.layer(spec.name).gate.weight

        def count(module: Any, args: tuple, name: str = spec.name, gate: torch.Tensor = gate) -> None:
            _, indices, _ = token_route(args[0].detach().float(), gate.detach().float(), cfg.top_k)
            found = torch.bincount(indices.flatten().cpu(), minlength=cfg.num_experts).double()
            counts[name] = counts.get(name, torch.zeros_like(found)) + found

        handles.append(model.transformer.get_submodule(spec.name).register_forward_pre_hook(count))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _trained_parameters(model: Any, routing: Routing) -> int:
    """Trainable parameters that reach the output: the plain LoRA's alone for a plain LoRA (its MoLE is
    inert), experts and token gates for per-token routing (its router is never read), all of the MoLE
    for instruction routing."""
    keep: Callable[[str], bool] = {
        "none": lambda n: "lora_" in n,
        "token": lambda n: n.startswith("mole.experts."),
        "instruction": lambda n: n.startswith("mole."),
    }[routing]
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and keep(n))


_JUDGES: dict[Setup, Judge] = {}


def _say(epoch: float, text: str) -> None:
    print(f"[{time.time() - epoch:5.0f} s] {text}", flush=True)


def run_one(spec: RunSpec) -> dict[str, Any]:
    """Train one variant with one seed through ``loop.train`` and measure it; the trainer's own lines go
    to ``train.log`` in its folder. Returns the scores with the run's wall and CPU seconds."""
    from .cli import quiet_libraries
    from .loop import train

    quiet_libraries()
    variant = _variant(spec.variant)
    label = f"run {spec.position} {variant.name}, seed {spec.seed}"
    with spec.setup.settings():
        config = spec.setup.load(*spec.config_overrides())
        _say(spec.epoch, f"{label}: training {spec.steps} steps ...")
        began, cpu = time.perf_counter(), time.process_time()
        spec.folder.mkdir(parents=True, exist_ok=True)
        with (
            open(spec.folder / "train.log", "w") as log,
            contextlib.redirect_stdout(log),
            contextlib.redirect_stderr(log),
        ):
            result = train(config)
        if spec.setup not in _JUDGES:
            _JUDGES[spec.setup] = Judge(spec.setup.load())
        scores = _JUDGES[spec.setup].score(result, variant, spec.steps)
        scores["parameters"] = _trained_parameters(result.model, variant.routing)
        scores["seconds"] = time.perf_counter() - began
        scores["cpu_seconds"] = time.process_time() - cpu
    _say(
        spec.epoch,
        f"{label}: done in {scores['seconds']:.0f} s (CPU {scores['cpu_seconds']:.0f} s): held-out flow "
        f"{scores['flow']:.3f}, PSNR {scores['psnr']:.2f} dB, SSIM {scores['ssim']:.3f}",
    )
    return scores


# ---- the whole ablation --------------------------------------------------------------------------


@dataclass
class Ablation:
    """The ablation's results: every run's scores, the base model's, and their summary over seeds."""

    steps: int
    seeds: list[int]
    runs: dict[str, list[dict[str, float]]]  # variant -> one score dict per seed, in seed order
    base: dict[str, float]  # the base model (no adapter): flow, psnr, ssim
    plan: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self, variant: str, key: str) -> tuple[float, float] | None:
        """``(mean, standard deviation over seeds)`` of a measure, or None where it does not apply.
        The deviation is the sample one (n − 1); with one seed it is nan."""
        values = [run[key] for run in self.runs[variant] if key in run]
        if not values:
            return None
        mean = sum(values) / len(values)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else math.nan
        return mean, sd

    def table(self) -> list[list[str]]:
        """The Markdown table's rows, header first: one row per variant, then the base model."""
        header = ["variant", "trained parameters", *(title for _, title, _, _ in METRICS)]
        rows = [header]
        for v in VARIANTS:
            params = self.runs[v.key][0]["parameters"]
            rows.append([v.name, f"{int(params):,}", *(_cell(self.summary(v.key, k), d) for k, _, d, _ in METRICS)])
        base = [_cell((self.base[k], math.nan), d) if k in self.base else "—" for k, _, d, _ in METRICS]
        rows.append(["base model (no adapter)", "0", *base])
        return rows

    def markdown(self) -> str:
        rows = self.table()
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        summary = {
            v.key: {k: list(s) for k, *_ in METRICS if (s := self.summary(v.key, k)) is not None} for v in VARIANTS
        }
        return {**asdict(self), "summary": summary, "variants": {v.key: v.name for v in VARIANTS}}


def _cell(value: tuple[float, float] | None, decimals: int | str) -> str:
    """``mean ± sd`` (no ± for one seed or the base model; swap gap in percent), or "—" where the
    measure does not apply."""
    if value is None:
        return "—"
    mean, sd = value
    if decimals == "%":
        mean, sd, decimals, unit = mean * 100, sd * 100, 0, " %"
    else:
        unit = ""
    text = _fixed(mean, decimals)
    return f"{text} ± {_fixed(sd, decimals)}{unit}" if math.isfinite(sd) else f"{text}{unit}"


def _fixed(value: float, decimals: int) -> str:
    """``value`` to ``decimals`` places, without the sign of a value that rounds to zero ("-0")."""
    text = f"{value:.{decimals}f}"
    return text.lstrip("-") if float(text) == 0 else text


def run_ablation(
    out: Path,
    *,
    seeds: Sequence[int],
    steps: int | None = None,
    jobs: int = 1,
    setup: Setup | None = None,
    clock: demo.Clock | None = None,
) -> Ablation:
    """Train and measure every variant with every seed into ``out/runs`` (``jobs`` at a time, each in
    its own process when more than one), and write ``ablation.md``, ``ablation.png`` and
    ``ablation.json``. Without a ``setup`` the demo's stages are built into ``out`` first (its
    ``build``) and the demo's config is used; ``steps``: the config's ``train.max_steps`` by default."""
    clock = clock or demo.Clock()
    if setup is None:
        with demo.reproducible(demo.THREADS):
            model, manifest = demo.build(out, clock)
        setup = demo_setup(model.resolve(), manifest.resolve())
    steps = steps or setup.load().train.max_steps
    decided = plan(setup)
    print(
        f"        plain LoRA rank {decided.lora_rank}: {decided.parameters['lora']:,} parameters "
        f"(ours {decided.parameters['ours']:,})",
        flush=True,
    )
    epoch = time.time() - clock.elapsed()
    specs = [
        RunSpec(v.key, seed, steps, (out / "runs" / f"{v.key}-seed{seed}").resolve(), setup, decided.overrides[v.key])
        for seed in seeds
        for v in VARIANTS
    ]
    specs = [replace(s, position=f"{i + 1}/{len(specs)}", epoch=epoch) for i, s in enumerate(specs)]
    began = time.perf_counter()
    _say(epoch, f"{len(specs)} runs, {jobs} at a time ...")
    scores = _run_all(specs, jobs)
    cpu = sum(s["cpu_seconds"] for s in scores.values())
    _say(epoch, f"{len(specs)} runs: done in {time.perf_counter() - began:.1f} s (CPU {cpu:.1f} s in the runs)")
    runs = {v.key: [scores[(v.key, seed)] for seed in seeds] for v in VARIANTS}
    first = runs["ours"][0]
    base = {"flow": first["base_flow"], "psnr": first["base_psnr"], "ssim": first["base_ssim"]}
    ablation = Ablation(steps, list(seeds), runs, base, asdict(decided), clock.elapsed())
    write_results(out, ablation)
    return ablation


def _run_all(specs: Sequence[RunSpec], jobs: int) -> dict[tuple[str, int], dict[str, float]]:
    """Every run's scores, by (variant, seed): in this process one after another, or ``jobs`` worker
    processes (spawned: a fresh interpreter, no state forked from this one)."""
    if jobs <= 1:
        return {(s.variant, s.seed): run_one(s) for s in specs}
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = {(s.variant, s.seed): pool.submit(run_one, s) for s in specs}
        return {key: future.result() for key, future in futures.items()}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def write_results(out: Path, ablation: Ablation) -> None:
    """``ablation.md`` (the table and what its numbers are), ``ablation.json`` and ``ablation.png``."""
    from instructmole.files import atomic_path

    seeds = ", ".join(map(str, ablation.seeds))
    note = (
        f"{ablation.steps} steps per run, seeds {seeds}; mean ± standard deviation over the seeds. Every held-out "
        "row (phrasings and images never trained on). Flow loss: the routing report's, at σ = 0.25, 0.5, 0.75 "
        f"with fixed noise. PSNR and SSIM: edits sampled in {EDIT_STEPS} steps by the trained model, against the "
        "targets. Decode accuracy: chance is 1/(number of tasks). Expert usage entropy: normalised (1 = even), "
        "of the instructions' councils for instruction routing, of the tokens' top-k choices for per-token "
        "routing. —: the measure does not apply.\n"
    )
    with atomic_path(out / "ablation.md") as tmp:
        tmp.write_text(ablation.markdown() + "\n" + note, encoding="utf-8")
    with atomic_path(out / "ablation.json") as tmp:
        text = json.dumps(_jsonable(ablation.to_dict()), indent=2, allow_nan=False)  # nan (one seed's SD): null
        tmp.write_text(text + "\n", encoding="utf-8")
    with atomic_path(out / "ablation.png") as tmp, open(tmp, "wb") as fh:
        picture(ablation).save(fh, format="PNG")


# ---- the picture ---------------------------------------------------------------------------------

_BG, _INK, _DIM, _GRID = (24, 24, 28), (235, 235, 235), (165, 165, 170), (60, 60, 66)
_COLOURS = {"ours": (90, 160, 250), "token": (240, 150, 90), "lora": (140, 200, 110), "no_ortho": (205, 130, 225)}
_HINTS = {"↑": "higher is better", "↓": "lower is better", "usage_entropy": "1 = every expert used alike"}


def picture(ablation: Ablation, panel: tuple[int, int] = (330, 250)) -> Any:
    """One panel per measure (variants across; a dot per seed, a bar at the mean and a line over
    ± one standard deviation; "n/a" where it does not apply; the base model dashed where it has the
    measure), and a legend naming the variants, in a grid of four columns."""
    from PIL import Image, ImageDraw

    from instructmole.viz import _font

    cols, (pw, ph), pad, head = 4, panel, 16, 44
    title_font, font, small = _font(18), _font(15), _font(13)
    cells = len(METRICS) + 1
    rows = -(-cells // cols)
    image = Image.new("RGB", (pad + cols * (pw + pad), head + rows * (ph + pad) + pad), _BG)
    draw = ImageDraw.Draw(image)
    seeds = ", ".join(map(str, ablation.seeds))
    draw.text(
        (pad, pad),
        f"Ablation at the demo's scale: {ablation.steps} steps, seeds {seeds}; mean ± SD over seeds, a dot per seed",
        fill=_INK,
        font=title_font,
    )
    for i, (key, title, decimals, _) in enumerate(METRICS):
        x0, y0 = pad + (i % cols) * (pw + pad), head + (i // cols) * (ph + pad)
        hint = _HINTS.get(key) or _HINTS.get(title[-1], "")
        _panel(draw, (x0, y0, pw, ph), ablation, key, (title.rstrip(" ↑↓"), hint), decimals, (font, small))
    x0, y0 = pad + (len(METRICS) % cols) * (pw + pad), head + (len(METRICS) // cols) * (ph + pad)
    y = y0 + 8
    for v in VARIANTS:
        draw.rectangle((x0 + 8, y + 3, x0 + 20, y + 15), fill=_COLOURS[v.key])
        draw.text((x0 + 28, y), v.name, fill=_INK, font=small)
        y += 24
    draw.line((x0 + 8, y + 9, x0 + 20, y + 9), fill=_DIM, width=2)
    draw.text((x0 + 28, y), "base model (no adapter)", fill=_DIM, font=small)
    return image


def _panel(
    draw: Any,
    box: tuple[int, int, int, int],
    ablation: Ablation,
    key: str,
    titles: tuple[str, str],
    decimals: int | str,
    fonts: tuple[Any, Any],
) -> None:
    """One measure's panel in ``box`` (x, y, width, height); ``titles``: its title and hint."""
    font, small = fonts
    x0, y0, w, h = box
    draw.rectangle((x0, y0, x0 + w, y0 + h), outline=_GRID)
    draw.text((x0 + 8, y0 + 6), titles[0], fill=_INK, font=font)
    draw.text((x0 + 8, y0 + 26), titles[1], fill=_DIM, font=small)
    left, top, right, bottom = x0 + 58, y0 + 50, x0 + w - 10, y0 + h - 30
    values = [run[key] for v in VARIANTS for run in ablation.runs[v.key] if key in run]
    spread = [s for v in VARIANTS if (s := ablation.summary(v.key, key)) and math.isfinite(s[1])]
    extent = [e for e in values + [m + s for m, s in spread] + [m - s for m, s in spread] if math.isfinite(e)]
    if not extent:
        return
    low, high = min(extent), max(extent)
    base = ablation.base.get(key)
    if base is not None and math.isfinite(base):
        if min(abs(base - low), abs(base - high)) > 2 * max(high - low, 1e-12) and not low <= base <= high:
            # Far off: the variants' differences would shrink to nothing; the base is written instead.
            note = f"base model {_fixed(base, 3)}: far {'above' if base > high else 'below'}"
            draw.text((x0 + w - 8 - draw.textlength(note, font=small), y0 + 26), note, fill=_DIM, font=small)
            base = None
        else:
            low, high = min(low, base), max(high, base)
    margin = (high - low) * 0.1 or max(abs(high) * 0.05, 1e-3)
    low, high = low - margin, high + margin
    scale = 100 if decimals == "%" else 1
    ticks = (low + margin, (low + high) / 2, high - margin)
    # Enough places that the three ticks read apart, at least the table's.
    apart = max(math.ceil(-math.log10(max((ticks[1] - ticks[0]) * scale, 1e-12))), 0)
    shown = max(0 if decimals == "%" else int(decimals), apart)

    def y_of(value: float) -> float:
        return bottom - (value - low) / (high - low) * (bottom - top)

    for tick in ticks:
        y = y_of(tick)
        draw.line((left, y, right, y), fill=_GRID)
        label = _fixed(tick * scale, shown) + ("%" if decimals == "%" else "")
        draw.text((left - 6 - draw.textlength(label, font=small), y - 7), label, fill=_DIM, font=small)
    if base is not None:
        y = y_of(base)
        for x in range(left, right, 10):
            draw.line((x, y, min(x + 5, right), y), fill=_DIM, width=2)
    step = (right - left) / len(VARIANTS)
    for i, v in enumerate(VARIANTS):
        cx = left + step * (i + 0.5)
        label = v.short
        draw.text((cx - draw.textlength(label, font=small) / 2, bottom + 8), label, fill=_DIM, font=small)
        summary = ablation.summary(v.key, key)
        if summary is None:  # (Pillow's default font has no dash)
            draw.text(
                (cx - draw.textlength("n/a", font=small) / 2, (top + bottom) / 2 - 8), "n/a", fill=_DIM, font=small
            )
            continue
        colour = _COLOURS[v.key]
        mean, sd = summary
        if math.isfinite(sd):
            draw.line((cx, y_of(mean - sd), cx, y_of(mean + sd)), fill=colour, width=2)
        draw.line((cx - 16, y_of(mean), cx + 16, y_of(mean)), fill=colour, width=4)
        runs = [run[key] for run in ablation.runs[v.key]]
        for j, value in enumerate(runs):
            dx = (j - (len(runs) - 1) / 2) * 9
            y = y_of(value)
            draw.ellipse((cx + dx - 3.5, y - 3.5, cx + dx + 3.5, y + 3.5), outline=colour, fill=_BG, width=2)


# ---- the command line ----------------------------------------------------------------------------


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _parser() -> argparse.ArgumentParser:
    from .cli import _Parser  # usage errors: one line and exit code 2, as the trainer's

    parser = _Parser(
        prog="python -m training ablate",
        description=(
            "Train, with the same budget and seeds each: instruction routing (ours), per-token routing, a plain "
            "LoRA of equal trainable parameters, and ours without the orthogonality loss; report held-out flow "
            "loss, edit PSNR/SSIM and the routing metrics as a Markdown table and a picture. By default at the "
            "demo's scale on a CPU (about 8 minutes on 2 idle cores); --config trains them on a config's model and "
            "data (e.g. training/configs/kontext.yaml on a GPU)."
        ),
        epilog=(
            "A real-size run: python -m training ablate --config training/configs/kontext.yaml adapter.lora.rank=0 "
            "model.pretrained=/models/FLUX.1-Kontext-dev data.manifest=/data/edits.jsonl --steps 20000 --out "
            "runs/ablate"
        ),
    )
    parser.add_argument("--seeds", type=_positive, default=3, help="seeds per variant: 0 .. N-1 (default 3)")
    parser.add_argument(
        "--steps",
        type=_positive,
        help=f"training steps per run (default: the config's train.max_steps; the demo's {DEFAULT_STEPS})",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"the folder for everything (default {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier ablation's runs and results in --out (the demo's pipeline and data set are reused)",
    )
    parser.add_argument(
        "--jobs",
        type=_positive,
        help="runs at a time, one process each (default: 2 at the demo's scale on 2+ cores, else 1)",
    )
    parser.add_argument("--config", type=Path, help="train the variants on this config's model and data instead")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of --config")
    return parser


def prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that holds anything unless ``overwrite``; then remove the ablation's earlier
    results (``RESULTS``), never a file the ablation does not write."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out '{out}' is a file; name a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not entries:
        return
    if not overwrite:
        raise ConfigError(
            f"--out '{out}' is not empty ({', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}); pass "
            "--overwrite to replace an earlier ablation there, or choose another --out"
        )
    foreign = [name for name in entries if name not in (*RESULTS, *SHARED)]
    if foreign:
        raise ConfigError(
            f"--out '{out}' holds files the ablation does not write ({', '.join(foreign[:3])}); --overwrite "
            "removes only an earlier ablation's: choose another --out"
        )
    for name in RESULTS:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_intermixed_args(argv)
    if args.overrides and args.config is None:
        parser.error(f"{args.overrides[0]!r}: overrides change --config; the demo's scale is fixed")
    setup = None if args.config is None else Setup(args.config, tuple(args.overrides), demo=False)
    jobs = args.jobs or (min(2, os.cpu_count() or 1) if setup is None else 1)
    clock = demo.Clock()
    try:
        from .cli import quiet_libraries

        quiet_libraries()
        prepare_out(args.out, args.overwrite)
        ablation = run_ablation(
            args.out, seeds=range(args.seeds), steps=args.steps, jobs=jobs, setup=setup, clock=clock
        )
    except InstructMoLEError as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except OSError as err:
        where = f"'{err.filename}'" if err.filename else "a file"
        print(f"error: could not use {where} ({err.strerror or err})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print("\n" + ablation.markdown())
    for name in ("ablation.md", "ablation.png", "ablation.json"):
        print(f"{name:<14}{args.out / name}")
    elsewhere = ""
    if jobs > 1:  # the runs' CPU time was spent in the worker processes
        runs = sum(run["cpu_seconds"] for runs in ablation.runs.values() for run in runs)
        elsewhere = f" + {runs:.0f} s in the {jobs} worker processes"
    print(f"ablation done in {clock.elapsed():.0f} s (CPU {time.process_time():.0f} s in this process{elsewhere})")
    return 0
