"""Routing nodes: encode an instruction with its exact routing signal, or route it to a council."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..instructmole import InstructMoLEError
from ..instructmole.families import FAMILIES, Family
from .chat_signal import TOKENIZER_FAMILIES, clip_family, encode_chat_signal, tokenizer_key
from .common import ADAPTER, ADAPTER_FILE, COUNCIL, LOAD_ADAPTER, ROUTING, NodeInputError
from .signal import (
    TRAINING_TEXT_LENGTH,
    attach_signal,
    carried_mask,
    carried_signal,
    encode_for_routing,
    routing_tokens,
)

log = logging.getLogger(__name__)


class TextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstructMoLE_TextEncode",
            display_name="InstructMoLE Text Encode",
            category=ROUTING,
            description="Encodes the instruction as the adapter was trained on it, for the router and the model "
            "alike. FLUX.1: the text taken literally (no '(word:1.2)' weighting), T5 padded and truncated to the "
            "adapter's training length (512 without an adapter connected; CLIP Text Encode pads to 256), plus CLIP "
            "pooled. FLUX.2 and Qwen-Image: ComfyUI's encode in the model's chat template, and the router reads the "
            "instruction's own tokens. The conditioning carries the exact routing signal, so each image is routed "
            "exactly as in training.",
            inputs=[
                io.Clip.Input(
                    "clip",
                    tooltip="The text encoder of the adapter's model: FLUX.1's T5-XXL + CLIP-L, FLUX.2's Qwen3 or "
                    "Mistral, or Qwen-Image's Qwen2.5-VL.",
                ),
                io.String.Input(
                    "text",
                    multiline=True,
                    dynamic_prompts=True,
                    tooltip="The edit instruction, e.g. 'make the sky a stormy purple'. Taken literally: "
                    "brackets stay text, as in training.",
                ),
                ADAPTER.Input(
                    "adapter",
                    optional=True,
                    tooltip="The adapter this instruction is for: T5 is padded to the length it was trained with. "
                    f"Without it, {TRAINING_TEXT_LENGTH} tokens (the reference adapter's); an adapter trained with "
                    "another length then routes close to, not exactly as, in training (the console says so).",
                ),
            ],
            outputs=[
                io.Conditioning.Output(
                    tooltip="The instruction's conditioning, T5 padded to the adapter's training length, carrying "
                    "the exact routing signal."
                )
            ],
        )

    @classmethod
    def execute(cls, clip, text: str, adapter=None) -> io.NodeOutput:
        node = "InstructMoLE Text Encode"
        family = _text_family(node, clip, adapter)
        if family.arch.router_pool == "text":
            # The conditioning is ComfyUI's own encode in the family's template (for Qwen-Image-Edit: the
            # edit template, as its Edit Plus node writes it without images); the signal its instruction.
            signal = _chat_signal(node, clip, text, family)
            conditioning = clip.encode_from_tokens_scheduled(
                clip.tokenize(text, llama_template=family.routing_template)
            )
            return io.NodeOutput(attach_signal(conditioning, signal.text, None, signal.mask))
        length = TRAINING_TEXT_LENGTH if adapter is None else adapter.config.text_length
        try:
            signal = encode_for_routing(clip, text, length)
        except InstructMoLEError as err:
            raise NodeInputError(node, "clip", str(err)) from None
        # The model gets the tokens the router gets: the ones the adapter was trained with.
        conditioning = clip.encode_from_tokens_scheduled(routing_tokens(clip, text, length))
        return io.NodeOutput(attach_signal(conditioning, *signal))


def _text_family(node: str, clip, adapter) -> Family:
    """The family whose text encoder ``clip`` is: the adapter's (checked against the encoder), else the
    encoder's own (FLUX.1 for T5 + CLIP-L)."""
    if clip is None:
        raise NodeInputError(node, "clip", "no text encoder is connected")
    try:
        arch = clip_family(clip)
    except InstructMoLEError as err:
        raise NodeInputError(node, "clip", str(err)) from None
    if adapter is not None:
        family = FAMILIES.get(adapter.config.base_model)
        if family is not None and family.architecture != arch:
            raise NodeInputError(
                node,
                "clip",
                f"this is a {FAMILIES[_encoder_family(clip, arch)].arch.title} text encoder, but the adapter was made "
                f"for {family.title}; load {family.title}'s text encoder",
            )
        if family is not None:
            return family
    return FAMILIES[_encoder_family(clip, arch)]


def _encoder_family(clip, arch: str) -> str:
    return "flux.1-kontext-dev" if arch == "flux1" else TOKENIZER_FAMILIES[tokenizer_key(clip)]


def _chat_signal(node: str, clip, text: str, family: Family):
    try:
        return encode_chat_signal(clip, text, family)
    except InstructMoLEError as err:
        raise NodeInputError(node, "clip", str(err)) from None


class QwenEditTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstructMoLE_TextEncodeQwenImageEdit",
            display_name="InstructMoLE Text Encode (Qwen-Image-Edit)",
            category=ROUTING,
            description="ComfyUI's 'TextEncodeQwenImageEditPlus' (the instruction with up to three pictures for "
            "Qwen2.5-VL, and their latents as references), plus the exact routing signal: the instruction alone in "
            "the edit template, as the trainer encoded it (the pictures' tokens are not an instruction).",
            inputs=[
                io.Clip.Input("clip", tooltip="Qwen-Image's text encoder (Qwen2.5-VL 7B)."),
                io.String.Input(
                    "text",
                    multiline=True,
                    dynamic_prompts=True,
                    tooltip="The edit instruction, e.g. 'make the sky a stormy purple'.",
                ),
                io.Vae.Input(
                    "vae", optional=True, tooltip="Qwen-Image's VAE: encodes the pictures as reference latents."
                ),
                io.Image.Input("image1", optional=True, tooltip="The picture to edit (Picture 1)."),
                io.Image.Input("image2", optional=True, tooltip="A second reference picture (Picture 2)."),
                io.Image.Input("image3", optional=True, tooltip="A third reference picture (Picture 3)."),
                ADAPTER.Input(
                    "adapter",
                    optional=True,
                    tooltip="The adapter this instruction is for: checked against this text encoder's model.",
                ),
            ],
            outputs=[
                io.Conditioning.Output(
                    tooltip="ComfyUI's Qwen-Image-Edit conditioning (with reference latents), carrying the exact "
                    "routing signal."
                )
            ],
        )

    @classmethod
    def execute(cls, clip, text: str, vae=None, image1=None, image2=None, image3=None, adapter=None) -> io.NodeOutput:
        node = "InstructMoLE Text Encode (Qwen-Image-Edit)"
        family = _text_family(node, clip, adapter)
        if family.architecture != "qwen_image":
            raise NodeInputError(
                node,
                "clip",
                f"this is {family.title}'s text encoder; this node encodes for Qwen-Image-Edit only, use "
                "'InstructMoLE Text Encode'",
            )
        try:
            from comfy_extras.nodes_qwen import TextEncodeQwenImageEditPlus
        except ImportError:
            raise NodeInputError(
                node, "clip", "this ComfyUI has no Qwen-Image-Edit text encode node; update ComfyUI"
            ) from None
        signal = _chat_signal(node, clip, text, family)
        out = TextEncodeQwenImageEditPlus.execute(clip, text, vae, image1, image2, image3)
        conditioning = out.args[0] if hasattr(out, "args") else out[0]
        return io.NodeOutput(attach_signal(conditioning, signal.text, None, signal.mask))


class Route(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstructMoLE_Route",
            display_name="InstructMoLE Route",
            category=ROUTING,
            description="Routes an instruction through the adapter's router: which experts (the council) serve "
            "each layer, and with what weight. Give CLIP + text (exact), or a CONDITIONING.",
            inputs=[
                ADAPTER.Input("adapter", tooltip=f"The adapter from {LOAD_ADAPTER} or {ADAPTER_FILE}."),
                io.Clip.Input("clip", optional=True, tooltip="The FLUX text encoders, to encode 'text' exactly."),
                io.String.Input(
                    "text",
                    multiline=True,
                    default="",
                    optional=True,
                    tooltip="The instruction to route (used with 'clip').",
                ),
                io.Conditioning.Input(
                    "conditioning",
                    optional=True,
                    tooltip="Route this conditioning's first entry instead: exact if it came from "
                    "InstructMoLE Text Encode, else close (ComfyUI pads T5 to 256 tokens).",
                ),
            ],
            outputs=[
                COUNCIL.Output(display_name="council", tooltip="The council: chosen experts and weights per layer.")
            ],
        )

    @classmethod
    def execute(cls, adapter, clip=None, text: str = "", conditioning=None) -> io.NodeOutput:
        node = "InstructMoLE Route"
        cfg = adapter.config
        text_routed = cfg.router_pool == "text"
        mask = None
        if clip is not None and text.strip():
            label = text.strip()
            if text_routed:
                signal = _chat_signal(node, clip, text, _text_family(node, clip, adapter))
                t5, pooled, mask = signal.text, None, signal.mask
                label += "" if signal.exact else " (approximate)"
            else:
                try:
                    t5, pooled = encode_for_routing(clip, text, cfg.text_length)
                except InstructMoLEError as err:
                    raise NodeInputError(node, "clip", str(err)) from None
        elif conditioning:
            t5, pooled, mask, label = _conditioning_signal(node, conditioning, cfg)
        else:
            raise NodeInputError(node, "text", "connect a CLIP and type the instruction, or connect a CONDITIONING")
        if t5.shape[-1] != cfg.text_dim or (not text_routed and pooled.shape[-1] != cfg.router_dim):
            widths = f"{t5.shape[-1]}" if text_routed else f"{t5.shape[-1]}/{pooled.shape[-1]}"
            needs = f"{cfg.text_dim}" if text_routed else f"{cfg.text_dim}/{cfg.router_dim}"
            raise NodeInputError(
                node,
                "clip" if clip is not None else "conditioning",
                f"the text features are {widths}-wide but the adapter's router reads {needs}; use the text encoder "
                f"of {FAMILIES[cfg.base_model].title if cfg.base_model in FAMILIES else cfg.base_model}",
            )
        return io.NodeOutput(adapter.route(t5, pooled, labels=[label], mask=mask))


def _conditioning_signal(node: str, conditioning: list, cfg) -> tuple:
    """``(text, pooled, mask, label)`` of a conditioning's first entry: its carried signal (exact), or
    its own features (approximate, said in the label and the console)."""
    cond, extras = conditioning[0]
    carried = carried_signal(extras)
    text_routed = cfg.router_pool == "text"
    if carried is not None and (carried[1] is None) == text_routed:
        t5, pooled = carried
        mask = carried_mask(extras) if text_routed else None
        if not text_routed and t5.shape[1] != cfg.text_length:
            log.warning(
                "InstructMoLE Route: the conditioning's routing signal has %d T5 tokens but the adapter was "
                "trained with %d: the council is close to, not exactly, the one of training. Connect this "
                "adapter to 'InstructMoLE Text Encode' for the exact council.",
                t5.shape[1],
                cfg.text_length,
            )
            return t5, pooled, mask, "conditioning (approximate)"
        return t5, pooled, mask, "conditioning"
    if text_routed:
        mask = extras.get("attention_mask")
        mask = None if mask is None else mask.reshape(cond.shape[0], -1).bool()
        t5, pooled = cond, None
    elif extras.get("pooled_output") is not None:
        t5, pooled, mask = cond, extras["pooled_output"], None
    else:
        raise NodeInputError(node, "conditioning", "it has no CLIP pooled output; use FLUX text encoders")
    log.warning(
        "InstructMoLE Route: the conditioning carries no routing signal, so it is routed from ComfyUI's own text "
        "features (%d tokens%s): the council is close to, not exactly, the one of training. Encode with "
        "'InstructMoLE Text Encode' for the exact council.",
        t5.shape[1],
        ", template included" if text_routed else "",
    )
    return t5, pooled, mask, "conditioning (approximate)"
