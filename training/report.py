"""The routing report: do different tasks get different councils? Metrics over tensors, plus a picture.

At each checkpoint the trainer routes the *training* phrasings of every task and takes, per task
and layer, the modal council (the most frequent top-k set); the *held-out* phrasings are then
judged against those modal councils. The functions here are pure: they take index tensors
``[b, L, k]`` (the experts chosen for instance ``b`` at instruction-routed layer ``l``, e.g. from
``Council.compact()`` or the router's top-k) and one task name per instance; running the model
is the caller's job. Metrics (docs/training.md, "What the routing report measures"):

- ``distinctness``: mean over task pairs of 1 − Jaccard of their modal councils, averaged over
  layers (1 = no two tasks share an expert, 0 = every task has the same council).
- ``decode_accuracy``: each held-out instance is assigned to the task whose modal councils match
  its own best (summed Jaccard over layers); the share assigned to its own task. Chance is 1/T.
- ``agreement``: share of held-out (instance, layer) pairs whose council is its task's modal one.
  A random router already scores 0.5–0.8: never report it alone.
- ``swap_gap``: relative increase of the held-out flow loss under another task's council.
- ``balance``: normalised entropy of expert usage (1 = even, 0 = one expert does everything).

``report_image`` draws one panel per task (layers down, experts across, colour = mean council
weight, modal council framed) and ``write_report`` stores the JSON and PNG atomically.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from instructmole.files import atomic_path
from instructmole.layers import block_of
from instructmole.viz import _RAMP, _colour, _font, ramp_legend, vertical_text

__all__ = [
    "agreement",
    "balance",
    "council_sets",
    "decode_accuracy",
    "distinctness",
    "jaccard",
    "layer_labels",
    "modal_councils",
    "report_image",
    "routing_metrics",
    "swap_gap",
    "task_mean_weights",
    "usage",
    "write_report",
]

Modal = dict[str, list[frozenset[int]]]  # task -> per layer, its modal council

# ---- councils ---------------------------------------------------------------------------------


def _check_indices(indices: Tensor, tasks: Sequence[str] | None = None) -> None:
    if indices.ndim != 3 or indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(
            f"expert indices must be an integer tensor [instances, layers, k], got {indices.dtype} "
            f"{tuple(indices.shape)}"
        )
    if tasks is not None and len(tasks) != indices.shape[0]:
        raise ValueError(f"{len(tasks)} task names were given for {indices.shape[0]} instances: give one per instance")


def council_sets(indices: Tensor) -> list[list[frozenset[int]]]:
    """``indices [b, L, k]`` -> per instance, per layer, the set of chosen experts."""
    _check_indices(indices)
    return [[frozenset(layer) for layer in inst] for inst in indices.tolist()]


def jaccard(a: frozenset[int], b: frozenset[int]) -> float:
    """|a ∩ b| / |a ∪ b|; two empty councils count as identical (1.0)."""
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def modal_councils(indices: Tensor, tasks: Sequence[str]) -> Modal:
    """Per task, per layer: the most frequent top-k set over that task's instances.

    Ties go to the set whose sorted tuple of experts is smallest, so the result never depends on
    the order of the instances.
    """
    _check_indices(indices, tasks)
    sets = council_sets(indices)
    by_task: dict[str, list[list[frozenset[int]]]] = {}
    for task, inst in zip(tasks, sets, strict=True):
        by_task.setdefault(task, []).append(inst)
    modal: Modal = {}
    for task in sorted(by_task):
        rows = by_task[task]
        modal[task] = []
        for layer in range(indices.shape[1]):
            counts = Counter(row[layer] for row in rows)
            modal[task].append(min(counts, key=lambda s: (-counts[s], tuple(sorted(s)))))
    return modal


def _num_layers(modal: Mapping[str, Sequence[frozenset[int]]]) -> int:
    sizes = {len(v) for v in modal.values()}
    if len(sizes) > 1:
        raise ValueError(f"modal councils cover different numbers of layers per task: {sorted(sizes)}")
    return sizes.pop() if sizes else 0


def distinctness(modal: Mapping[str, Sequence[frozenset[int]]]) -> float:
    """Mean over task pairs of (1 − Jaccard of their modal councils), averaged over layers.

    ``nan`` with fewer than two tasks (or no layers): there is nothing to tell apart.
    """
    n_layers = _num_layers(modal)
    names = sorted(modal)
    pairs = list(itertools.combinations(names, 2))
    if not pairs or not n_layers:
        return math.nan
    total = sum(1.0 - jaccard(modal[a][l], modal[b][l]) for a, b in pairs for l in range(n_layers))
    return total / (len(pairs) * n_layers)


def _own_modal(modal: Mapping[str, Sequence[frozenset[int]]], indices: Tensor, tasks: Sequence[str]) -> int:
    _check_indices(indices, tasks)
    n_layers = _num_layers(modal)
    if modal and n_layers != indices.shape[1]:
        raise ValueError(f"modal councils cover {n_layers} layers but the indices have {indices.shape[1]}")
    if missing := sorted(set(tasks) - set(modal)):
        raise ValueError(
            f"task(s) {', '.join(map(repr, missing))} have no modal council: every task judged needs "
            "training phrasings routed into modal_councils first"
        )
    return n_layers


def decode_accuracy(modal: Mapping[str, Sequence[frozenset[int]]], indices: Tensor, tasks: Sequence[str]) -> float:
    """Share of (held-out) instances whose councils match their own task's modal councils best.

    The match of an instance to a task is the Jaccard of their councils summed over layers; the
    instance goes to the best-matching task. A tie among m tasks that includes the instance's own
    task earns 1/m (the expected score of a fair coin among them), so ties never favour a task by
    its name: a router that gives every task the same councils scores exactly chance, 1/T.
    ``nan`` for no instances.
    """
    n_layers = _own_modal(modal, indices, tasks)
    if not tasks:
        return math.nan
    names = sorted(modal)
    credit = 0.0
    for task, inst in zip(tasks, council_sets(indices), strict=True):
        scores = {t: sum(jaccard(inst[l], modal[t][l]) for l in range(n_layers)) for t in names}
        best = max(scores.values())
        tied = [t for t in names if scores[t] >= best - 1e-9]
        if task in tied:
            credit += 1.0 / len(tied)
    return credit / len(tasks)


def agreement(modal: Mapping[str, Sequence[frozenset[int]]], indices: Tensor, tasks: Sequence[str]) -> float:
    """Share of (instance, layer) pairs whose council equals its task's modal council (``nan`` if none)."""
    n_layers = _own_modal(modal, indices, tasks)
    if not tasks or not n_layers:
        return math.nan
    hits = sum(
        inst[l] == modal[task][l]
        for task, inst in zip(tasks, council_sets(indices), strict=True)
        for l in range(n_layers)
    )
    return hits / (len(tasks) * n_layers)


def swap_gap(own: Tensor | Sequence[float], swapped: Tensor | Sequence[float]) -> float:
    """``(mean(swapped) − mean(own)) / mean(own)``: 0.12 = routing with another task's council costs 12% more loss.

    The two may differ in shape (e.g. one swapped loss per other task); ``nan`` if either is empty
    or the own loss is 0.
    """
    own_t, swapped_t = torch.as_tensor(own, dtype=torch.float64), torch.as_tensor(swapped, dtype=torch.float64)
    if own_t.numel() == 0 or swapped_t.numel() == 0:
        return math.nan
    base = float(own_t.mean())
    return (float(swapped_t.mean()) - base) / base if base else math.nan


def usage(indices: Tensor, num_experts: int) -> Tensor:
    """``[L, n]`` share of the routing slots of each layer that each expert fills (rows sum to 1)."""
    _check_indices(indices)
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_experts):
        raise ValueError(
            f"expert indices run from {int(indices.min())} to {int(indices.max())}, outside 0..{num_experts - 1}"
        )
    b, n_layers, k = indices.shape
    counts = torch.zeros(n_layers, num_experts, dtype=torch.float64)
    counts.scatter_add_(
        1, indices.permute(1, 0, 2).reshape(n_layers, b * k).long(), torch.ones(n_layers, b * k, dtype=torch.float64)
    )
    return (counts / max(b * k, 1)).float()


def balance(usage: Tensor) -> float:
    """Normalised entropy of expert usage ``[L, n]``, averaged over layers: 1 = even, 0 = one expert.

    Rows are normalised first; empty rows are skipped (``nan`` if all are). One expert is always
    perfectly balanced.
    """
    if usage.ndim != 2:
        raise ValueError(f"usage must be [layers, experts], got {tuple(usage.shape)}")
    p = usage.double()
    totals = p.sum(-1, keepdim=True)
    p = (p / totals.clamp_min(1e-300))[totals.squeeze(-1) > 0]
    if p.shape[0] == 0:
        return math.nan
    if p.shape[1] == 1:
        return 1.0
    entropy = -(p * p.clamp_min(1e-300).log()).sum(-1) / math.log(p.shape[1])
    return float(entropy.clamp(0.0, 1.0).mean())


def task_mean_weights(weights: Tensor, tasks: Sequence[str]) -> tuple[list[str], Tensor]:
    """Dense council weights ``[b, L, n]`` -> (task names sorted, ``[T, L, n]`` mean weight per task)."""
    if weights.ndim != 3:
        raise ValueError(f"council weights must be [instances, layers, experts], got {tuple(weights.shape)}")
    if len(tasks) != weights.shape[0]:
        raise ValueError(f"{len(tasks)} task names were given for {weights.shape[0]} instances: give one per instance")
    names = sorted(set(tasks))
    rows = torch.tensor([names.index(t) for t in tasks], dtype=torch.long)
    means = (
        torch.stack([weights[rows == i].float().mean(0) for i in range(len(names))])
        if names
        else (weights.new_zeros((0, *weights.shape[1:])).float())
    )
    return names, means


def routing_metrics(
    train_indices: Tensor,
    train_tasks: Sequence[str],
    held_indices: Tensor,
    held_tasks: Sequence[str],
    num_experts: int,
    own_loss: Tensor | Sequence[float] | None = None,
    swapped_loss: Tensor | Sequence[float] | None = None,
) -> tuple[Modal, dict[str, float]]:
    """All report metrics at once: modal councils from the training phrasings, judged on the held-out ones.

    Returns ``(modal, metrics)`` with metric keys ``distinctness``, ``decode_accuracy``, ``agreement``,
    ``balance`` (of the held-out usage) and, when both losses are given, ``swap_gap``.
    """
    modal = modal_councils(train_indices, train_tasks)
    metrics = {
        "distinctness": distinctness(modal),
        "decode_accuracy": decode_accuracy(modal, held_indices, held_tasks),
        "agreement": agreement(modal, held_indices, held_tasks),
    }
    if own_loss is not None and swapped_loss is not None:
        metrics["swap_gap"] = swap_gap(own_loss, swapped_loss)
    metrics["balance"] = balance(usage(held_indices, num_experts))
    return modal, metrics


# ---- picture ----------------------------------------------------------------------------------

_BG, _INK, _DIM, _FRAME = (24, 24, 28), (235, 235, 235), (165, 165, 170), (255, 255, 255)
# How the known metrics are written under the panels; others print as "<key with spaces> 0.123".
_METRIC_LABELS = {"decode_accuracy": "decode", "swap_gap": "swap gap"}


def layer_labels(layer_names: Sequence[str]) -> list[str]:
    """Row labels as council rules name layers (``double:0``, ``single:3``): one naming in every
    picture, node and rule. A block holding several of the layers keeps their full names; names
    outside the Flux blocks stay as they are."""
    kinds = [_block(name) for name in layer_names]
    short = [f"{b[0]}:{b[1]}" if b else name for name, b in zip(layer_names, kinds, strict=True)]
    counts = Counter(short)
    return [s if counts[s] == 1 else name for s, name in zip(short, layer_names, strict=True)]


def _block(name: str) -> tuple[str, int] | None:
    try:
        return block_of(name)
    except ValueError:
        return None


def _format_metric(key: str, value: float | str) -> str:
    label = _METRIC_LABELS.get(key, key.replace("_", " "))
    if isinstance(value, str):
        return f"{label} {value}"
    if value is None or not math.isfinite(value):
        return f"{label} n/a"
    if "gap" in key:
        return f"{label} {value * 100:.0f}%"
    return f"{label} {value:.2f}" if abs(value) < 100 else f"{label} {value:.4g}"


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: float) -> str:
    """``text`` cut with an ellipsis so that it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _wrap(draw: ImageDraw.ImageDraw, parts: Sequence[str], font: Any, width: float, sep: str = " · ") -> list[str]:
    """Join ``parts`` with ``sep`` into as few lines as fit ``width`` (a part is never split)."""
    lines: list[str] = []
    for part in parts:
        if lines and draw.textlength(lines[-1] + sep + part, font=font) <= width:
            lines[-1] += sep + part
        else:
            lines.append(part)
    return lines


def _auto_cell(n_layers: int) -> int:
    """Row height in pixels: 36 for a few layers, shrinking so that ~57 layers stay under ~900 px."""
    return max(10, min(36, 900 // max(n_layers, 1)))


def report_image(
    task_names: Sequence[str],
    mean_weights: Tensor,
    modal: Mapping[str, Sequence[frozenset[int]]] | None,
    layer_names: Sequence[str],
    metrics: Mapping[str, float | str],
    title: str = "",
    cell: int | None = None,
    scale: float = 1.0,
) -> Image.Image:
    """One panel per task: layers down, experts across, colour = mean council weight, modal council framed.

    ``mean_weights [T, L, n]`` is in the order of ``task_names`` (as ``task_mean_weights`` returns
    them). The colour scale is fixed, from 0 to ``scale`` (1 = the largest weight a council member
    can have; larger values get the top colour), never the picture's own maximum: the same colour
    means the same weight in every report, so two runs or two checkpoints compare by eye. The axes
    are titled ("layer" down the left, "expert" before each panel's expert numbers). Tasks missing
    from ``modal`` (or ``modal=None``) get no frames. ``metrics`` are written under the panels in
    their order (``swap_gap`` and other ``*gap*`` keys as percentages, strings as given). ``cell``
    is the row height in pixels; by default it shrinks with the number of layers.
    """
    n_tasks = len(task_names)
    if mean_weights.ndim != 3 or mean_weights.shape[0] != n_tasks or mean_weights.shape[1] != len(layer_names):
        raise ValueError(
            f"mean_weights {tuple(mean_weights.shape)} must be [tasks={n_tasks}, layers={len(layer_names)}, experts]"
        )
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"the colour scale must be a positive number, got {scale!r}")
    n_layers, n_exp = mean_weights.shape[1], mean_weights.shape[2]
    ch = cell or _auto_cell(n_layers)  # row height
    cw = max(ch, 14, -(-96 // max(n_exp, 1)))  # column width: panels at least ~96 px wide for their header
    fs = max(10, min(16, ch // 2 + 2))
    font, small = _font(fs + 1), _font(fs - 1)
    mfs = max(fs + 1, 14)  # title and metrics stay large however small the cells get
    mfont, big = _font(mfs), _font(mfs + 3)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    labels = layer_labels(layer_names)
    label_step = 1 if ch >= 12 else 2
    # Rows, with a small gap wherever the block kind changes (double -> single blocks).
    kinds = [b[0] if (b := _block(name)) else "" for name in layer_names]
    breaks = list(itertools.accumulate(int(r > 0 and kinds[r] != kinds[r - 1]) for r in range(len(kinds))))
    axis_w = fs + 10  # the rotated "layer" title left of the row labels
    label_w = max((probe.textlength(s, font=small) for s in (*labels, "expert")), default=0)
    left = axis_w + 12 + int(label_w) + 8
    gap, pad = max(ch // 2, 12), 12
    panel_w = n_exp * cw
    width = max(left + max(n_tasks, 1) * (panel_w + gap) - gap + pad, 420)
    inner = width - 2 * pad

    title_lines = _wrap(probe, title.split(), big, inner, sep=" ") if title else []
    metric_parts = [_format_metric(k, v) for k, v in metrics.items()]
    metric_lines = _wrap(probe, metric_parts, mfont, inner) if metric_parts else []
    line_h, big_h, mline_h = fs + 6, mfs + 9, mfs + 6
    top = pad + len(title_lines) * big_h + (6 if title_lines else 0) + line_h + (fs + 4)  # title, task, expert ids
    grid_h = n_layers * ch + (breaks[-1] * 4 if breaks else 0)
    legend_y = top + grid_h + 10
    metrics_y = legend_y + line_h + 8
    height = metrics_y + len(metric_lines) * mline_h + pad

    img = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(img)
    y = pad
    for line in title_lines:
        draw.text((pad, y), line, fill=_INK, font=big)
        y += big_h

    for row, label in enumerate(labels):
        if row % label_step == 0:
            ty = top + row * ch + breaks[row] * 4 + (ch - fs) // 2
            draw.text((left - 8 - probe.textlength(label, font=small), ty), label, fill=_DIM, font=small)

    # Axis titles: "expert" on the row of expert numbers, "layer" down the left of the rows.
    draw.text((left - 8 - probe.textlength("expert", font=small), top - fs - 4), "expert", fill=_DIM, font=small)
    axis = vertical_text("layer", small, _DIM, _BG)
    img.paste(axis, (pad, top + max((grid_h - axis.height) // 2, 0)))
    inset = 1 if ch >= 12 else 0
    frame = 2 if ch >= 14 else 1
    show_values = ch >= 30 and cw >= 30
    for t, task in enumerate(task_names):
        x0 = left + t * (panel_w + gap)
        draw.text((x0, top - line_h - (fs + 4)), _fit(draw, task, font, panel_w + gap - 4), fill=_INK, font=font)
        for e in range(n_exp):
            text = str(e)
            tx = x0 + e * cw + (cw - draw.textlength(text, font=small)) / 2
            draw.text((tx, top - fs - 4), text, fill=_DIM, font=small)
        council = modal.get(task) if modal else None
        for row in range(n_layers):
            y0 = top + row * ch + breaks[row] * 4
            members = council[row] if council is not None else frozenset()
            for e in range(n_exp):
                box = (x0 + e * cw, y0, x0 + (e + 1) * cw - 1 - inset, y0 + ch - 1 - inset)
                w = float(mean_weights[t, row, e])
                fill = _colour(abs(w) / scale)
                draw.rectangle(box, fill=fill)
                if e in members:
                    draw.rectangle(box, outline=_FRAME, width=frame)
                if show_values and w:
                    value = f"{w:.2f}".replace("0.", ".", 1) if abs(w) < 1 else f"{w:.1f}"
                    ink = (0, 0, 0) if sum(fill) > 420 else (255, 255, 255)
                    vx = box[0] + (box[2] - box[0] - draw.textlength(value, font=small)) / 2
                    draw.text((vx, box[1] + (ch - fs) // 2), value, fill=ink, font=small)

    # Legend: the fixed colour ramp from 0 to the scale, and what a frame means.
    bar_h = max(fs - 2, 8)
    x = ramp_legend(draw, pad, legend_y, bar_h, small, "mean council weight", top=scale) + 16
    if modal and x + bar_h + 120 <= width - pad:
        draw.rectangle((x, legend_y + 2, x + bar_h, legend_y + 2 + bar_h), fill=_RAMP[2], outline=_FRAME, width=2)
        draw.text((x + bar_h + 6, legend_y), "modal council", fill=_DIM, font=small)

    for i, line in enumerate(metric_lines):
        draw.text((pad, metrics_y + i * mline_h), line, fill=_INK, font=mfont)
    return img


# ---- files ------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """Plain JSON values: NaN/inf -> None, tensors and sets -> lists (sets sorted), paths -> str."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return [_jsonable(v) for v in sorted(value)]
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _jsonable(value.item())
    return value


def _atomic_write(path: Path, write: Any) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        write(fh)


def write_report(folder: Path | str, name: str, data: Mapping[str, Any], image: Image.Image) -> tuple[Path, Path]:
    """Write ``<name>.json`` (indent 2, sorted keys, NaN as null) and ``<name>.png``, each atomically.

    Returns ``(json_path, png_path)``. ``data`` may hold tensors, sets (modal councils) and floats.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, png_path = folder / f"{name}.json", folder / f"{name}.png"
    text = json.dumps(_jsonable(data), indent=2, sort_keys=True, allow_nan=False) + "\n"
    _atomic_write(json_path, lambda fh: fh.write(text.encode("utf-8")))
    _atomic_write(png_path, lambda fh: image.convert("RGB").save(fh, format="PNG"))
    return json_path, png_path
