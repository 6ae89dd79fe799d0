"""Tiny chat-LLM text encoders for the families that encode prompts with an LLM (Qwen-Image, FLUX.2).

Why: the text router of those families reads the instruction's tokens inside a chat template
(``instruction.py``), and the trainer, the diffusers host and the ComfyUI nodes must build the
same tokens, run the same encoder and mask the same positions. No LLM can be downloaded, so this is
a random causal LM of the real kind (transformers' Qwen3) with a word-level tokenizer trained
in-process that knows the template's special tokens, in two layouts:

* ``"last"``: the final hidden state of each token (Qwen-Image reads Qwen2.5-VL's last layer);
* ``"stacked"``: three hidden states concatenated per token (FLUX.2 [klein] reads Qwen3 layers
  9, 18 and 27; here layers 1, 2 and 3), so the text width is three times the LLM's.

transformers and tokenizers are imported lazily.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from .families import FAMILIES
from .instruction import templated_ids
from .tiny import word_tokenizer

__all__ = ["TinyChatEncoder", "tiny_chat_encoder"]

Layout = Literal["last", "stacked"]
_SPECIALS = [
    "<|endoftext|>",
    "<unk>",
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
    "[INST]",
    "[/INST]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
]
_INSTRUCTIONS = [
    "make the sky a stormy purple",
    "turn the cat into a watercolor painting",
    "remove the person on the left",
    "add a red hat to the dog",
    "convert the photo to a pencil sketch",
    "replace the background with a beach at sunset",
    "make it look like a pixel art game",
    "change the season to winter with snow",
]


@dataclass
class TinyChatEncoder:
    """A tokenizer and a causal LM that encode instructions inside a family's chat template."""

    model: Any
    tokenizer: Any
    template: str
    layout: Layout
    stacked_layers: tuple[int, ...] = (1, 2, 3)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def tokenize(self, text: str) -> list[int]:
        """Ids of ``text`` with no special token added and no padding."""
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def ids(self, instruction: str) -> tuple[list[int], list[bool]]:
        """The templated ids of one instruction and its instruction mask (``instruction.templated_ids``)."""
        return templated_ids(self.tokenize, self.template, instruction)

    @torch.no_grad()
    def features(self, ids: Tensor, attention: Tensor) -> Tensor:
        """``[b, t, width]`` features of right-padded ``ids`` (``attention``: 1 on real tokens)."""
        out = self.model(input_ids=ids, attention_mask=attention, output_hidden_states=True)
        if self.layout == "last":
            return out.hidden_states[-1]
        return torch.cat([out.hidden_states[k] for k in self.stacked_layers], dim=-1)

    @torch.no_grad()
    def encode(self, instructions: Sequence[str], length: int | None = None) -> tuple[Tensor, Tensor]:
        """``(features [b, t, width], mask [b, t])`` of each instruction in the template, right-padded
        to the longest (or ``length``); ``mask`` is true on the instruction's own tokens only."""
        rows = [self.ids(text) for text in instructions]
        t = max([len(ids) for ids, _ in rows] + [length or 0])
        ids = torch.full((len(rows), t), self.pad_id, dtype=torch.long)
        attention = torch.zeros(len(rows), t, dtype=torch.long)
        mask = torch.zeros(len(rows), t, dtype=torch.bool)
        for i, (row, keep) in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention[i, : len(row)] = 1
            mask[i, : len(row)] = torch.tensor(keep)
        return self.features(ids, attention), mask


def tiny_chat_encoder(
    family: str, width: int, *, seed: int = 0, corpus: Sequence[str] = (), layers: int = 3
) -> TinyChatEncoder:
    """A random tiny chat encoder for ``family`` (a ``FAMILIES`` key) whose features are ``width``
    wide: the LLM's hidden size for Qwen-Image, a third of it per stacked layer for FLUX.2.

    ``corpus``: texts whose words the tokenizer must know (the template's words are always known)."""
    from transformers import Qwen3Config, Qwen3Model

    fam = FAMILIES[family]
    layout: Layout = "stacked" if fam.architecture == "flux2" else "last"
    hidden = width // 3 if layout == "stacked" else width
    if hidden * (3 if layout == "stacked" else 1) != width or hidden % 2:
        raise ValueError(f"width {width} cannot be made of {layout} hidden states of an even width")
    tokenizer = word_tokenizer(
        4096, _SPECIALS, "<|endoftext|>", None, [fam.routing_template.replace("{}", " "), *(corpus or _INSTRUCTIONS)]
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3Model(
            Qwen3Config(
                vocab_size=len(tokenizer),
                hidden_size=hidden,
                intermediate_size=2 * hidden,
                num_hidden_layers=layers,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=hidden // 2,
                max_position_embeddings=1024,
                pad_token_id=tokenizer.pad_token_id,
            )
        ).eval()
    return TinyChatEncoder(model, tokenizer, fam.routing_template, layout)
