"""What a checkpoint is judged by: the routing report, held-out flow losses, and sample edits.

All of it runs on the main process in eval mode (no gate noise, no router dropout) without
gradients, and puts the model back into training mode afterwards. Flow losses are measured at
fixed timesteps with fixed noise and at the guidance the adapter trains at (``train.guidance``), so
numbers of different checkpoints compare like with like.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from instructmole import Council

from .modules import TrainingModel
from .recipe import MicroBatch, MicroBatches, sample_seed
from .report import (
    balance,
    layer_labels,
    modal_councils,
    report_image,
    routing_metrics,
    task_mean_weights,
    usage,
)

__all__ = ["Evaluator", "eval_mode"]

EVAL_SIGMAS = (0.25, 0.5, 0.75)


@contextlib.contextmanager
def eval_mode(model: TrainingModel) -> Iterator[None]:
    """Eval mode and no gradients for the block; training mode and auto routing restored after."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.handle.council = None
        model.runtime_layers(None)
        model.train(was)


@dataclass
class Evaluator:
    """Report inputs fixed once per run: which rows and instructions are measured."""

    model: TrainingModel
    data: MicroBatches  # builds model inputs from the cache (``assemble``)
    train_rows: list[int]  # manifest rows used for training (their instructions give modal councils)
    holdout_rows: list[int]  # held-out rows (decode, agreement, flow losses)
    max_rows: int
    batch_size: int
    device: torch.device
    dtype: torch.dtype  # input dtype of the transformer (fp32 under autocast)
    autocast: str  # "bf16" | "fp16" | "no"
    vae: object = None  # the VAE, kept on the main process when samples are rendered

    # ---- councils -----------------------------------------------------------------------------

    def councils(self, instructions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Eval-mode ``(indices [b, L, k], weights [b, L, k])`` of each instruction."""
        cache = self.data.cache
        out_i, out_w = [], []
        for start in range(0, len(instructions), 64):
            feats = [cache.read(cache.text_key(t)) for t in instructions[start : start + 64]]
            text, pooled, mask = self.data.recipe.route_signal(feats)  # the family's router signal
            text = text.to(self.device)
            pooled = None if pooled is None else pooled.to(self.device)
            _, indices, weights = self.model.handle.runtime.route(text, pooled, mask=mask)
            out_i.append(indices.cpu())
            out_w.append(weights.cpu())
        return torch.cat(out_i), torch.cat(out_w)

    # ---- flow losses --------------------------------------------------------------------------

    def _batches(self, rows: Sequence[int]) -> Iterator[list[int]]:
        """Rows grouped by (bucket, reference count), then cut into batches."""
        groups: dict[tuple, list[int]] = {}
        for r in rows:
            groups.setdefault((self.data.sizes[r], len(self.data.rows[r].references)), []).append(r)
        for group in groups.values():
            for start in range(0, len(group), self.batch_size):
                yield group[start : start + self.batch_size]

    def flow_losses(self, rows: Sequence[int], councils: dict[int, Council] | None = None) -> Tensor:
        """Per row, the flow loss averaged over ``EVAL_SIGMAS`` (fixed noise per row and sigma).

        ``councils``: a fixed council per row instead of the row's own routing.
        """
        out = {}
        self._orthogonality = []
        for batch in self._batches(rows):
            total = torch.zeros(len(batch))
            for k, sigma in enumerate(EVAL_SIGMAS):
                seeds = [sample_seed(0, "eval", r, k) for r in batch]
                inputs = self.data.assemble(batch, seeds, sigmas=[sigma] * len(batch), dropout=False)
                if councils is not None:
                    self.model.handle.council = Council.cat([councils[r] for r in batch])
                total += self._flow(inputs).cpu()
            for r, loss in zip(batch, total / len(EVAL_SIGMAS), strict=True):
                out[r] = float(loss)
        self.model.handle.council = None
        return torch.tensor([out[r] for r in rows])

    def _flow(self, mb: MicroBatch) -> Tensor:
        with torch.autocast(self.device.type, dtype=_AUTOCAST.get(self.autocast), enabled=self.autocast != "no"):
            guidance = self.data.config.train.guidance  # the value the adapter is trained at (the flow it learns)
            outputs = self.model(**model_inputs(mb, self.device, self.dtype, guidance), aux_reduction="mean")
        self._orthogonality.append(float(outputs["orthogonality"]))  # mean cos² of expert outputs, per layer
        return outputs["flow"].float()

    # ---- the report ---------------------------------------------------------------------------

    def report(self, step: int) -> tuple[dict, object]:
        """``(data, picture)`` of the routing report at ``step``.

        Rows without a ``task`` tag take no part in the per-task numbers; when no row has one, all
        rows form one group (the picture then shows the overall expert use, and only the flow,
        balance and orthogonality numbers are computed).
        """
        rows = self.data.rows
        cfg = self.model.mole.config
        data: dict = {"step": step, "layers": list(cfg.instruction_layers), "metrics": {}}
        if not cfg.instruction_layers:
            data["note"] = "every MoLE layer is token-routed: there are no councils to report"
            return data, _note_image(data["note"])
        tagged = any(rows[r].task is not None for r in self.train_rows)
        group = (lambda r: rows[r].task) if tagged else (lambda r: "all rows")
        with eval_mode(self.model):
            # one entry per distinct (task, phrasing): modal councils count phrasings, not rows
            phrasings = sorted({(group(r), rows[r].instruction) for r in self.train_rows if group(r) is not None})
            train_idx, train_w = self.councils([p for _, p in phrasings])
            train_tasks = [t for t, _ in phrasings]
            held = [r for r in self.holdout_rows if group(r) in set(train_tasks)][: self.max_rows]
            metrics: dict[str, float] = {}
            modal: dict = {}
            if held:
                held_idx, _ = self.councils([rows[r].instruction for r in held])
                own = self.flow_losses(held)
                metrics["orthogonality"] = sum(self._orthogonality) / len(self._orthogonality)
                if tagged:
                    swapped = self.flow_losses(held, self._swapped_councils(held, phrasings, train_idx, train_w))
                    modal, routing = routing_metrics(
                        train_idx, train_tasks, held_idx, [group(r) for r in held], cfg.num_experts, own, swapped
                    )
                    metrics.update(routing)
                else:
                    metrics["balance"] = balance(usage(held_idx, cfg.num_experts))
                self.model.runtime_layers(set())  # the base model: every expert term off (LoRA too)
                with self.model.lora_disabled():
                    base = self.flow_losses(held)
                self.model.runtime_layers(None)
                metrics["heldout_flow"] = float(own.mean())
                metrics["base_flow"] = float(base.mean())
                metrics["flow_vs_base"] = float(own.mean() / base.mean() - 1)
            else:
                data["note"] = "no held-out rows (split: holdout) of the trained tasks: only the councils are shown"
            names, means = task_mean_weights(_dense(train_idx, train_w, cfg.num_experts), train_tasks)
            data["tasks"] = names
            data["metrics"] = metrics
            data["modal_councils"] = {t: [sorted(s) for s in sets] for t, sets in modal.items()}
            data["layer_labels"] = layer_labels(cfg.instruction_layers)
            data["mean_weights"] = {t: means[i].tolist() for i, t in enumerate(names)}
            shown = {k: metrics[k] for k in _SHOWN if k in metrics}
            picture = report_image(names, means, modal, cfg.instruction_layers, shown, title=f"step {step}")
        return data, picture

    def _swapped_councils(
        self, held: list[int], phrasings: list[tuple[str, str]], indices: Tensor, weights: Tensor
    ) -> dict[int, Council]:
        """For each held-out row, the council of another task (the next one, cyclically): the routed
        council of that task's most typical training phrasing (closest to its modal councils)."""
        cfg = self.model.mole.config
        tasks = sorted({t for t, _ in phrasings})
        modal = modal_councils(indices, [t for t, _ in phrasings])
        typical: dict[str, Council] = {}
        for task in tasks:
            best, best_score = None, -1
            for i, (t, _) in enumerate(phrasings):
                if t != task:
                    continue
                score = sum(set(indices[i, layer].tolist()) == modal[t][layer] for layer in range(indices.shape[1]))
                if score > best_score:
                    best, best_score = i, score
            dense = _dense(indices[best : best + 1], weights[best : best + 1], cfg.num_experts)
            typical[task] = Council(
                tuple(cfg.instruction_layers), dense, dense, cfg.top_k, self.model.handle.runtime.adapter_id
            )
        rows = self.data.rows
        other = {t: tasks[(i + 1) % len(tasks)] for i, t in enumerate(tasks)}
        return {r: typical[other[rows[r].task]] for r in held}


_SHOWN = ("distinctness", "decode_accuracy", "swap_gap", "agreement", "balance", "orthogonality", "flow_vs_base")
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _note_image(text: str):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (16 + 7 * len(text), 40), (24, 24, 28))
    ImageDraw.Draw(image).text((8, 12), text, fill=(235, 235, 235))
    return image


def _dense(indices: Tensor, weights: Tensor, n: int) -> Tensor:
    return torch.zeros(*indices.shape[:2], n).scatter_(-1, indices, weights.float())


def model_inputs(mb: MicroBatch, device: torch.device, dtype: torch.dtype, guidance: float) -> dict:
    """The ``TrainingModel`` keyword arguments of a micro-batch, on ``device``. The chat-LLM families'
    fields (``text_mask``, ``route_text``, ``route_mask``, ``img_shapes``) are added where the
    micro-batch has them; a Kontext micro-batch gives the same arguments as ever."""
    b = mb.hidden_states.shape[0]

    def on(t: Tensor | None, as_dtype: bool = True) -> Tensor | None:
        return None if t is None else t.to(device, dtype) if as_dtype else t.to(device)

    inputs = {
        "hidden_states": mb.hidden_states.to(device, dtype),
        "text": mb.text.to(device, dtype),
        "pooled": on(mb.pooled),
        "sigma": mb.sigma.to(device, dtype),
        "img_ids": on(mb.img_ids, False),
        "txt_ids": on(mb.txt_ids, False),
        "guidance": torch.full((b,), guidance, device=device, dtype=dtype),
        "target": mb.target.to(device),
        "seeds": mb.seeds,
    }
    extra = {
        "text_mask": on(mb.text_mask, False),
        "route_text": on(mb.route_text),
        "route_mask": on(mb.route_mask, False),
        "img_shapes": mb.img_shapes,
    }
    return {**inputs, **{k: v for k, v in extra.items() if v is not None}}


def render_samples(
    model: TrainingModel,
    vae,
    cache,
    items: Sequence,
    references: dict,
    norm,
    *,
    steps: int,
    guidance: float,
    seed: int,
):
    """A sheet with one row per sample item: its references, then the adapter's edit (PIL image).

    ``references``: per reference path, its ``(content hash, bucket size)`` in the cache.
    """
    from .sampling import decode, edit_latents

    rows = []
    with eval_mode(model):
        for item in items:
            text = cache.read(cache.text_key(item.instruction))
            refs = []
            for path in item.references:
                digest, size = references[Path(path)]
                z = cache.read(cache.latent_key(digest, size))["mean"][None]
                refs.append((z - norm.shift) * norm.scale)
            t5, pooled = text["t5"][None], text["pooled"][None]
            edited = edit_latents(model.transformer, t5, pooled, refs, steps=steps, guidance=guidance, seed=seed)
            rows.append([decode(vae, z, norm)[0] for z in (*refs, edited)])
    return image_sheet(rows)


def image_sheet(rows: Sequence[Sequence[Tensor]], gap: int = 4):
    """Images ``[3, H, W]`` in [0, 1] laid out in rows on a dark background (PIL image)."""
    from PIL import Image

    def pil(im: Tensor) -> Image.Image:
        return Image.fromarray((im.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8"))

    tiles = [[pil(im) for im in r] for r in rows]
    width = max(sum(t.width + gap for t in r) for r in tiles) + gap
    height = sum(max(t.height for t in r) + gap for r in tiles) + gap
    sheet = Image.new("RGB", (width, height), (24, 24, 28))
    y = gap
    for r in tiles:
        x = gap
        for t in r:
            sheet.paste(t, (x, y))
            x += t.width + gap
        y += max(t.height for t in r) + gap
    return sheet
