"""The exact routing signal of an instruction for the families that encode text with a chat LLM.

Qwen-Image and FLUX.2 have no pooled vector: their router reads the instruction's own tokens inside
the family's chat template (``instructmole/instruction.py``). The trainer encodes
``template.format(instruction)`` with the template's prefix, the instruction and its suffix
tokenized apart, and masks everything but the instruction. Here ComfyUI's own text encoder (the
CLIP object a loader gives) encodes that same templated text, and the mask is found by locating
the instruction's tokens in what it tokenized:

* which family: the key ComfyUI's tokenizer files its tokens under (``qwen25_7b`` for Qwen-Image,
  ``qwen3_4b``/``qwen3_8b`` for FLUX.2 [klein] 4B/9B, ``mistral3_24b`` for FLUX.2 [dev]);
* the ids: ``clip.tokenize(templated, llama_template="{}")`` (the template written out, so ComfyUI
  adds none of its own; Qwen's tokenizer skips its template for a text that starts with one);
* the offset: ComfyUI's Qwen encoder drops the template's system part from its output; whatever an
  encoder drops from the front is ``len(ids) - tokens out``, so a token's output position is its
  id position minus that;
* exactness: the whole text must tokenize as prefix + instruction (+ suffix) do apart. When it
  does not (a tokenizer merged across the template's edge), the mask falls back to every real
  token, and the signal is marked approximate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..instructmole import InstructMoLEError
from ..instructmole.families import FAMILIES, Family
from ..instructmole.instruction import instruction_span, split_template

log = logging.getLogger("instructmole")

# ComfyUI's tokenizer key -> the family whose text encoder files its tokens under it.
TOKENIZER_FAMILIES = {
    "qwen25_7b": "qwen-image-edit-2511",
    "qwen3_4b": "flux.2-klein-4b",
    "qwen3_8b": "flux.2-klein-9b",
    "mistral3_24b": "flux.2-dev",
}
FLUX1_KEYS = frozenset({"l", "t5xxl"})


@dataclass(frozen=True)
class ChatSignal:
    """An instruction's routing signal: features ``[1, tokens, d]`` (fp32, CPU), mask ``[1, tokens]``."""

    text: Tensor
    mask: Tensor
    exact: bool


def tokenizer_key(clip: Any) -> str | None:
    """The key ComfyUI's tokenizer of this CLIP files its tokens under (None if it has several,
    as FLUX.1's CLIP-L + T5 does)."""
    tokens = clip.tokenize("")
    keys = list(tokens) if isinstance(tokens, dict) else []
    return keys[0] if len(keys) == 1 else None


def clip_family(clip: Any) -> str:
    """The architecture whose text encoder ``clip`` is: ``flux1``, ``qwen_image`` or ``flux2``."""
    tokens = clip.tokenize("")
    keys = set(tokens) if isinstance(tokens, dict) else set()
    if keys and keys <= FLUX1_KEYS:
        return "flux1"
    key = next(iter(keys)) if len(keys) == 1 else None
    if key in TOKENIZER_FAMILIES:
        return FAMILIES[TOKENIZER_FAMILIES[key]].architecture
    raise InstructMoLEError(
        f"this text encoder ({', '.join(sorted(keys)) or 'unknown'}) belongs to no model InstructMoLE knows; load "
        "the text encoder of FLUX.1 (T5-XXL + CLIP-L), FLUX.2 (Qwen3 / Mistral) or Qwen-Image (Qwen2.5-VL)"
    )


def _inner_tokenizer(clip: Any, key: str) -> Any:
    outer = getattr(clip, "tokenizer", None)
    return getattr(outer, getattr(outer, "clip", key), None)


def _ids(clip: Any, key: str, text: str) -> tuple[list[int], int]:
    """The ids ComfyUI feeds its encoder for ``text`` written out (no template of its own), and
    where the text's own ids start (after a start token or left padding)."""
    rows = clip.tokenize(text, llama_template="{}")[key]
    ids = [int(t[0]) for row in rows for t in row if not isinstance(t[0], dict)]
    inner = _inner_tokenizer(clip, key)
    pad = getattr(inner, "pad_token", None)
    start = getattr(inner, "start_token", None)
    first = 0
    while first < len(ids) and (ids[first] == pad or (first == 0 and start is not None and ids[0] == start)):
        first += 1
    return ids, first


def _own_ids(clip: Any, key: str, text: str) -> list[int]:
    """``text``'s ids alone: without a start token, end token or padding."""
    ids, first = _ids(clip, key, text)
    inner = _inner_tokenizer(clip, key)
    pad, end = getattr(inner, "pad_token", None), getattr(inner, "end_token", None)
    last = len(ids)
    while last > first and ids[last - 1] in (pad, end):
        last -= 1
    return ids[first:last]


def encode_chat_signal(clip: Any, text: str, family: Family) -> ChatSignal:
    """The routing signal of ``text`` for a text-routed ``family``, from ComfyUI's text encoder."""
    key = tokenizer_key(clip)
    if key not in TOKENIZER_FAMILIES or FAMILIES[TOKENIZER_FAMILIES[key]].architecture != family.architecture:
        raise InstructMoLEError(
            f"this text encoder is not {family.arch.title}'s; load the text encoder of {family.title}, "
            "the model the adapter was made for"
        )
    prefix, _suffix = split_template(family.routing_template)
    templated = family.routing_template.format(text)
    ids, first = _ids(clip, key, templated)
    tokens = clip.tokenize(templated, llama_template="{}")
    features = clip.encode_from_tokens(tokens)
    if isinstance(features, tuple):
        features = features[0]
    features = features.float().cpu()
    dropped = len(ids) - features.shape[1]
    mask = torch.zeros(1, features.shape[1], dtype=torch.bool)
    span = instruction_span(ids[first:], _own_ids(clip, key, text), _own_ids(clip, key, prefix))
    exact = span is not None and first + span[0] - dropped >= 0
    if exact:
        start = first + span[0] - dropped
        mask[0, start : start + span[1]] = True
    else:
        log.warning(
            "InstructMoLE: could not find the instruction's tokens in what %s's text encoder tokenized; routing "
            "from every token of the prompt: close to, not exactly, the council of training.",
            family.title,
        )
        pad = getattr(_inner_tokenizer(clip, key), "pad_token", None)
        real = torch.tensor([i != pad for i in ids[max(dropped, 0) :]], dtype=torch.bool)
        mask[0, : real.numel()] = real[: mask.shape[1]]
    return ChatSignal(features, mask, exact)
