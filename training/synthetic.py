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

__all__ = ["PHRASINGS", "TASKS", "all_phrasings", "procedural_image", "write_dataset"]


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

# Ten phrasings per task; the last HELD_OUT of each are never trained on. Phrasings of one task
# share its key words in new sentences: the tiny random text encoders know words, not meanings,
# so shared words stand in for the synonymy a real T5 brings ("darker", "dim", "darken").
PHRASINGS: dict[str, list[str]] = {
    "invert": [
        "invert the colors", "make a color negative", "turn it into a negative", "invert every color",
        "show the inverted picture", "make it a photo negative",
        "invert the image", "give it a negative look", "negative colors please", "an inverted version",
    ],
    "grayscale": [
        "make it black and white", "convert it to grayscale", "turn it monochrome", "make the photo gray",
        "a grayscale version please", "render it in black and white",
        "grayscale the image", "make this monochrome", "black and white please", "turn the picture gray",
    ],
    "brighten": [
        "make it brighter", "brighten the image", "make the picture lighter", "brighten everything up",
        "a lighter version please", "make the photo brighter",
        "brighter please", "brighten this", "make the scene lighter", "can you make this brighter",
    ],
    "darken": [
        "make it darker", "darken the image", "dim the picture", "make the photo darker",
        "please darken it", "a dim version of this",
        "darker please", "darken everything", "make the scene dim", "can you make this darker",
    ],
    "warm": [
        "make it warmer", "add a warm orange tone", "warm up the image", "make the colors warm",
        "give it an orange glow", "make the photo warmer",
        "warmer please", "warm the picture", "an orange warm look", "can you make this warmer",
    ],
    "cool": [
        "make it cooler", "add a cool blue tone", "cool down the image", "make the colors cool",
        "give it a blue cast", "make the photo cooler",
        "cooler please", "cool the picture", "a blue cool look", "can you make this cooler",
    ],
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
