"""The training recipe as data: from cached features to one process's micro-batch of model inputs.

Every random draw of a sample (timestep, noise, latent sample, instruction dropout, the router's
gate noise and dropout) comes from a generator seeded by ``(seed, optimizer step, position in the
step's global batch)``; the reference dropout of a step's batch from ``(seed, step)``. Nothing depends on
the global RNG, the process count or how often the run was interrupted, which is what makes a
resumed run end with the weights of an uninterrupted one, and two processes with those of one.

Flow matching (rectified flow, as FLUX was trained): ``x_t = (1 − σ)·x0 + σ·ε``, the model
predicts ``ε − x0`` from ``x_t`` with timestep input ``σ``; the loss is the MSE on the target's
tokens only (reference tokens are context), averaged per sample, then over the batch. A row with a
mask (``Row.mask``) weights its tokens: 1 in the edited region, ``train.mask_outside_weight`` outside,
normalised by the mean weight so that an all-white mask is exactly the unweighted loss
(``weighted_flow``).

What differs between model families (how a latent is normalised and cut into tokens, what text
tensors the model and the router read, where target and reference tokens sit) is asked of the
family's ``Recipe`` (``families.py``); the draws and their order are the same for every family.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .buckets import BucketBatches
from .cache import FeatureCache
from .config import TrainConfig
from .data import Row
from .families import KontextRecipe, Recipe

__all__ = [
    "LatentNorm",
    "MicroBatch",
    "MicroBatches",
    "aux_weight",
    "draw_sigma",
    "lr_scheduler",
    "mask_weight",
    "sample_seed",
    "weighted_flow",
]


def sample_seed(seed: int, *parts: int | str) -> int:
    """A 63-bit seed for ``parts`` under ``seed``: nearby inputs give unrelated seeds."""
    digest = hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def aux_weight(step: int, decay_steps: int) -> float:
    """The auxiliary losses' weight factor: cosine from 1 at step 0 to 1e-5 at ``decay_steps`` (then flat)."""
    progress = min(step, decay_steps) / decay_steps
    return 1e-5 + 0.5 * (1 - 1e-5) * (1 + math.cos(math.pi * progress))


def lr_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, total_steps: int):
    """The learning-rate schedule, after ``warmup_steps`` of linear warm-up from 0 whatever the schedule.

    diffusers' ``get_scheduler("constant")`` ignores ``num_warmup_steps`` (its warm-up variant is
    another name, ``constant_with_warmup``); ``cosine`` and ``linear`` warm up themselves.
    """
    from diffusers.optimization import get_scheduler

    name = "constant_with_warmup" if schedule == "constant" and warmup_steps else schedule
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


def draw_sigma(generator: torch.Generator, mode: str, mean: float = 0.0, std: float = 1.0) -> float:
    """σ ∈ (0, 1]: uniform over the scheduler's 1000 training sigmas (k/1000, the reference's
    FlowMatchEulerDiscreteScheduler with shift 1), or logit-normal."""
    if mode == "uniform":
        return int(torch.randint(1, 1001, (), generator=generator)) / 1000
    return float(torch.sigmoid(torch.randn((), generator=generator) * std + mean))


def mask_weight(coverage: Tensor, outside: float) -> Tensor:
    """Per-token loss weights from a mask's per-token white share: 1 inside, ``outside`` outside, linear
    between. Written as ``1 − (1 − outside)·(1 − coverage)`` so that a fully white token is exactly 1."""
    return 1 - (1 - outside) * (1 - coverage)


def flow_loss(pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Per-sample flow loss on the target tokens: their MSE, or with ``weight`` (masked rows)
    ``weighted_flow``. ``pred``: the transformer's output ``[b, tokens, 64]``, target tokens first."""
    if weight is not None:
        return weighted_flow(pred, target, weight)
    return (pred[:, : target.shape[1]].float() - target.float()).pow(2).mean(dim=(1, 2))


def weighted_flow(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """Per-sample flow loss with per-token weights: ``Σ_t w_t·e_t / Σ_t w_t``, ``e_t`` the token's MSE.

    ``pred``: the transformer's output ``[b, tokens, 64]`` (target tokens first); ``target``
    ``[b, target tokens, 64]``; ``weight`` ``[b, target tokens]``. Computed as
    ``mean(w·(pred − target)²) / mean(w)``, so all-one weights give bit for bit the unweighted loss
    of ``TrainingModel`` (the same reduction, times and over exact ones). All-zero weights give 0."""
    pred = pred[:, : target.shape[1]].float()
    weight = weight.float()
    squared = (pred - target.float()).pow(2) * weight[..., None]
    return squared.mean(dim=(1, 2)) / weight.mean(dim=1).clamp_min(torch.finfo(torch.float32).tiny)


@dataclass(frozen=True)
class LatentNorm:
    """The VAE's latent normalisation: ``z ↦ (z − shift) · scale``."""

    shift: float
    scale: float

    def __call__(self, z: Tensor) -> Tensor:
        return (z - self.shift) * self.scale


@dataclass
class MicroBatch:
    """One process's share of one global micro-batch, ready for the transformer (CPU tensors)."""

    hidden_states: Tensor  # [b, target + reference tokens, channels] (Kontext: 64)
    text: Tensor  # [b, text tokens, text_dim]: the model's conditioning
    pooled: Tensor | None  # [b, pooled_dim] (Kontext's CLIP; None for the chat-LLM families)
    sigma: Tensor  # [b]
    img_ids: Tensor | None  # [tokens, 3] (FLUX.2: [tokens, 4]; None for Qwen-Image, which reads img_shapes)
    txt_ids: Tensor | None  # [text tokens, 3] (FLUX.2: 4)
    target: Tensor  # [b, target tokens, channels]  (ε − x0)
    seeds: Tensor  # [b] int64: the router's per-row seeds
    rows: list[int]  # manifest rows
    dropped: Tensor  # [b] bool: trained with the empty instruction
    without_references: bool
    weight: Tensor | None = None  # [b, target tokens] loss weights; None: no row has a mask
    # The chat-LLM families (``families.py``); None for Kontext, whose router reads text and pooled.
    text_mask: Tensor | None = None  # [b, text tokens] 0/1: the conditioning's padding mask (Qwen-Image)
    route_text: Tensor | None = None  # [b, t, text_dim]: the router's features where not ``text`` (Qwen-Image)
    route_mask: Tensor | None = None  # [b, t] bool: the instruction's tokens in the router's features
    img_shapes: list | None = None  # Qwen-Image: the (frames, h, w) token grid of the target, then each reference

    @property
    def target_tokens(self) -> int:
        return self.target.shape[1]


class MicroBatches(torch.utils.data.Dataset):
    """Item ``i``: this process's share of micro-batch ``i`` (a pure function of ``i``).

    A map-style data set indexed by the micro-batch number, so a resumed run starts its
    ``DataLoader`` at the exact micro-batch where it stopped, with worker prefetching intact.

    The unit of the batch order is the optimizer step: ``BucketBatches`` gives each step's global
    batch, micro-batch ``m`` of step ``s`` is its ``m``-th equal slice, and each process takes an
    equal contiguous part of that. Every draw is keyed by (step, position in the step's batch),
    so gradient accumulation changes the memory a step needs, not its rows or draws: batch 8 ×
    accumulation 1 and batch 8 in 8 micro-batches of 1 train the same samples.
    """

    def __init__(
        self,
        config: TrainConfig,
        rows: Sequence[Row],
        sizes: Sequence[tuple[int, int]],
        digests: dict,
        batches: BucketBatches,
        cache: FeatureCache,
        norm: LatentNorm,
        *,
        rank: int = 0,
        world: int = 1,
        recipe: Recipe | None = None,
    ) -> None:
        self.config, self.rows, self.sizes, self.digests = config, rows, sizes, digests
        self.batches, self.cache, self.norm = batches, cache, norm
        self.rank, self.world = rank, world
        self.recipe = recipe if recipe is not None else KontextRecipe()  # the family's (``families.py``)
        self._epoch: tuple[int, list[list[int]]] | None = None

    def __len__(self) -> int:
        return self.config.train.max_steps * self.config.train.gradient_accumulation

    def global_batch(self, step: int) -> list[int]:
        """The rows of optimizer step ``step`` (0-based), over all micro-batches and processes."""
        epoch, position = self.batches.position(step)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self.batches.epoch(epoch))
        return self._epoch[1][position]

    def __getitem__(self, micro: int) -> MicroBatch:
        cfg = self.config
        step, part = divmod(micro, cfg.train.gradient_accumulation)
        batch = self.global_batch(step)
        share = len(batch) // (cfg.train.gradient_accumulation * self.world)  # exact: see BucketBatches.multiple
        first = (part * self.world + self.rank) * share  # this process's first position in the step's batch
        local = batch[first : first + share]
        drop_refs = torch.rand((), generator=_gen(cfg.train.seed, step, "references")) < cfg.data.reference_dropout
        seeds = [sample_seed(cfg.train.seed, step, first + j) for j in range(len(local))]
        return self.assemble(local, seeds, bool(drop_refs))

    def assemble(
        self,
        rows: Sequence[int],
        seeds: Sequence[int],
        drop_refs: bool = False,
        sigmas: Sequence[float] | None = None,
        dropout: bool = True,
    ) -> MicroBatch:
        """Inputs for ``rows`` with the draws of ``seeds``. For evaluation: ``sigmas`` fixes the
        timesteps, ``dropout=False`` keeps every instruction (the draws stay the same)."""
        cfg, d, recipe = self.config, self.config.data, self.recipe
        width, height = self.sizes[rows[0]]
        texts, x_t, targets, refs, route, dropped, sig, masks = [], [], [], [], [], [], [], []
        for j, (row_index, seed) in enumerate(zip(rows, seeds, strict=True)):
            row = self.rows[row_index]
            g = torch.Generator().manual_seed(seed)
            sigma = draw_sigma(g, cfg.train.timesteps, cfg.train.logit_mean, cfg.train.logit_std)
            if sigmas is not None:
                sigma = sigmas[j]
            drop = bool(torch.rand((), generator=g) < d.instruction_dropout) and dropout
            instruction = "" if drop else row.instruction
            text = self.cache.read(self.cache.text_key(instruction))
            x0 = self._latent(row.target, (width, height), g)
            noise = torch.randn(x0.shape, generator=g)
            ref_latents = [self._latent(p, (width, height), g) for p in row.references]
            x_t.append(recipe.tokens((1 - sigma) * x0 + sigma * noise))
            targets.append(recipe.tokens(noise - x0))
            refs.append([recipe.tokens(z) for z in ref_latents])
            texts.append(text)
            route.append(int(torch.randint(0, 1 << 62, (), generator=g)))
            dropped.append(drop)
            sig.append(sigma)
            masks.append(self._mask(row, (width, height)))
        n_refs = 0 if drop_refs else len(refs[0])
        hidden = torch.stack([torch.cat([x, *r[:n_refs]]) for x, r in zip(x_t, refs, strict=True)])
        conditioning = recipe.conditioning(texts)
        weight = None
        if any(m is not None for m in masks):
            ones = torch.ones(targets[0].shape[0])
            weight = torch.stack([ones if m is None else mask_weight(m, cfg.train.mask_outside_weight) for m in masks])
        return MicroBatch(
            hidden_states=hidden,
            **conditioning,
            sigma=torch.tensor(sig, dtype=torch.float32),
            **recipe.layout((width, height), n_refs, conditioning["text"].shape[1]),
            target=torch.stack(targets),
            seeds=torch.tensor(route, dtype=torch.int64),
            rows=list(rows),
            dropped=torch.tensor(dropped),
            without_references=drop_refs,
            weight=weight,
        )

    def _latent(self, path, size: tuple[int, int], g: torch.Generator) -> Tensor:
        """A normalised latent: the cached posterior, sampled with this sample's generator."""
        entry = self.cache.read(self.cache.latent_key(self.digests[path], size))
        z = entry["mean"]
        if self.config.data.latent_sample:
            z = z + entry["std"] * torch.randn(z.shape, generator=g)
        return self.norm(z)  # the family's normalisation (Kontext: ``LatentNorm``)

    def _mask(self, row: Row, size: tuple[int, int]) -> Tensor | None:
        """The row's mask as its target's token grid (white share per token), or None without one."""
        if row.mask is None:
            return None
        return self.cache.read(self.cache.mask_key(self.digests[row.mask], size))["mask"]


def _gen(*parts: int | str) -> torch.Generator:
    return torch.Generator().manual_seed(sample_seed(*parts))
