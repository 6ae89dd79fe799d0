"""A tiny duck-typed stand-in for ComfyUI's chat-LLM text encoders (Qwen-Image's, FLUX.2 [klein]'s).

Why: ComfyUI's Qwen2.5-VL 7B and Qwen3 4B cannot be made tiny (fixed configs), yet the pack's Text
Encode must be exercised on a CLIP of each kind. ``TinyChatCLIP`` implements the calls the pack
makes on a CLIP with ComfyUI's behaviour (``comfy/text_encoders/qwen_image.py``,
``comfy/text_encoders/flux.py``: ``QwenImageTokenizer``/``QwenImageTEModel``, ``KleinTokenizer``/
``Flux2TEModel``), on ``instructmole.tiny_llm``'s encoder:

- ``tokenize(text, llama_template=None, ...)`` -> ``{key: [[(id, 1.0), ...]]}``: the family's template
  applied (Qwen: none for a text that starts with ``<|im_start|>``; an explicit ``llama_template``
  replaces the default), FLUX.2 [klein] padded at the end to 512 tokens with its pad id;
- ``encode_from_tokens`` -> features ``[1, T, d]``: Qwen's without the template's system part (its
  output starts after the second ``<|im_start|>`` and the ``user`` token; the word-level tokenizer
  has no line-break token), FLUX.2's stacked layers for every token, padding included;
- ``encode_from_tokens_scheduled`` -> ``[[cond, {"pooled_output": None, ...}]]``.

Imports without ComfyUI; loaded by the in-process tests and, by file path, by the test node pack.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

from instructmole.families import KLEIN_TEMPLATE
from instructmole.tiny_llm import TinyChatEncoder, tiny_chat_encoder

__all__ = ["KEYS", "WIDTHS", "TinyChatCLIP"]

KEYS = {"qwen-image-edit-2511": "qwen25_7b", "flux.2-klein-4b": "qwen3_4b"}
WIDTHS = {"qwen-image-edit-2511": 48, "flux.2-klein-4b": 96}  # tiny_families' text widths
QWEN_T2I_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
KLEIN_MIN_LENGTH = 512


@lru_cache(maxsize=8)
def _encoder(family: str, seed: int, corpus: tuple[str, ...] = ()) -> TinyChatEncoder:
    """Built once per (family, seed, corpus): the tokenizer is trained in-process. ``corpus``: the words
    it must know (a tiny pipeline folder's encoder is ``tiny_chat_encoder`` of the same corpus)."""
    return tiny_chat_encoder(family, WIDTHS[family], seed=seed, corpus=corpus)


class _Inner:
    """The attributes the pack reads off ComfyUI's inner tokenizer (``SDTokenizer``)."""

    def __init__(self, pad: int) -> None:
        self.pad_token, self.start_token, self.end_token = pad, None, None


class _Outer:
    def __init__(self, key: str, pad: int) -> None:
        self.clip = key
        setattr(self, key, _Inner(pad))


class TinyChatCLIP:
    def __init__(self, family: str, seed: int = 0, corpus: tuple[str, ...] = ()) -> None:
        self.family, self.key = family, KEYS[family]
        self.encoder = _encoder(family, seed, tuple(corpus))
        self.tokenizer = _Outer(self.key, self.encoder.pad_id)

    def tokenize(self, text: str, return_word_ids: bool = False, llama_template: str | None = None, **_: Any) -> dict:
        if self.key == "qwen25_7b":
            written = text if text.startswith("<|im_start|>") else (llama_template or QWEN_T2I_TEMPLATE).format(text)
        else:
            written = (llama_template or KLEIN_TEMPLATE).format(text)
        ids = self.encoder.tokenize(written)
        if self.key != "qwen25_7b":
            ids = ids + [self.encoder.pad_id] * max(0, KLEIN_MIN_LENGTH - len(ids))
        return {self.key: [[(i, 1.0) for i in ids]]}

    def _strip(self, ids: list[int]) -> int:
        """Where Qwen's encoder starts its output: after the second ``<|im_start|>`` (and ``user``)."""
        vocab = self.encoder.tokenizer
        start, user = vocab.convert_tokens_to_ids("<|im_start|>"), vocab.convert_tokens_to_ids("user")
        seen = [i for i, t in enumerate(ids) if t == start][:2]
        if not seen:
            return 0
        end = seen[-1]
        return end + 2 if end + 1 < len(ids) and ids[end + 1] == user else end

    @torch.no_grad()
    def encode_from_tokens(self, tokens: dict, return_pooled: bool | str = False, return_dict: bool = False) -> Any:
        ids = [int(t[0]) for t in tokens[self.key][0]]
        real = torch.tensor([[i != self.encoder.pad_id for i in ids]], dtype=torch.long)
        features = self.encoder.features(torch.tensor([ids]), real)
        extra: dict[str, Any] = {}
        if self.key == "qwen25_7b":
            drop = self._strip(ids)
            features, real = features[:, drop:], real[:, drop:]
            if not bool(real.all()):
                extra["attention_mask"] = real
        if return_dict:
            return {"cond": features, "pooled_output": None, **extra}
        return (features, None) if return_pooled else features

    def encode_from_tokens_scheduled(self, tokens: dict, unprojected: bool = False, add_dict: dict | None = None):
        out = self.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
        cond = out.pop("cond")
        return [[cond, {**out, **(add_dict or {})}]]
