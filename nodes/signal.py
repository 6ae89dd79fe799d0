"""The exact routing signal of an instruction, and how it rides along a CONDITIONING.

A FLUX.1 adapter's router was trained on T5 features of the instruction padded to its ``text_length``
(512 in the reference recipe, the default here; no attention mask) plus the CLIP-L pooled vector.
Families without a pooled vector (Qwen-Image, FLUX.2: ``router_pool == "text"``) route from their
text features and a mask of the instruction's own tokens instead: their signal is the text features
(under the same key as T5's) and that mask (``MASK_KEY``), and no pooled vector.
ComfyUI pads T5 to 256 only, and without a mask the padding changes every token's features, so the
exact signal needs a second encode with the training length: Text Encode takes it from the
connected adapter. It travels in the conditioning's ``model_conds`` so that sampling hands it, row
by row, to the model wrapper. The fp32 tensors travel bit-cast to int32: ComfyUI casts floating
conds to the model dtype (bf16) on the way, but leaves integer tensors alone.

Core conditioning nodes copy ``model_conds`` unchanged while they edit the conditioning itself
(ConditioningZeroOut zeroes it, Average mixes two, Concat appends tokens). So the signal also
carries a fingerprint of the conditioning it was made for: the mean of its text tokens (unchanged
by the token repetition ComfyUI batches with) and its pooled vector (the text families have none).
A row whose conditioning no longer matches is routed from what the model sees instead, its own
features: an edited conditioning is never routed as the instruction it came from.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..instructmole import InstructMoLEError

T5_KEY = "instructmole_t5"  # the text features: T5 for FLUX.1, the family's own text features otherwise
TEXT_KEY = T5_KEY
POOLED_KEY = "instructmole_pooled"  # FLUX.1 only: the CLIP-L pooled vector
MASK_KEY = "instructmole_mask"  # text families only: the instruction's tokens, [rows, tokens], 1 = read
CHECK_KEY = "instructmole_of"  # the fingerprint of the conditioning the signal belongs to
TRAINING_TEXT_LENGTH = 512


def routing_tokens(clip: Any, text: str, length: int = TRAINING_TEXT_LENGTH) -> dict:
    """The text's tokens as the trainer made them: literal (ComfyUI's ``(word:1.2)`` weighting syntax
    is off: the trainer never parsed it, so ``(OPEN)`` keeps its brackets), T5 padded to ``length``
    and truncated to it (the end-of-text token stays last, as the trainer's tokenizer keeps it)."""
    tokens = clip.tokenize(text, tokenizer_options={"t5xxl_min_length": length}, disable_weights=True)
    t5 = tokens.get("t5xxl") if isinstance(tokens, dict) else None
    if t5:
        tokens = {
            **tokens,
            "t5xxl": [batch if len(batch) <= length else batch[: length - 1] + batch[-1:] for batch in t5],
        }
    return tokens


def encode_for_routing(clip: Any, text: str, length: int = TRAINING_TEXT_LENGTH) -> tuple[Tensor, Tensor]:
    """``(t5 [1, length, d], pooled [1, p])`` in fp32, encoded the way the router was trained."""
    t5, pooled = clip.encode_from_tokens(routing_tokens(clip, text, length), return_pooled=True)
    if pooled is None:
        raise InstructMoLEError(
            "this text encoder gives no pooled output; load the FLUX text encoders (T5-XXL + CLIP-L)"
        )
    return t5.float().cpu(), pooled.float().cpu()


def attach_signal(conditioning: list, t5: Tensor, pooled: Tensor | None, mask: Tensor | None = None) -> list:
    """A copy of ``conditioning`` whose every entry carries the exact routing signal, and the
    fingerprint of that entry (see the module's docstring).

    ``t5``: the text features ``[1, tokens, d]``; ``pooled``: FLUX.1's CLIP pooled vector, or None for a
    family that routes from the text alone, whose ``mask [1, tokens]`` (the instruction's tokens;
    None: all) rides along instead."""
    import comfy.conds

    out = []
    for cond, extras in conditioning:
        model_conds = dict(extras.get("model_conds", {}))  # merge: never drop other packs' conds
        model_conds[T5_KEY] = comfy.conds.CONDRegular(t5.contiguous().view(torch.int32))
        if pooled is not None:
            model_conds[POOLED_KEY] = comfy.conds.CONDRegular(pooled.contiguous().view(torch.int32))
            if extras.get("pooled_output") is not None:
                check = fingerprint(cond, extras["pooled_output"])
                model_conds[CHECK_KEY] = comfy.conds.CONDRegular(check.contiguous().view(torch.int32))
        else:
            if mask is None:
                mask = torch.ones(t5.shape[:2], dtype=torch.bool)
            model_conds[MASK_KEY] = comfy.conds.CONDRegular(pack_mask(mask))
            check = fingerprint(cond, None)
            model_conds[CHECK_KEY] = comfy.conds.CONDRegular(check.contiguous().view(torch.int32))
        out.append([cond, {**extras, "model_conds": model_conds}])
    return out


def fingerprint(context: Tensor, pooled: Tensor | None) -> Tensor:
    """``[rows, text_dim (+ pooled_dim)]`` fp32: each row's mean text token and its pooled vector.

    Without a pooled vector (the text families) the mean skips all-zero tokens: ComfyUI hands such a
    model its conditioning padded with them (FLUX.2's ``extra_conds`` pads the text to 512 tokens in
    front), and the padding must not make the conditioning look edited."""
    if pooled is None:
        context = context.float()
        kept = (context != 0).any(dim=-1, keepdim=True)
        return (context * kept).sum(dim=1) / kept.sum(dim=1).clamp(min=1)
    return torch.cat([context.float().mean(dim=1), pooled.float().reshape(context.shape[0], -1)], dim=-1)


def rows_still_matching(check: Tensor, context: Tensor, pooled: Tensor | None) -> Tensor:
    """Per row (bool ``[rows]``): does the conditioning that reached the model still match the one
    the signal was made for? Tolerant of the model dtype ComfyUI cast it to (bf16: 2^-9 relative).
    ``pooled``: None for the text families (their fingerprint is the mean text token alone)."""
    want = unpack(check).to(context.device)
    got = fingerprint(context, None if pooled is None else pooled.to(context.device))
    if got.shape != want.shape:
        return torch.zeros(context.shape[0], dtype=torch.bool, device=context.device)
    matching = torch.ones(context.shape[0], dtype=torch.bool, device=context.device)
    parts = [slice(0, context.shape[-1])] + ([slice(context.shape[-1], None)] if pooled is not None else [])
    for part in parts:  # text mean, pooled: own scales
        scale = want[:, part].abs().amax(dim=-1, keepdim=True)
        matching &= ((got[:, part] - want[:, part]).abs() <= 0.02 * scale + 1e-6).all(dim=-1)
    return matching


def carried_signal(extras: dict) -> tuple[Tensor, Tensor | None] | None:
    """The exact signal of one conditioning entry (its options dict), if it carries one: ``(text,
    pooled)``, pooled None for a text family's signal (its mask: ``carried_mask``)."""
    model_conds = extras.get("model_conds", {})
    if T5_KEY not in model_conds:
        return None
    if POOLED_KEY in model_conds:
        return unpack(model_conds[T5_KEY].cond), unpack(model_conds[POOLED_KEY].cond)
    if MASK_KEY in model_conds:
        return unpack(model_conds[T5_KEY].cond), None
    return None


def carried_mask(extras: dict) -> Tensor | None:
    """The instruction-token mask (bool ``[1, tokens]``) a text family's signal carries, if any."""
    model_conds = extras.get("model_conds", {})
    return unpack_mask(model_conds[MASK_KEY].cond) if MASK_KEY in model_conds else None


def unpack(value: Tensor) -> Tensor:
    """Undo the int32 bit-cast of a carried signal tensor."""
    return value.view(torch.float32) if value.dtype == torch.int32 else value.float()


def pack_mask(mask: Tensor) -> Tensor:
    """A token mask as it rides in ``model_conds``: int32 0/1 (integers are never cast to the model dtype)."""
    return mask.bool().to(torch.int32).contiguous()


def unpack_mask(value: Tensor) -> Tensor:
    """A carried token mask back to bool."""
    return value != 0
