"""Council heat maps: layers down, experts across, one panel per instance.

Colour is the router probability of each expert (dark = unlikely, bright = likely); council
members carry a white frame and their weight printed inside, so forced, banned and scaled
councils are visible at a glance. Only Pillow is needed.
"""

from __future__ import annotations

import textwrap

from PIL import Image, ImageDraw, ImageFont

from .council import Council
from .layers import block_of, rule_names

__all__ = ["council_heatmap"]

# A perceptually ordered dark-to-bright ramp (viridis-like), interpolated linearly.
_RAMP = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]


def _colour(v: float) -> tuple[int, int, int]:
    v = min(max(v, 0.0), 1.0) * (len(_RAMP) - 1)
    i = min(int(v), len(_RAMP) - 2)
    t = v - i
    a, b = _RAMP[i], _RAMP[i + 1]
    return tuple(round(a[c] + (b[c] - a[c]) * t) for c in range(3))  # type: ignore[return-value]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _short(name: str) -> str:
    """The compact ``D3`` / ``S12`` tag of a layer, for dense training plots (training/report.py);
    the heat map and node summaries use the rule names of ``rule_names`` instead."""
    kind, n = block_of(name)
    return f"{'D' if kind == 'double' else 'S'}{n}"


def council_heatmap(council: Council, cell: int = 40, title: str = "") -> Image.Image:
    """Render every instance of ``council`` side by side as one RGB image.

    Rows are labelled the way rules name layers (``double:3``, ``single:12``; see ``rule_names``).
    """
    n_layers, n_exp = len(council.layers), council.num_experts
    font, small = _font(max(cell // 2, 9)), _font(max(cell // 3, 8))
    names = rule_names(council.layers)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max((measure.textlength(name, font=small) for name in names), default=0)
    left = max(4 * cell // 2 + 8, int(label_w) + 14)
    top, gap = 5 * cell // 2 + (cell if title else 0), cell
    panel_w = n_exp * cell
    width = left + council.batch_size * (panel_w + gap)
    height = top + n_layers * cell + cell // 2
    img = Image.new("RGB", (width, height), (24, 24, 28))
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((8, 4), title, fill=(235, 235, 235), font=font)
    for row, name in enumerate(names):
        y = top + row * cell
        draw.text((6, y + cell // 4), name, fill=(200, 200, 200), font=small)
    peak = float(council.probs.max()) or 1.0
    for b in range(council.batch_size):
        x0 = left + b * (panel_w + gap)
        label = council.label[b] if council.label else f"instance {b}"
        lines = textwrap.wrap(label, width=max(panel_w // 7, 8))[:2] or [""]
        for i, line in enumerate(lines):
            draw.text((x0, top - 2 * cell - cell // 2 + i * (cell // 2)), line, fill=(235, 235, 235), font=small)
        for e in range(n_exp):
            draw.text((x0 + e * cell + cell // 3, top - cell + 2), str(e), fill=(170, 170, 170), font=small)
        for row in range(n_layers):
            y = top + row * cell
            for e in range(n_exp):
                box = (x0 + e * cell, y, x0 + (e + 1) * cell - 2, y + cell - 2)
                fill = _colour(float(council.probs[b, row, e]) / peak)
                draw.rectangle(box, fill=fill)
                w = float(council.weights[b, row, e])
                if w != 0:
                    draw.rectangle(box, outline=(255, 255, 255), width=3)
                    text = f"{w:.2f}".lstrip("0") if abs(w) < 1 else f"{w:.1f}"
                    ink = (0, 0, 0) if sum(fill) > 420 else (255, 255, 255)  # readable on bright cells
                    draw.text((box[0] + 5, box[1] + cell // 3), text, fill=ink, font=small)
                if council.banned is not None and bool(council.banned[b, row, e]):
                    draw.line((box[0], box[1], box[2], box[3]), fill=(230, 60, 60), width=3)
    return img
