"""Aspect-ratio buckets and the deterministic batch order.

Kontext was trained at a fixed set of ~1 MP resolutions; training at the one nearest each image's
aspect ratio (the same pick ComfyUI's FluxKontextImageScale makes at inference) avoids both padding
and heavy crops. Rows in one batch must share a shape, so batches are formed inside a bucket.

The batch order is a pure function of (keys, batch size, seed, epoch): every process computes the
same global batches without talking to the others, and a resumed run jumps to the exact step.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from training.data import IMAGE_ERRORS
from training.errors import DataError

__all__ = ["KONTEXT_RESOLUTIONS", "BucketBatches", "buckets_for", "load_image", "load_mask", "nearest_bucket"]

KONTEXT_RESOLUTIONS: list[tuple[int, int]] = [
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
]


def buckets_for(pixels: int, multiple: int = 16) -> list[tuple[int, int]]:
    """Kontext's resolutions scaled to a pixel budget: smaller budgets keep the same aspect ratios,
    so a cheap low-resolution run still matches the shapes the model will see at inference.

    One scale for the whole list, sqrt(pixels / 1024²): the list's own areas vary by a few percent
    around 1 MP (688x1504 is 0.99 MP, 800x1328 is 1.01 MP), and scaling each pair to exactly
    ``pixels`` would turn 688x1504 into 688x1520 at 1 MP instead of giving the list back."""
    if pixels <= 0 or multiple <= 0:
        raise DataError(f"bucket pixels and multiple must be positive, got pixels={pixels}, multiple={multiple}")
    scale = math.sqrt(pixels / (1024 * 1024))
    buckets: list[tuple[int, int]] = []
    for w, h in KONTEXT_RESOLUTIONS:
        size = (_round_to(w * scale, multiple), _round_to(h * scale, multiple))
        if size not in buckets:
            buckets.append(size)
    return buckets


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (ties: the first), as FluxKontextImageScale picks."""
    if not buckets:
        raise DataError("no buckets to choose from; check data.resolution")
    aspect = width / height
    return min(buckets, key=lambda b: abs(b[0] / b[1] - aspect))


def load_image(path: str | Path, size: tuple[int, int]) -> torch.Tensor:
    """RGB [3, H, W] in [-1, 1] at exactly ``size`` = (w, h): cover the bucket, then crop the centre,
    so no padding enters the latents and the subject (usually central) survives."""
    im = _cover_crop(_open(path, _to_rgb), size, Image.Resampling.LANCZOS)
    array = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def load_mask(path: str | Path, size: tuple[int, int], patch: int = 16) -> torch.Tensor:
    """A mask as the target's tokens see it: [(h/patch)·(w/patch)] in [0, 1], the white share of each
    token's ``patch``×``patch`` pixels (16: the VAE's 8× times ``pack``'s 2×2), in ``pack``'s
    row-major token order. Cropped exactly as ``load_image`` crops its target; area resampling, so an
    all-white mask is exactly 1 everywhere."""
    width, height = size
    if width % patch or height % patch:
        raise DataError(f"bucket {width}x{height} is not a multiple of {patch} pixels; check data.resolution")
    im = _cover_crop(_open(path, lambda m: m.convert("L")), size, Image.Resampling.BOX)
    array = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).double().div_(255.0)
    grid = array.reshape(height // patch, patch, width // patch, patch).mean(dim=(1, 3))
    return grid.reshape(-1).float()


def _open(path: str | Path, convert: Callable[[Image.Image], Image.Image]) -> Image.Image:
    try:
        with Image.open(path) as opened:
            return convert(ImageOps.exif_transpose(opened))
    except FileNotFoundError:
        raise DataError(f"image {path} is missing; fix the path") from None
    except IMAGE_ERRORS as exc:
        raise DataError(f"image {path} is not a readable image ({exc}); replace the file") from None


def _cover_crop(im: Image.Image, size: tuple[int, int], resample: Image.Resampling) -> Image.Image:
    """Scale ``im`` to cover ``size`` = (w, h), then crop the centre."""
    width, height = size
    scale = max(width / im.width, height / im.height)
    cover = (max(width, math.ceil(im.width * scale - 1e-6)), max(height, math.ceil(im.height * scale - 1e-6)))
    if cover != im.size:
        im = im.resize(cover, resample, reducing_gap=3.0 if resample == Image.Resampling.LANCZOS else None)
    left, top = (cover[0] - width) // 2, (cover[1] - height) // 2
    return im.crop((left, top, left + width, top + height))


def _to_rgb(im: Image.Image) -> Image.Image:
    """Transparent pixels become white, not the black (or garbage) colour PIL's plain convert leaves."""
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


class BucketBatches:
    """The global batches of every epoch: rows of one batch share a key (bucket, reference count…).

    Every row is in a batch every epoch. A group's rows are cut into batches of ``batch_size``; its
    last batch may be partial, and is kept (as musubi-tuner and kohya's scripts keep theirs; a
    dropped tail would leave a group smaller than one batch out of every epoch). ``multiple``:
    every batch's size is a multiple of it (micro-batches per step × processes, so that each
    micro-batch of each process gets an equal share); a partial batch that is not is topped up
    with repeats of its own group's rows, the first of this epoch's order. ``summary`` says all of
    it in lines for the log.
    """

    def __init__(self, keys: Sequence[Hashable], batch_size: int, seed: int, multiple: int = 1) -> None:
        if batch_size < 1:
            raise DataError(f"train.batch_size must be at least 1, got {batch_size}")
        if multiple < 1 or batch_size % multiple:
            raise DataError(
                f"train.batch_size={batch_size} does not split into {multiple} equal parts (micro-batches × "
                f"processes); make it a multiple of {multiple}"
            )
        self.batch_size = batch_size
        self.multiple = multiple
        self.seed = seed
        self.groups: dict[Hashable, list[int]] = {}
        for index, key in enumerate(keys):
            self.groups.setdefault(key, []).append(index)
        if not self.groups:
            raise DataError("the data set has no training rows; add rows with split=train")
        self._len = sum(math.ceil(len(rows) / batch_size) for rows in self.groups.values())

    def summary(self, label: Callable[[Hashable], str] = str) -> list[str]:
        """One line per group (largest first: rows, full and partial batches, repeats), then the total."""
        rows = sum(len(g) for g in self.groups.values())
        lines = [f"{rows} training rows in {len(self.groups)} bucket(s), batches of {self.batch_size} rows:"]
        for key, group in sorted(self.groups.items(), key=lambda kv: -len(kv[1])):
            full, tail = divmod(len(group), self.batch_size)
            parts = [f"{full} full batch{'es' if full != 1 else ''}"] if full else []
            if tail:
                pad = -tail % self.multiple
                extra = f", topped up with {pad} repeated row{'s' if pad != 1 else ''}" if pad else ""
                parts.append(f"1 partial batch of {tail} row{'s' if tail != 1 else ''}{extra}")
            lines.append(f"  {label(key)}: {len(group)} rows -> {' + '.join(parts)}")
        lines.append(f"{len(self)} batches per epoch; every training row is in one of them every epoch")
        return lines

    def __len__(self) -> int:
        """Batches per epoch; the same every epoch, since only the order changes."""
        return self._len

    def epoch(self, e: int) -> list[list[int]]:
        """The global batches of epoch ``e``; recomputed, never stored, so resuming needs only (seed, step)."""
        generator = torch.Generator().manual_seed(_mix(self.seed, e))
        batches: list[list[int]] = []
        for rows in self.groups.values():
            order = [rows[i] for i in torch.randperm(len(rows), generator=generator).tolist()]
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                batch += [order[i % len(order)] for i in range(-len(batch) % self.multiple)]
                batches.append(batch)
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch index within it) of global step ``step``: where a resumed run picks up."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return divmod(step, self._len)


def _mix(seed: int, epoch: int) -> int:
    """A seed per (seed, epoch) that does not collide for nearby pairs (seed+epoch would) and does not
    depend on Python's per-process hash randomisation."""
    digest = hashlib.sha256(f"{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
