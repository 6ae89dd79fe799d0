"""The routing signal of the chat-LLM families, from a ComfyUI-shaped text encoder, equals the trainer's.

The trainer encodes ``template.format(instruction)`` as prefix + instruction + suffix tokenized apart
and masks all but the instruction (``instructmole.tiny_llm.TinyChatEncoder.encode``); the nodes find
the instruction's tokens in what ComfyUI's encoder tokenized and dropped (``nodes/chat_signal.py``).
Both must give the same features on the same positions, and so the same council.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

from instructmole import Adapter, InstructMoLE
from instructmole.families import FAMILIES
from instructmole.tiny_families import tiny_family_config, tiny_flux2, tiny_qwen_image

from .tiny_chat_clip import TinyChatCLIP, _encoder

BUILD = {"qwen-image-edit-2511": tiny_qwen_image, "flux.2-klein-4b": tiny_flux2}
TEXTS = ["make the sky a stormy purple", "add a red hat to the dog", ""]


@pytest.fixture(scope="module")
def chat_signal(instructmole_pack: Any) -> Any:
    import importlib

    return importlib.import_module(f"{instructmole_pack.__name__}.nodes.chat_signal")


@pytest.mark.parametrize("family", list(BUILD))
@pytest.mark.parametrize("text", TEXTS)
def test_signal_is_the_trainers_on_the_instruction_tokens(chat_signal: Any, family: str, text: str) -> None:
    clip = TinyChatCLIP(family)
    signal = chat_signal.encode_chat_signal(clip, text, FAMILIES[family])
    assert signal.exact
    trained, mask = _encoder(family, 0).encode([text])
    assert int(signal.mask.sum()) == int(mask.sum()) == len(clip.encoder.tokenize(text))
    torch.testing.assert_close(signal.text[signal.mask], trained[mask], atol=1e-5, rtol=1e-5)
    # Everything else is template or padding: the router never reads it.
    assert signal.text.shape[1] > int(signal.mask.sum())


@pytest.mark.parametrize("family", list(BUILD))
def test_same_council_as_the_trainer(chat_signal: Any, family: str) -> None:
    cfg = tiny_family_config(BUILD[family]())
    adapter = Adapter(InstructMoLE(cfg))
    signals = [chat_signal.encode_chat_signal(TinyChatCLIP(family), t, FAMILIES[family]) for t in TEXTS[:2]]
    trained, mask = _encoder(family, 0).encode(TEXTS[:2])
    for i, s in enumerate(signals):
        ours = adapter.route(s.text, None, mask=s.mask)
        theirs = adapter.route(trained[i : i + 1], None, mask=mask[i : i + 1])
        assert torch.equal(ours.weights > 0, theirs.weights > 0)  # the same experts
        torch.testing.assert_close(ours.weights, theirs.weights, atol=1e-6, rtol=1e-5)


def test_family_of_the_text_encoder(chat_signal: Any) -> None:
    assert chat_signal.clip_family(TinyChatCLIP("qwen-image-edit-2511")) == "qwen_image"
    assert chat_signal.clip_family(TinyChatCLIP("flux.2-klein-4b")) == "flux2"
    with pytest.raises(Exception, match="not Qwen-Image's; load the text encoder of Qwen-Image-Edit-2511"):
        chat_signal.encode_chat_signal(TinyChatCLIP("flux.2-klein-4b"), "x", FAMILIES["qwen-image-edit-2511"])


def test_a_tokenizer_that_merges_across_the_template_edge_is_approximate(chat_signal: Any, caplog) -> None:
    """If the whole text does not tokenize as its parts do, the mask falls back to every real token."""
    clip = TinyChatCLIP("flux.2-klein-4b")
    merge = clip.encoder.tokenizer.convert_tokens_to_ids("sky")
    original = clip.tokenize

    def merging(text: str, *args: Any, **kwargs: Any) -> dict:
        out = original(text, *args, **kwargs)
        if "<|im_start|>" in text:  # the whole templated text: its first instruction token changes
            row = out[clip.key][0]
            for i, (t, w) in enumerate(row):
                if t == clip.encoder.tokenizer.convert_tokens_to_ids("make"):
                    row[i] = (merge, w)
                    break
        return out

    clip.tokenize = merging
    signal = chat_signal.encode_chat_signal(clip, "make the sky a stormy purple", FAMILIES["flux.2-klein-4b"])
    assert not signal.exact
    templated = FAMILIES["flux.2-klein-4b"].routing_template.format("make the sky a stormy purple")
    real = sum(t != clip.encoder.pad_id for t, _ in original(templated, llama_template="{}")[clip.key][0])
    assert int(signal.mask.sum()) == real  # every token but the padding
    assert "close to, not exactly" in caplog.text


@pytest.fixture(scope="module")
def routing_nodes(instructmole_pack: Any) -> Any:
    import importlib

    return importlib.import_module(f"{instructmole_pack.__name__}.nodes.routing_nodes")


@pytest.mark.parametrize("family", list(BUILD))
def test_text_encode_and_route_give_the_trainers_council(routing_nodes: Any, family: str) -> None:
    """Text Encode's conditioning carries the signal; Route from it, from CLIP + text, and the trainer's
    encode all give one council."""
    clip = TinyChatCLIP(family)
    adapter = Adapter(InstructMoLE(tiny_family_config(BUILD[family]())))
    text = "make the sky a stormy purple"
    conditioning = routing_nodes.TextEncode.execute(clip, text, adapter).args[0]
    from_conditioning = routing_nodes.Route.execute(adapter, conditioning=conditioning).args[0]
    from_text = routing_nodes.Route.execute(adapter, clip=clip, text=text).args[0]
    trained, mask = _encoder(family, 0).encode([text])
    expected = adapter.route(trained, None, mask=mask)
    for council in (from_conditioning, from_text):
        assert torch.equal(council.weights > 0, expected.weights > 0)
        torch.testing.assert_close(council.weights, expected.weights, atol=1e-6, rtol=1e-5)
    assert from_conditioning.label == ("conditioning",) and from_text.label == (text,)
    # The model's conditioning is ComfyUI's own encode in the family's template.
    cond = conditioning[0][0]
    own = clip.encode_from_tokens(clip.tokenize(text, llama_template=FAMILIES[family].routing_template))
    torch.testing.assert_close(cond, own)


@pytest.mark.parametrize("family", list(BUILD))
def test_route_from_a_plain_conditioning_is_approximate(routing_nodes: Any, family: str, caplog) -> None:
    clip = TinyChatCLIP(family)
    adapter = Adapter(InstructMoLE(tiny_family_config(BUILD[family]())))
    plain = clip.encode_from_tokens_scheduled(clip.tokenize("make the sky a stormy purple"))
    council = routing_nodes.Route.execute(adapter, conditioning=plain).args[0]
    assert council.label == ("conditioning (approximate)",)
    assert "close to, not exactly" in caplog.text


def test_text_encoder_of_another_family_is_refused(routing_nodes: Any) -> None:
    adapter = Adapter(InstructMoLE(tiny_family_config(tiny_flux2())))
    with pytest.raises(
        Exception, match=re.escape("this is a Qwen-Image text encoder, but the adapter was made for FLUX.2")
    ):
        routing_nodes.TextEncode.execute(TinyChatCLIP("qwen-image-edit-2511"), "x", adapter)


def test_qwen_edit_text_encode_routes_the_instruction_alone(routing_nodes: Any) -> None:
    """The pictures go to the conditioning (ComfyUI's Edit Plus node), never into the routing signal."""
    pytest.importorskip("comfy_extras.nodes_qwen", reason="this ComfyUI has no Qwen-Image-Edit nodes")
    clip = TinyChatCLIP("qwen-image-edit-2511")
    adapter = Adapter(InstructMoLE(tiny_family_config(tiny_qwen_image())))
    text = "add a red hat to the dog"
    image = torch.rand(1, 32, 32, 3)
    with_image = routing_nodes.QwenEditTextEncode.execute(clip, text, None, image, None, None, adapter).args[0]
    without = routing_nodes.QwenEditTextEncode.execute(clip, text, adapter=adapter).args[0]
    assert with_image[0][0].shape[1] > without[0][0].shape[1]  # "Picture 1: ..." went to the model
    councils = [routing_nodes.Route.execute(adapter, conditioning=c).args[0] for c in (with_image, without)]
    trained, mask = _encoder("qwen-image-edit-2511", 0).encode([text])
    expected = adapter.route(trained, None, mask=mask)
    for council in councils:
        torch.testing.assert_close(council.weights, expected.weights, atol=1e-6, rtol=1e-5)
