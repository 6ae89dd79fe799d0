"""Loader nodes: an adapter onto a MODEL of its family, or Kontext and its adapter in one node."""

from __future__ import annotations

from typing import Any

import torch
from comfy_api.latest import io

from ..instructmole import Adapter, InstructMoLEError
from ..instructmole.checks import STRENGTH_RANGE, checked_strength
from .common import (
    ADAPTER,
    ADAPTER_FILE,
    APPLY_ADAPTER,
    LOAD_ADAPTER,
    LOAD_KONTEXT,
    LOADERS,
    NodeInputError,
    adapter_files,
    adapter_fingerprint,
    adapter_path,
    load_adapter_input,
)
from .runtime import ModelMismatchError, apply_adapter

_STRENGTHS = [
    io.Float.Input(
        "lora_strength",
        default=1.0,
        min=STRENGTH_RANGE[0],
        max=STRENGTH_RANGE[1],
        step=0.01,
        tooltip="Strength of the adapter's plain-LoRA part (applied through ComfyUI's own LoRA code). 0 leaves it off.",
    ),
    io.Float.Input(
        "expert_strength",
        default=1.0,
        min=STRENGTH_RANGE[0],
        max=STRENGTH_RANGE[1],
        step=0.01,
        tooltip="Multiplies every council weight of the routed experts. 0 switches the experts off.",
    ),
]
_OUTPUTS = [
    io.Model.Output(
        display_name="MODEL",
        tooltip="The model with InstructMoLE on: every image in a batch is routed from its own conditioning.",
    ),
    ADAPTER.Output(display_name="adapter", tooltip="The loaded adapter, for the Route node."),
]


def _adapter_input() -> io.Combo.Input:
    return io.Combo.Input(
        "adapter",
        options=adapter_files(),
        tooltip="An InstructMoLE adapter file (.safetensors) from models/instructmole or models/loras.",
    )


def _missing_adapter(adapter: str | None) -> bool | str:
    """For ``validate_inputs``: V3 combos are not checked against their list by ComfyUI's validation
    (only V1 list-typed inputs are), so a missing file would otherwise fail only when the node runs,
    after the diffusion model has loaded."""
    if adapter is None or adapter_path(adapter) is not None:  # None: linked, known only at run time
        return True
    return f"adapter '{adapter}' was not found in models/instructmole or models/loras; pick a file from the list"


def _apply(node: str, model, adapter, lora_strength: float, expert_strength: float) -> io.NodeOutput:
    """``adapter``: a loaded Adapter, or the file name a combo gives (loaded after the cheap checks)."""
    # ComfyUI's min/max check lets NaN through (every comparison with NaN is False).
    for name, value in (("lora_strength", lora_strength), ("expert_strength", expert_strength)):
        try:
            checked_strength(name, value)
        except InstructMoLEError as err:
            raise NodeInputError(node, name, str(err)) from None
    if isinstance(adapter, str):
        adapter = load_adapter_input(node, adapter)
    elif not isinstance(adapter, Adapter):
        raise NodeInputError(node, "adapter", f"connect the adapter output of '{ADAPTER_FILE}'")
    try:
        patched = apply_adapter(model, adapter, expert_strength=expert_strength, lora_strength=lora_strength)
    except ModelMismatchError as err:
        raise NodeInputError(node, "model", str(err)) from None
    return io.NodeOutput(patched, adapter)


class AdapterFile(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstructMoLE_AdapterFile",
            display_name=ADAPTER_FILE,
            category=LOADERS,
            description="Loads an InstructMoLE adapter file on its own, without a model: routing, overrides and "
            f"their checks then run without waiting for the diffusion model. Put it on a model with '{APPLY_ADAPTER}'.",
            inputs=[_adapter_input()],
            outputs=[
                ADAPTER.Output(display_name="adapter", tooltip=f"The loaded adapter, for Route and {APPLY_ADAPTER}.")
            ],
        )

    @classmethod
    def validate_inputs(cls, adapter: str | None = None) -> bool | str:
        return _missing_adapter(adapter)

    @classmethod
    def fingerprint_inputs(cls, adapter: str | None = None, **_: Any) -> str:
        """Run again when the adapter file changes on disk, even with its old modification time."""
        return adapter_fingerprint(adapter)

    @classmethod
    def execute(cls, adapter: str) -> io.NodeOutput:
        return io.NodeOutput(load_adapter_input(ADAPTER_FILE, adapter))


class ApplyAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstructMoLE_ApplyAdapter",
            display_name=APPLY_ADAPTER,
            category=LOADERS,
            description=f"Applies a loaded InstructMoLE adapter (from '{ADAPTER_FILE}') to a model of its family, "
            f"as '{LOAD_ADAPTER}' does with a file name.",
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The adapter's model from any loader: FLUX.1 Kontext [dev], Qwen-Image-Edit-2511 or "
                    "FLUX.2 [klein] (the adapter says which; another is refused).",
                ),
                ADAPTER.Input("adapter", tooltip=f"The adapter output of '{ADAPTER_FILE}'."),
                *_STRENGTHS,
            ],
            outputs=_OUTPUTS,
        )

    @classmethod
    def execute(cls, model, adapter, lora_strength: float, expert_strength: float) -> io.NodeOutput:
        return _apply(APPLY_ADAPTER, model, adapter, lora_strength, expert_strength)


class LoadAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstructMoLE_LoadAdapter",
            display_name=LOAD_ADAPTER,
            category=LOADERS,
            description="Applies an InstructMoLE adapter (routed mixture of LoRA experts plus its plain LoRA) to a "
            "model of its family (FLUX.1 Kontext, Qwen-Image-Edit, FLUX.2 [klein]) from any loader. Layers are never "
            "replaced, so other LoRAs, fp8 weights and low-VRAM offloading keep working.",
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The adapter's model from any loader: FLUX.1 Kontext [dev], Qwen-Image-Edit-2511 or "
                    "FLUX.2 [klein] (the adapter says which; another is refused).",
                ),
                _adapter_input(),
                *_STRENGTHS,
            ],
            outputs=_OUTPUTS,
        )

    @classmethod
    def validate_inputs(cls, adapter: str | None = None) -> bool | str:
        return _missing_adapter(adapter)

    @classmethod
    def fingerprint_inputs(cls, adapter: str | None = None, **_: Any) -> str:
        """Run again when the adapter file changes on disk, even with its old modification time."""
        return adapter_fingerprint(adapter)

    @classmethod
    def execute(cls, model, adapter: str, lora_strength: float, expert_strength: float) -> io.NodeOutput:
        return _apply(LOAD_ADAPTER, model, adapter, lora_strength, expert_strength)


_DTYPES = {
    "default": {},
    "fp8_e4m3fn": {"dtype": torch.float8_e4m3fn},
    "fp8_e4m3fn_fast": {"dtype": torch.float8_e4m3fn, "fp8_optimizations": True},
    "fp8_e5m2": {"dtype": torch.float8_e5m2},
}


class LoadKontext(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import folder_paths

        return io.Schema(
            node_id="InstructMoLE_LoadKontext",
            display_name=LOAD_KONTEXT,
            category=LOADERS,
            description="Loads a FLUX.1 Kontext diffusion model with ComfyUI's own loader and applies an "
            "InstructMoLE adapter to it, in one node.",
            inputs=[
                io.Combo.Input(
                    "unet_name",
                    options=folder_paths.get_filename_list("diffusion_models"),
                    tooltip="The FLUX.1 Kontext [dev] diffusion model file (models/diffusion_models).",
                ),
                io.Combo.Input(
                    "weight_dtype",
                    options=list(_DTYPES),
                    default="default",
                    tooltip="Weight format to load the model in, as in ComfyUI's Load Diffusion Model.",
                ),
                _adapter_input(),
                *_STRENGTHS,
            ],
            outputs=_OUTPUTS,
        )

    @classmethod
    def validate_inputs(cls, adapter: str | None = None, unet_name: str | None = None) -> bool | str:
        import folder_paths

        if unet_name is not None and folder_paths.get_full_path("diffusion_models", unet_name) is None:
            return f"unet_name '{unet_name}' was not found in models/diffusion_models; pick a file from the list"
        return _missing_adapter(adapter)

    @classmethod
    def fingerprint_inputs(cls, adapter: str | None = None, **_: Any) -> str:
        """Run again when the adapter file changes on disk, even with its old modification time."""
        return adapter_fingerprint(adapter)

    @classmethod
    def execute(
        cls, unet_name: str, weight_dtype: str, adapter: str, lora_strength: float, expert_strength: float
    ) -> io.NodeOutput:
        import comfy.sd
        import folder_paths

        node = LOAD_KONTEXT
        path = folder_paths.get_full_path("diffusion_models", unet_name)
        if path is None:
            raise NodeInputError(node, "unet_name", f"'{unet_name}' was not found in models/diffusion_models")
        if weight_dtype not in _DTYPES:
            raise NodeInputError(node, "weight_dtype", f"{weight_dtype!r} is not one of {', '.join(_DTYPES)}")
        try:
            model = comfy.sd.load_diffusion_model(path, model_options=dict(_DTYPES[weight_dtype]))
        except (RuntimeError, ValueError, OSError) as err:  # ComfyUI's own loader: not a model it knows
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise NodeInputError(
                node, "unet_name", f"ComfyUI could not load '{unet_name}' ({first}); pick a FLUX.1 Kontext [dev] file"
            ) from None
        return _apply(node, model, adapter, lora_strength, expert_strength)
