"""Text Encode tokenises an instruction as the trainer did, with ComfyUI's own FLUX tokenizers.

ComfyUI's tokenizers ship with it (no weights needed); the trainer tokenises with the T5 tokenizer
of the same files through transformers: literal text, padded and truncated to 512 tokens.
"""

from __future__ import annotations

import os
from typing import Any

import pytest


class TokenizingClip:
    """``comfy.sd.CLIP.tokenize`` as it calls the real FluxTokenizer (the encoders need weights)."""

    def __init__(self) -> None:
        from comfy.text_encoders.flux import FluxTokenizer

        self.tokenizer = FluxTokenizer()

    def tokenize(self, text: str, return_word_ids: bool = False, **kwargs: Any) -> dict:
        return self.tokenizer.tokenize_with_weights(text, return_word_ids, **kwargs)


TEXTS = [
    "replace the sign's text with (OPEN)",  # ComfyUI's weighting would drop the brackets, weight 1.1
    "make the car (red:1.5) and the sky [blue]",
    "turn it into a watercolour painting",
    " ".join(["a very long instruction"] * 200),  # 800 words: beyond 512 tokens, truncated as the trainer does
]


@pytest.mark.parametrize("text", TEXTS)
def test_routing_tokens_equal_the_trainers(instructmole_pack, text):
    import comfy.text_encoders.flux
    from transformers import T5TokenizerFast

    signal = instructmole_pack.nodes.signal
    folder = os.path.join(os.path.dirname(comfy.text_encoders.flux.__file__), "t5_tokenizer")
    trainer = T5TokenizerFast.from_pretrained(folder)
    want = trainer(text, padding="max_length", max_length=512, truncation=True).input_ids
    tokens = signal.routing_tokens(TokenizingClip(), text, 512)
    (t5,) = tokens["t5xxl"]
    assert [t[0] for t in t5] == want
    assert all(t[1] == 1.0 for t in t5)  # no prompt weights
    if "(" in text:  # ComfyUI's own reading of the same text differs: why the weighting syntax is off
        weighted = TokenizingClip().tokenize(text, tokenizer_options={"t5xxl_min_length": 512})["t5xxl"][0]
        assert [t[0] for t in weighted] != want or any(t[1] != 1.0 for t in weighted)
