"""Pictures of routing: council heat maps, and per-token expert maps.

Council heat map (per-image routing): layers down, experts across, one panel per instance.
Colour is the router probability of each expert on a fixed scale from 0 to 1 (dark = unlikely,
bright = likely), so the same colour means the same probability in every picture; council
members carry a white frame and their weight printed inside, so forced, banned and scaled
councils are visible at a glance. Both axes are titled and a legend explains the marks.

Token expert map (per-token routing, e.g. ICEdit's MoE-LoRA): one colour per expert over the
image, for the expert most of the chosen layers gave each token first place; darker where the
layers disagree. Only Pillow (and torch for the counting) is needed.
"""

from __future__ import annotations

import textwrap

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from .council import Council
from .layers import rule_names

__all__ = ["EXPERT_COLOURS", "council_heatmap", "dominant_experts", "ramp_legend", "token_expert_map", "vertical_text"]

# A perceptually ordered dark-to-bright ramp (viridis-like), interpolated linearly.
_RAMP = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]


def _colour(v: float) -> tuple[int, int, int]:
    v = min(max(v, 0.0), 1.0) * (len(_RAMP) - 1)
    i = min(int(v), len(_RAMP) - 2)
    t = v - i
    a, b = _RAMP[i], _RAMP[i + 1]
    return tuple(round(a[c] + (b[c] - a[c]) * t) for c in range(3))  # type: ignore[return-value]


def weight_text(weight: float, decimals: int = 2) -> str:
    """A council member's weight for reading: rounded, but never shown as 0 (a member is never
    'weight 0'). The heat map, the Council Preview's summary and the frontend's council map
    (web/lib/council_map.mjs, weightText) all follow this rule."""
    step = 10.0**-decimals
    if weight != 0 and abs(weight) < step / 2:
        return f"<{step:.{decimals}f}" if weight > 0 else f">-{step:.{decimals}f}"
    return f"{weight:.{decimals}f}"


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def vertical_text(text: str, font: ImageFont.ImageFont, fill: tuple[int, int, int], background: tuple[int, int, int]):
    """``text`` written bottom to top on its own ``background`` tile: a y-axis title to paste."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    _, _, right, bottom = measure.textbbox((0, 0), text, font=font)
    tile = Image.new("RGB", (int(right) + 2, int(bottom) + 2), background)
    ImageDraw.Draw(tile).text((0, 0), text, fill=fill, font=font)
    return tile.rotate(90, expand=True)


def ramp_legend(
    draw: ImageDraw.ImageDraw, x: int, y: int, height: int, font, label: str, *, top: float = 1.0, width: int = 120
) -> int:
    """The colour ramp as a key, ``0 [ramp] <top> <label>``, drawn at (x, y); returns the x after it.
    Every routing picture draws its key here, so they all read the ramp the same way."""
    dim = (170, 170, 170)
    draw.text((x, y), "0", fill=dim, font=font)
    x += int(draw.textlength("0 ", font=font))
    for i in range(width):
        draw.line((x + i, y + 2, x + i, y + 2 + height), fill=_colour(i / (width - 1)))
    x += width + 4
    key = f"{top:g} {label}"
    draw.text((x, y), key, fill=dim, font=font)
    return x + int(draw.textlength(key, font=font))


_PROBABILITY = "router probability"


def council_heatmap(council: Council, cell: int = 40, title: str = "") -> Image.Image:
    """Render every instance of ``council`` side by side as one RGB image.

    Rows are labelled the way rules name layers (``double:3``, ``single:12``; see ``rule_names``).
    The colour scale is fixed (probability 0 to 1), not stretched to the picture's own maximum:
    two pictures compare by eye.
    """
    n_layers, n_exp = len(council.layers), council.num_experts
    font, small = _font(max(cell // 2, 9)), _font(max(cell // 3, 8))
    names = rule_names(council.layers)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max((measure.textlength(name, font=small) for name in (*names, "expert")), default=0)
    axis = vertical_text("layer", small, (170, 170, 170), (24, 24, 28))
    axis_w = axis.width + 8
    left = axis_w + max(4 * cell // 2 + 8, int(label_w) + 14)
    top, gap = 5 * cell // 2 + (cell if title else 0), cell
    panel_w = n_exp * cell
    legend_h = max(cell // 3, 8) + 12
    note = "frame: council member, its weight inside"
    legend_w = 8 + ramp_legend(ImageDraw.Draw(Image.new("RGB", (1, 1))), 0, 0, 1, small, _PROBABILITY) + 16
    width = max(left + council.batch_size * (panel_w + gap), legend_w + int(measure.textlength(note, font=small)) + 8)
    height = top + n_layers * cell + cell // 2 + legend_h
    img = Image.new("RGB", (width, height), (24, 24, 28))
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((8, 4), title, fill=(235, 235, 235), font=font)
    img.paste(axis, (6, top + max((n_layers * cell - axis.height) // 2, 0)))
    draw.text((axis_w + 6, top - cell + 2), "expert", fill=(170, 170, 170), font=small)
    for row, name in enumerate(names):
        y = top + row * cell
        draw.text((axis_w + 6, y + cell // 4), name, fill=(200, 200, 200), font=small)
    legend_y = top + n_layers * cell + cell // 4
    x = ramp_legend(draw, 8, legend_y, max(cell // 3, 8) - 2, small, _PROBABILITY)
    draw.text((x + 16, legend_y), note, fill=(170, 170, 170), font=small)
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
                fill = _colour(float(council.probs[b, row, e]))
                draw.rectangle(box, fill=fill)
                w = float(council.weights[b, row, e])
                if w != 0:
                    draw.rectangle(box, outline=(255, 255, 255), width=3)
                    text = weight_text(w).replace("0.", ".", 1) if abs(w) < 1 else f"{w:.1f}"
                    ink = (0, 0, 0) if sum(fill) > 420 else (255, 255, 255)  # readable on bright cells
                    draw.text((box[0] + 5, box[1] + cell // 3), text, fill=ink, font=small)
                if council.banned is not None and bool(council.banned[b, row, e]):
                    draw.line((box[0], box[1], box[2], box[3]), fill=(230, 60, 60), width=3)
    return img


# One colour per expert (Okabe-Ito, distinguishable with the common colour-vision deficiencies),
# then evenly spaced hues for adapters with more than eight experts.
EXPERT_COLOURS = [
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
    (240, 228, 66),
    (0, 114, 178),
    (213, 94, 0),
    (204, 121, 167),
    (235, 235, 235),
]


def _expert_colour(e: int) -> tuple[int, int, int]:
    if e < len(EXPERT_COLOURS):
        return EXPERT_COLOURS[e]
    hue = ((e - len(EXPERT_COLOURS)) * 0.618034) % 1.0  # golden-ratio steps: neighbours differ
    h6 = hue * 6
    x = 1 - abs(h6 % 2 - 1)
    r, g, b = [(1, x, 0), (x, 1, 0), (0, 1, x), (0, x, 1), (x, 0, 1), (1, 0, x)][int(h6) % 6]
    return round(60 + 180 * r), round(60 + 180 * g), round(60 + 180 * b)


def dominant_experts(choices: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """Per token, the expert most layers ranked first, and the share of layers that did.

    ``choices``: ``[layers, tokens]`` expert indices. Ties go to the lower expert index.
    """
    counts = torch.nn.functional.one_hot(choices.long(), num_experts).sum(0)  # [tokens, n]
    top = counts.argmax(-1)
    return top, counts.gather(-1, top[:, None])[:, 0].float() / choices.shape[0]


def token_expert_map(
    dominant: Tensor,
    agreement: Tensor,
    num_experts: int,
    size: tuple[int, int],
    *,
    under: Image.Image | None = None,
    opacity: float = 0.55,
    title: str = "",
) -> Image.Image:
    """The map of one image: ``dominant``/``agreement`` ``[h, w]`` (token grid), drawn at ``size``
    (width, height) over ``under`` (the image, when given), with a legend strip below that gives
    each expert's colour and its share of the tokens."""
    h, w = dominant.shape
    colours = np.array([_expert_colour(e) for e in range(num_experts)], dtype=np.float32)
    shade = 0.35 + 0.65 * agreement.clamp(0, 1).numpy()[..., None]  # dark where the layers disagree
    grid = (colours[dominant.numpy()] * shade).round().clip(0, 255).astype(np.uint8)
    picture = Image.fromarray(grid, "RGB").resize(size, Image.Resampling.NEAREST)
    if under is not None:
        picture = Image.blend(under.convert("RGB").resize(size), picture, opacity)
    font = _font(12)
    line_h, swatch = 18, 12
    counts = torch.bincount(dominant.flatten(), minlength=num_experts)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    entries, x, y = [], 4, 0  # (expert, text, x, line offset): laid out once, wrapping at the width
    for e in range(num_experts):
        share = 100 * float(counts[e]) / max(h * w, 1)
        text = f"{e}: {'<1' if 0 < share < 1 else f'{share:.0f}'}%"
        width = swatch + 6 + int(measure.textlength(text, font=font)) + 14
        if x > 4 and x + width > size[0]:
            x, y = 4, y + line_h
        entries.append((e, text, x, y))
        x += width
    head = line_h if title else 0
    out = Image.new("RGB", (size[0], size[1] + head + y + line_h + 6), (24, 24, 28))
    out.paste(picture, (0, head))
    draw = ImageDraw.Draw(out)
    if title:
        draw.text((4, 2), title, fill=(235, 235, 235), font=font)
    top = size[1] + head + 4
    for e, text, x, y in entries:
        draw.rectangle((x, top + y + 2, x + swatch, top + y + 2 + swatch), fill=_expert_colour(e))
        draw.text((x + swatch + 6, top + y), text, fill=(220, 220, 220), font=font)
    return out
