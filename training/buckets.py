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
from collections.abc import Hashable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from training.data import IMAGE_ERRORS
from training.errors import DataError

__all__ = ["KONTEXT_RESOLUTIONS", "BucketBatches", "buckets_for", "load_image", "nearest_bucket"]

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
    width, height = size
    try:
        with Image.open(path) as opened:
            im = _to_rgb(ImageOps.exif_transpose(opened))
    except FileNotFoundError:
        raise DataError(f"image {path} is missing; fix the path") from None
    except IMAGE_ERRORS as exc:
        raise DataError(f"image {path} is not a readable image ({exc}); replace the file") from None
    scale = max(width / im.width, height / im.height)
    cover = (max(width, math.ceil(im.width * scale - 1e-6)), max(height, math.ceil(im.height * scale - 1e-6)))
    if cover != im.size:
        im = im.resize(cover, Image.Resampling.LANCZOS, reducing_gap=3.0)
    left, top = (cover[0] - width) // 2, (cover[1] - height) // 2
    im = im.crop((left, top, left + width, top + height))
    array = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Transparent pixels become white, not the black (or garbage) colour PIL's plain convert leaves."""
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


class BucketBatches:
    """The global batches of every epoch: rows of one batch share a key (bucket, reference count…)."""

    def __init__(
        self, keys: Sequence[Hashable], batch_size: int, seed: int, drop_last: bool = True, multiple: int = 1
    ) -> None:
        """``multiple``: every batch's size is a multiple of it (micro-batches per step × processes,
        so that each micro-batch of each process gets an equal share)."""
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
        self.drop_last = drop_last
        self.groups: dict[Hashable, list[int]] = {}
        for index, key in enumerate(keys):
            self.groups.setdefault(key, []).append(index)
        self._len = sum(self._batches_in(len(rows)) for rows in self.groups.values())
        if self._len == 0:
            self._raise_too_few_rows()
        # Inspectable, not printed: the caller decides how to report rows that never train.
        self.dropped_rows = sum(len(rows) % batch_size for rows in self.groups.values()) if drop_last else 0
        self.empty_keys = [key for key, rows in self.groups.items() if self._batches_in(len(rows)) == 0]

    def _batches_in(self, rows: int) -> int:
        return rows // self.batch_size if self.drop_last else math.ceil(rows / self.batch_size)

    def _raise_too_few_rows(self) -> None:
        if not self.groups:
            raise DataError("the data set has no training rows; add rows with split=train")
        largest = max(len(rows) for rows in self.groups.values())
        raise DataError(
            f"no bucket has enough rows for one batch of train.batch_size={self.batch_size} "
            f"(the largest has {largest}); set train.batch_size to {largest} or less"
        )

    def __len__(self) -> int:
        """Batches per epoch; the same every epoch, since only the order changes."""
        return self._len

    def epoch(self, e: int) -> list[list[int]]:
        """The global batches of epoch ``e``; recomputed, never stored, so resuming needs only (seed, step)."""
        generator = torch.Generator().manual_seed(_mix(self.seed, e))
        batches: list[list[int]] = []
        for rows in self.groups.values():
            order = [rows[i] for i in torch.randperm(len(rows), generator=generator).tolist()]
            for start in range(0, self._batches_in(len(rows)) * self.batch_size, self.batch_size):
                batches.append(order[start : start + self.batch_size])
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
