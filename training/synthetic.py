"""A synthetic multi-task edit data set, written to disk as a real manifest (the demo's and tests' data).

Procedural images (a two-colour gradient with a few shapes) and six *tonal* edits, each with ten
phrasings of which some are held out: the router must learn which phrasings belong together
from the text alone, and the held-out phrasings tell whether it did. Tonal edits are the ones that
specialise at this scale (a prototype saw geometric edits collapse onto one or two councils).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "HELD_OUT",
    "KEY_WORDS",
    "PHRASINGS",
    "TASKS",
    "TEMPLATES",
    "all_phrasings",
    "procedural_image",
    "write_dataset",
]


def _gray(a: np.ndarray) -> np.ndarray:
    y = a @ np.array([0.299, 0.587, 0.114])
    return np.repeat(y[..., None], 3, axis=-1)


def _shift(red: float, blue: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda a: a + np.array([red, 0.0, blue])


TASKS: dict[str, Callable[[np.ndarray], np.ndarray]] = {  # on float RGB in [0, 255]
    "invert": lambda a: 255.0 - a,
    "grayscale": _gray,
    "brighten": lambda a: a * 0.55 + 115.0,
    "darken": lambda a: a * 0.4,
    "warm": _shift(60.0, -60.0),
    "cool": _shift(-60.0, 60.0),
}

# Per task its key words: a verb, an adjective and a "look" word. The tiny random text encoders know
# words, not meanings, so a task's phrasings share these words in new sentences in place of the
# synonymy a real T5 brings ("darker", "dim", "darken").
KEY_WORDS: dict[str, tuple[str, str, str]] = {
    "invert": ("invert", "inverted", "negative"),
    "grayscale": ("grayscale", "gray", "monochrome"),
    "brighten": ("brighten", "brighter", "lighter"),
    "darken": ("darken", "darker", "dim"),
    "warm": ("warm", "warmer", "golden"),
    "cool": ("cool", "cooler", "blue"),
}
# Every task is phrased in the same sentences, so that the filler words ("please", "the image") say
# nothing about the task and only the key words do. With task-specific fillers the router learned the
# fillers: held-out phrasings with "please" went to the tasks whose training phrasings had it (e.g.
# "darker please" to brighten's "a lighter version please"), and those edits went the wrong way.
# The last HELD_OUT templates are never trained on: new sentences around known key words.
TEMPLATES = (
    "make it {adjective}",
    "{verb} the image",
    "make the photo {adjective}",
    "please {verb} it",
    "give it a {look} look",
    "a {look} version please",
    "{adjective} please",
    "{verb} the picture",
    "can you make this {adjective}",
    "a {look} picture",
)
PHRASINGS: dict[str, list[str]] = {
    task: [t.format(verb=verb, adjective=adjective, look=look) for t in TEMPLATES]
    for task, (verb, adjective, look) in KEY_WORDS.items()
}
HELD_OUT = 4


def all_phrasings() -> list[str]:
    """Every phrasing (train and held-out): the tiny tokenizers must know their words."""
    return [p for phrasings in PHRASINGS.values() for p in phrasings]


def procedural_image(rng: np.random.Generator, size: int = 32) -> Image.Image:
    """A gradient between two random colours with one to three random shapes on it."""
    c0, c1 = rng.uniform(30, 225, 3), rng.uniform(30, 225, 3)
    t = np.linspace(0, 1, size)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.clip(np.cos(angle) * t[None, :] + np.sin(angle) * t[:, None], 0, 1)
    pixels = c0 * (1 - ramp[..., None]) + c1 * ramp[..., None]
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(1, 4)):
        x0, y0 = rng.integers(0, size - 8, 2)
        w, h = rng.integers(6, size // 2, 2)
        fill = tuple(int(v) for v in rng.uniform(20, 235, 3))
        box = (int(x0), int(y0), int(min(x0 + w, size - 1)), int(min(y0 + h, size - 1)))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    return image


def edit(image: Image.Image, task: str) -> Image.Image:
    pixels = TASKS[task](np.asarray(image, dtype=np.float64))
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


def write_dataset(
    folder: str | Path, *, images: int = 96, holdout_images: int = 8, seed: int = 0, size: int = 32
) -> Path:
    """Write ``folder/manifest.jsonl`` and its images; returns the manifest's path.

    Training rows: every image under every task with a training phrasing (cycled, so each is used
    about equally); held-out rows: other images, each task with each of its held-out phrasings.
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(images + holdout_images):
        source = procedural_image(rng, size)
        name = f"images/{i:04d}.png"
        source.save(folder / name)
        for t, task in enumerate(TASKS):
            target = f"images/{i:04d}-{task}.png"
            edit(source, task).save(folder / target)
            phrasings = PHRASINGS[task]
            if i < images:
                train = phrasings[:-HELD_OUT]
                rows = [(train[(i + t) % len(train)], "train")]
            else:
                rows = [(p, "holdout") for p in phrasings[-HELD_OUT:]]
            for instruction, split in rows:
                row = {"instruction": instruction, "target": target, "references": [name], "task": task, "split": split}
                lines.append(json.dumps(row))
    manifest = folder / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest
