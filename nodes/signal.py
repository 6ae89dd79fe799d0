"""The exact routing signal of an instruction, and how it rides along a CONDITIONING.

The adapter's router was trained on T5 features of the instruction padded to 512 tokens (no
attention mask) plus the CLIP-L pooled vector. ComfyUI pads T5 to 256 only, and without a mask
the padding changes every token's features, so the exact signal needs a second encode with the
training length. It travels in the conditioning's ``model_conds`` so that sampling hands it, row by
row, to the model wrapper. The fp32 tensors travel bit-cast to int32: ComfyUI casts floating
conds to the model dtype (bf16) on the way, but leaves integer tensors alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..instructmole import InstructMoLEError

T5_KEY = "instructmole_t5"
POOLED_KEY = "instructmole_pooled"
TRAINING_TEXT_LENGTH = 512


def encode_for_routing(clip: Any, text: str, length: int = TRAINING_TEXT_LENGTH) -> tuple[Tensor, Tensor]:
    """``(t5 [1, ≥length, d], pooled [1, p])`` in fp32, encoded the way the router was trained."""
    tokens = clip.tokenize(text, tokenizer_options={"t5xxl_min_length": length})
    t5, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    if pooled is None:
        raise InstructMoLEError(
            "this text encoder gives no pooled output; load the FLUX text encoders (T5-XXL + CLIP-L)"
        )
    return t5.float().cpu(), pooled.float().cpu()


def attach_signal(conditioning: list, t5: Tensor, pooled: Tensor) -> list:
    """A copy of ``conditioning`` whose every entry carries the exact routing signal."""
    import comfy.conds

    out = []
    for cond, extras in conditioning:
        model_conds = dict(extras.get("model_conds", {}))  # merge: never drop other packs' conds
        model_conds[T5_KEY] = comfy.conds.CONDRegular(t5.contiguous().view(torch.int32))
        model_conds[POOLED_KEY] = comfy.conds.CONDRegular(pooled.contiguous().view(torch.int32))
        out.append([cond, {**extras, "model_conds": model_conds}])
    return out


def carried_signal(extras: dict) -> tuple[Tensor, Tensor] | None:
    """The exact signal of one conditioning entry (its options dict), if it carries one."""
    model_conds = extras.get("model_conds", {})
    if T5_KEY not in model_conds or POOLED_KEY not in model_conds:
        return None
    return unpack(model_conds[T5_KEY].cond), unpack(model_conds[POOLED_KEY].cond)


def unpack(value: Tensor) -> Tensor:
    """Undo the int32 bit-cast of a carried signal tensor."""
    return value.view(torch.float32) if value.dtype == torch.int32 else value.float()
