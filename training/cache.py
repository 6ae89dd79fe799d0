"""Latents and text features, computed once and kept on disk for every later step, process and run.

An entry's key is a hash of everything that determines it: the image's *content* (not its path)
with the VAE's identity and the bucket size, or the instruction text with the text encoders'
identities and the T5 padding length; for both, the dtype the encoders ran in (``model.dtype``:
bf16 features are not fp32 features) and ``FORMAT``, the version of the encoding code here (bump
it when what an entry holds or how it is computed changes). A renamed image still hits, an edited
one misses, and another VAE or dtype never reads a stale entry. Each entry is one small
``.safetensors`` file written to a temp name and renamed, so a run killed mid-way leaves only whole
entries behind.

Under accelerate every process reads the same cache; the main process decides which entries are
missing and every process takes its share of that one list (each entry is encoded exactly once),
and everybody waits until all are on disk.

A row's mask (``Row.mask``) is kept at its target's token grid (``load_mask``): one value in [0, 1]
per token, keyed by the mask's content and the bucket size; no encoder is involved.

Latents are kept as the VAE posterior (mean and std), not as one sample: the trainer draws a fresh
sample per step from the sample's own seed, as the recipe's ``latent_dist.sample()`` does.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from instructmole.files import atomic_path

from .buckets import load_image, load_mask
from .data import content_hash

__all__ = ["FeatureCache", "ImageJob", "encode_latents", "encode_masks", "encode_texts"]


@dataclass(frozen=True)
class ImageJob:
    """One image at one bucket size."""

    path: Path
    digest: str  # content hash
    size: tuple[int, int]  # (width, height)


FORMAT = "2"  # 2: keys hold the encoders' dtype


class FeatureCache:
    """The on-disk cache of one encoder set: key derivation, reads (with a small memory LRU), writes.

    ``identity``: the encoders' fingerprints ("t5", "clip", "vae"; a chat-LLM family's "text" and its
    "family" instead of T5 and CLIP) and "dtype", the dtype they run in.
    """

    def __init__(self, root: Path, identity: dict[str, str], text_length: int, memory_bytes: int = 1 << 30) -> None:
        self.root = Path(root)
        self.identity = identity
        self.text_length = text_length
        self._memory: OrderedDict[str, dict[str, Tensor]] = OrderedDict()
        self._memory_bytes, self._memory_limit = 0, memory_bytes

    # ---- keys ---------------------------------------------------------------------------------

    def text_key(self, instruction: str) -> str:
        ids = f"{self.identity.get('t5', '')}|{self.identity.get('clip', '')}|{self.text_length}"
        if "text" in self.identity:  # a chat-LLM family (``families.py``): its encoder and its template
            ids += f"|{self.identity['text']}|{self.identity.get('family', '')}"
        return _digest("text", FORMAT, self.identity.get("dtype", ""), ids, instruction)

    def latent_key(self, digest: str, size: tuple[int, int]) -> str:
        ids = self.identity.get("vae", "")
        return _digest("latent", FORMAT, self.identity.get("dtype", ""), ids, digest, f"{size[0]}x{size[1]}")

    def mask_key(self, digest: str, size: tuple[int, int]) -> str:
        """No encoder identity or dtype: a mask's token grid depends on its pixels and the bucket only."""
        return _digest("mask", FORMAT, digest, f"{size[0]}x{size[1]}")

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    # ---- read / write -------------------------------------------------------------------------

    def read(self, key: str) -> dict[str, Tensor]:
        """The tensors of one entry (kept in a bounded LRU: small data sets never touch the disk twice)."""
        hit = self._memory.get(key)
        if hit is not None:
            self._memory.move_to_end(key)
            return hit
        tensors = load_file(self.path(key))
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if size <= self._memory_limit // 8:
            self._memory[key] = tensors
            self._memory_bytes += size
            while self._memory_bytes > self._memory_limit:
                _, old = self._memory.popitem(last=False)
                self._memory_bytes -= sum(t.numel() * t.element_size() for t in old.values())
        return tensors

    def write(self, key: str, tensors: dict[str, Tensor]) -> None:
        with atomic_path(self.path(key)) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))

    # ---- content hashes, remembered by (path, size, mtime) --------------------------------------

    def content_hashes(self, paths: Iterable[Path], workers: int = 8) -> dict[Path, str]:
        """sha256 of every file, re-read only for files whose size or mtime changed since last time."""
        from concurrent.futures import ThreadPoolExecutor

        index_path = self.root / "content-hashes.json"
        try:
            known = json.loads(index_path.read_text())
        except (OSError, ValueError):
            known = {}
        paths = sorted(set(paths))
        stamps = {p: _stamp(p) for p in paths}
        todo = [p for p in paths if known.get(str(p), {}).get("stamp") != stamps[p]]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for p, digest in zip(todo, pool.map(content_hash, todo), strict=True):
                known[str(p)] = {"stamp": stamps[p], "sha256": digest}
        if todo:
            with atomic_path(index_path) as tmp:
                tmp.write_text(json.dumps(known))
        return {p: known[str(p)]["sha256"] for p in paths}


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


# ---- encoding -------------------------------------------------------------------------------------


@torch.no_grad()
def encode_texts(
    instructions: Sequence[str],
    *,
    t5,
    t5_tokenizer,
    clip,
    clip_tokenizer,
    text_length: int,
    batch_size: int,
    write: Callable[[str, dict[str, Tensor]], None],
    progress: Callable[[int], None] = lambda n: None,
) -> None:
    """T5 features padded to ``text_length`` (no attention mask, as trained) and CLIP-L pooled.

    This is what FLUX.1 Kontext's pipeline computes (``max_sequence_length=text_length``) and what
    the InstructMoLE Text Encode node gives the router in ComfyUI.
    """
    clip_length = min(clip_tokenizer.model_max_length, clip.config.max_position_embeddings)
    device = next(t5.parameters()).device
    for start in range(0, len(instructions), batch_size):
        chunk = list(instructions[start : start + batch_size])
        t5_ids = t5_tokenizer(
            chunk, padding="max_length", max_length=text_length, truncation=True, return_tensors="pt"
        ).input_ids
        clip_ids = clip_tokenizer(
            chunk, padding="max_length", max_length=clip_length, truncation=True, return_tensors="pt"
        ).input_ids
        features = t5(input_ids=t5_ids.to(device)).last_hidden_state
        pooled = clip(input_ids=clip_ids.to(clip.device)).pooler_output
        for i, text in enumerate(chunk):
            write(text, {"t5": features[i], "pooled": pooled[i].float()})
        progress(len(chunk))


@torch.no_grad()
def encode_latents(
    jobs: Sequence[ImageJob],
    *,
    vae,
    batch_size: int,
    write: Callable[[ImageJob, dict[str, Tensor]], None],
    progress: Callable[[int], None] = lambda n: None,
    posterior: Callable[[object, Tensor], tuple[Tensor, Tensor]] | None = None,
) -> None:
    """The VAE posterior (mean, std) of every image at its bucket size, batched by size.

    ``posterior(vae, pixels) -> (mean, std)``: how the family's VAE is asked (``Recipe.posterior``;
    default: ``vae.encode(pixels).latent_dist``)."""
    device, dtype = vae.device, vae.dtype
    by_size: dict[tuple[int, int], list[ImageJob]] = {}
    for job in jobs:
        by_size.setdefault(job.size, []).append(job)
    for size, group in by_size.items():
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            pixels = torch.stack([load_image(job.path, size) for job in chunk]).to(device, dtype)
            if posterior is None:
                dist = vae.encode(pixels).latent_dist
                mean, std = dist.mean, dist.std
            else:
                mean, std = posterior(vae, pixels)
            for i, job in enumerate(chunk):
                write(job, {"mean": mean[i].float(), "std": std[i].float()})
            progress(len(chunk))


def encode_masks(
    jobs: Sequence[ImageJob],
    *,
    write: Callable[[ImageJob, dict[str, Tensor]], None],
    progress: Callable[[int], None] = lambda n: None,
) -> None:
    """Every mask at its row's bucket size, as the target's token grid (``load_mask``)."""
    for job in jobs:
        write(job, {"mask": load_mask(job.path, job.size)})
        progress(1)
