"""A tiny duck-typed stand-in for ComfyUI's FLUX text encoder object (``comfy.sd.CLIP``).

Why: ComfyUI's T5-XXL and CLIP-L cannot be made tiny (fixed 4.7B / 123M configs), yet the pack's
Text Encode and Route nodes must be exercised on a CLIP -- notably the second encode with
``tokenizer_options={"t5xxl_min_length": 512}`` that gives the router its exact training signal.
``TinyCLIP`` implements exactly the calls the pack makes on a CLIP, with ComfyUI's return shapes
(``comfy/sd.py: CLIP``, ``comfy/text_encoders/flux.py: FluxTokenizer / FluxClipModel``):

- ``tokenize`` -> ``{"l": [[(id, weight), ...]], "t5xxl": [[(id, weight), ...]]}`` (batches of
  token/weight pairs, ``(id, weight, word_id)`` triples with ``return_word_ids``). T5 is padded to
  ``max(t5xxl_min_length, real length)``, the minimum defaulting to 256 like ``T5XXLTokenizer``.
- ``encode_from_tokens`` -> T5 features ``[1, T, 64]`` (and CLIP pooled ``[1, 32]``), or the dict
  ``{"cond", "pooled_output"}`` with ``return_dict``.
- ``encode_from_tokens_scheduled`` -> ``[[cond, {"pooled_output": pooled, **add_dict}]]`` (the
  no-hooks branch of ComfyUI's method).

The encoders are ``instructmole.tiny.tiny_text_encoders`` and the token ids are those of its
``encode``: for a text within 512 tokens, ``encode_from_tokens(tokenize(text, tokenizer_options=
{"t5xxl_min_length": 512}), return_pooled=True)`` equals ``tiny_text_encoders(...).encode([text])``
bit for bit, so routing through this CLIP can be compared with the core's diffusers-side routing.

The file imports without ComfyUI (it needs only torch and the core) and is loaded both by the
in-process tests (``from .tiny_clip import TinyCLIP``) and, by file path, by the test node pack
inside a real server.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import torch

from instructmole.tiny import TinyTextEncoders, tiny_text_encoders

__all__ = ["CLIP_LENGTH", "T5_MIN_LENGTH", "TinyCLIP"]

T5_MIN_LENGTH = 256  # comfy/text_encoders/flux.py: T5XXLTokenizer(min_length=256)
CLIP_LENGTH = 16  # the tiny CLIP's position count (TinyTextEncoders.encode pads CLIP to 16)
TEXT_DIM = 64  # T5 width of instructmole.tiny.tiny_flux (joint_attention_dim)
POOLED_DIM = 32  # CLIP pooled width of tiny_flux (pooled_projection_dim)

Tokens = dict[str, list[list[tuple[Any, ...]]]]


@lru_cache(maxsize=4)
def _encoders(seed: int, text_length: int) -> TinyTextEncoders:
    """Built once per seed: the tokenizers are trained in-process, which takes a moment."""
    return tiny_text_encoders(text_dim=TEXT_DIM, pooled_dim=POOLED_DIM, text_length=text_length, seed=seed)


def _pairs(ids: list[int], real: int, return_word_ids: bool) -> list[tuple[Any, ...]]:
    """ComfyUI's token list: ``(id, 1.0)``, or ``(id, 1.0, word_id)`` with word id 0 for padding."""
    if return_word_ids:
        return [(t, 1.0, i + 1 if i < real else 0) for i, t in enumerate(ids)]
    return [(t, 1.0) for t in ids]


class TinyCLIP:
    """What the pack calls on a ComfyUI ``CLIP``, over tiny random T5 + CLIP encoders (fp32, CPU)."""

    def __init__(self, seed: int = 0, text_length: int = 512) -> None:
        self.seed = seed
        self.encoders = _encoders(seed, text_length)

    def tokenize(self, text: str, return_word_ids: bool = False, **kwargs: Any) -> Tokens:
        """``FluxTokenizer.tokenize_with_weights``: one batch per encoder; honours ``t5xxl_min_length``."""
        options: Mapping[str, Any] = kwargs.get("tokenizer_options", {})
        min_length = int(options.get("t5xxl_min_length", T5_MIN_LENGTH))
        t5_tok, clip_tok = self.encoders.t5_tokenizer, self.encoders.clip_tokenizer
        t5_ids = list(t5_tok(text).input_ids)
        t5_real = len(t5_ids)
        t5_ids += [t5_tok.pad_token_id] * max(0, min_length - t5_real)
        clip_ids = list(clip_tok(text).input_ids)[:CLIP_LENGTH]
        clip_real = len(clip_ids)
        clip_ids += [clip_tok.pad_token_id] * (CLIP_LENGTH - clip_real)
        return {
            "l": [_pairs(clip_ids, clip_real, return_word_ids)],
            "t5xxl": [_pairs(t5_ids, t5_real, return_word_ids)],
        }

    @torch.no_grad()
    def _encode(self, tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 batches concatenated along tokens and the first CLIP batch's pooled, as ComfyUI does."""
        t5 = torch.cat([self.encoders.t5(input_ids=_ids(batch)).last_hidden_state for batch in tokens["t5xxl"]], dim=1)
        pooled = self.encoders.clip(input_ids=_ids(tokens["l"][0])).pooler_output
        return t5.float(), pooled.float()

    def encode_from_tokens(self, tokens: Tokens, return_pooled: bool | str = False, return_dict: bool = False) -> Any:
        """``CLIP.encode_from_tokens``: ``cond``, ``(cond, pooled)`` or ``{"cond", "pooled_output"}``."""
        cond, pooled = self._encode(tokens)
        if return_dict:
            return {"cond": cond, "pooled_output": pooled}
        if return_pooled:  # True or "unprojected": the tiny CLIP has no projection to leave out
            return cond, pooled
        return cond

    def encode_from_tokens_scheduled(
        self,
        tokens: Tokens,
        unprojected: bool = False,
        add_dict: Mapping[str, Any] | None = None,
        show_pbar: bool = True,
    ) -> list[list[Any]]:
        """``CLIP.encode_from_tokens_scheduled`` without hooks: ``[[cond, {"pooled_output", **add_dict}]]``."""
        out = self.encode_from_tokens(tokens, return_pooled="unprojected" if unprojected else True, return_dict=True)
        cond = out.pop("cond")
        out.update(add_dict or {})
        return [[cond, out]]


def _ids(batch: list[tuple[Any, ...]]) -> torch.Tensor:
    """Token ids of one batch as ``[1, T]`` long (weights are all 1.0 here and are not applied)."""
    return torch.tensor([[int(t[0]) for t in batch]], dtype=torch.long)
