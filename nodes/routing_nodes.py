"""Routing nodes: encode an instruction with its exact routing signal, or route it to a council."""

from __future__ import annotations

import logging

from comfy_api.latest import io

from ..instructmole import InstructMoLEError
from .common import ADAPTER, ADAPTER_FILE, COUNCIL, LOAD_ADAPTER, ROUTING, NodeInputError
from .signal import TRAINING_TEXT_LENGTH, attach_signal, carried_signal, encode_for_routing, routing_tokens

log = logging.getLogger(__name__)


class TextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstructMoLE_TextEncode",
            display_name="InstructMoLE Text Encode",
            category=ROUTING,
            description="Encodes the instruction as the adapter was trained on it, for the router and the model "
            "alike: the text taken literally (no '(word:1.2)' weighting), T5 padded and truncated to the adapter's "
            "training length (512 without an adapter connected; CLIP Text Encode pads to 256), plus CLIP pooled. "
            "The conditioning carries the exact routing signal, so each image is routed exactly as in training.",
            inputs=[
                io.Clip.Input("clip", tooltip="The FLUX text encoders (T5-XXL + CLIP-L)."),
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
        if clip is None:
            raise NodeInputError(node, "clip", "no text encoder is connected")
        length = TRAINING_TEXT_LENGTH if adapter is None else adapter.config.text_length
        try:
            signal = encode_for_routing(clip, text, length)
        except InstructMoLEError as err:
            raise NodeInputError(node, "clip", str(err)) from None
        # The model gets the tokens the router gets: the ones the adapter was trained with.
        conditioning = clip.encode_from_tokens_scheduled(routing_tokens(clip, text, length))
        return io.NodeOutput(attach_signal(conditioning, *signal))


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
        if clip is not None and text.strip():
            try:
                t5, pooled = encode_for_routing(clip, text, adapter.config.text_length)
            except InstructMoLEError as err:
                raise NodeInputError(node, "clip", str(err)) from None
            label = text.strip()
        elif conditioning:
            cond, extras = conditioning[0]
            carried = carried_signal(extras)
            if carried is not None:
                t5, pooled = carried
            elif extras.get("pooled_output") is not None:
                t5, pooled = cond, extras["pooled_output"]
            else:
                raise NodeInputError(node, "conditioning", "it has no CLIP pooled output; use FLUX text encoders")
            label = "conditioning"
            length = adapter.config.text_length
            if carried is None:
                label = "conditioning (approximate)"
                log.warning(
                    "InstructMoLE Route: the conditioning carries no routing signal, so it is routed from ComfyUI's "
                    "own T5 features (%d tokens): the council is close to, not exactly, the one of training. Encode "
                    "with 'InstructMoLE Text Encode' for the exact council.",
                    t5.shape[1],
                )
            elif t5.shape[1] != length:
                label = "conditioning (approximate)"
                log.warning(
                    "InstructMoLE Route: the conditioning's routing signal has %d T5 tokens but the adapter was "
                    "trained with %d: the council is close to, not exactly, the one of training. Connect this "
                    "adapter to 'InstructMoLE Text Encode' for the exact council.",
                    t5.shape[1],
                    length,
                )
        else:
            raise NodeInputError(node, "text", "connect a CLIP and type the instruction, or connect a CONDITIONING")
        if t5.shape[-1] != adapter.config.text_dim or pooled.shape[-1] != adapter.config.router_dim:
            raise NodeInputError(
                node,
                "clip" if clip is not None else "conditioning",
                f"the text features are {t5.shape[-1]}/{pooled.shape[-1]}-wide but the adapter's router reads "
                f"{adapter.config.text_dim}/{adapter.config.router_dim}; use the FLUX text encoders",
            )
        return io.NodeOutput(adapter.route(t5, pooled, labels=[label]))
