"""Save a council as a plain LoRA in ComfyUI's loras folder (``instructmole/export.py`` does the math).

The file loads with ComfyUI's core LoraLoader (and diffusers' ``load_lora_weights``) on a model
without this pack and gives what Apply Council's fixed mode gives. Files are named as ComfyUI's
own savers name them, ``<prefix>_00001_.safetensors`` with the next free counter, so a user's
file is never replaced.
"""

from __future__ import annotations

import os
from typing import Any

from comfy_api.latest import io

from ..instructmole import Adapter, Council, InstructMoLEError
from ..instructmole.checks import checked_strength
from ..instructmole.council import describe_value
from ..instructmole.export import DTYPES, council_lora, parse_rank
from .common import ADAPTER, ADAPTER_FILE, COUNCIL, COUNCILS, NodeInputError
from .loaders import _STRENGTHS

NODE = "InstructMoLE Save Council as LoRA"
MAX_TRIES = 100_000


def _rank(value: Any) -> int | None:
    try:
        return parse_rank(value)
    except InstructMoLEError as err:
        raise NodeInputError(NODE, "rank", str(err)) from None


def free_lora_path(prefix: str) -> tuple[str, str]:
    """``(full path, name as the LoraLoader lists it)`` of the next free ``<prefix>_NNNNN_.safetensors``
    in the loras folder; a prefix that leads outside it is refused."""
    import folder_paths

    if not isinstance(prefix, str) or not prefix.strip():
        raise NodeInputError(NODE, "filename_prefix", "is empty; name the file, e.g. 'instructmole/council'")
    root = os.path.abspath(folder_paths.get_folder_paths("loras")[0])
    os.makedirs(root, exist_ok=True)
    try:
        folder, name, counter, _, _ = folder_paths.get_save_image_path(prefix.strip(), root)
    except Exception:  # ComfyUI raises a bare Exception for a prefix outside the folder
        raise NodeInputError(
            NODE, "filename_prefix", f"{describe_value(prefix)} leads outside the loras folder; use a relative name"
        ) from None
    os.makedirs(folder, exist_ok=True)
    for _ in range(MAX_TRIES):
        file = f"{name}_{counter:05}_.safetensors"
        path = os.path.join(folder, file)
        if not os.path.exists(path):
            listed = os.path.relpath(path, root).replace(os.sep, "/")
            return path, listed
        counter += 1
    raise NodeInputError(NODE, "filename_prefix", f"every counter of {describe_value(prefix)} is taken; use another")


class SaveCouncilLora(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InstructMoLE_SaveCouncilLora",
            display_name=NODE,
            category=COUNCILS,
            description="Writes a council (a routed, overridden or loaded one) as an ordinary LoRA file in "
            "models/loras: ComfyUI's own LoraLoader, diffusers and other tools load it without this pack and get "
            "what Apply Council (fixed) gives. 'exact' keeps every expert factor; a number compresses each layer "
            "by SVD and reports its error.",
            inputs=[
                ADAPTER.Input("adapter", tooltip=f"The adapter the council was routed with (from '{ADAPTER_FILE}')."),
                COUNCIL.Input("council", tooltip="The council to save: one instruction's (Route, Override, Load)."),
                io.String.Input(
                    "filename_prefix",
                    default="instructmole/council",
                    tooltip="Name of the file in models/loras (a subfolder may be given); a counter is added, so an "
                    "existing file is never replaced.",
                ),
                io.String.Input(
                    "rank",
                    default="exact",
                    tooltip="'exact': every expert factor (rank k·r per layer, equal to fixed mode). A number N: "
                    "each layer compressed to rank N by SVD (smaller file); the report gives each layer's error.",
                ),
                io.Boolean.Input(
                    "include_lora",
                    default=True,
                    tooltip="Also write the adapter's plain-LoRA part, so the file alone reproduces the adapter with "
                    "this council. Off: only the experts' update.",
                ),
                *_STRENGTHS,  # the loaders' strengths, baked into the file
                io.Combo.Input(
                    "dtype",
                    options=list(DTYPES),
                    default="fp32",
                    tooltip="Number format of the file: fp32 is exact; bf16 or fp16 halve its size.",
                ),
            ],
            outputs=[
                io.String.Output(display_name="lora_name", tooltip="The file's name as LoraLoader lists it."),
                io.String.Output(display_name="report", tooltip="Per layer: rank written and relative error."),
            ],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, rank: str | None = None, **_: Any) -> bool | str:
        if rank is None:  # linked: checked when the node runs
            return True
        try:
            parse_rank(rank)
        except InstructMoLEError as err:
            return f"{NODE}, input 'rank': {err}"
        return True

    @classmethod
    def execute(
        cls,
        adapter,
        council,
        filename_prefix: str,
        rank: str,
        include_lora: bool,
        lora_strength: float,
        expert_strength: float,
        dtype: str,
    ) -> io.NodeOutput:
        if not isinstance(adapter, Adapter):
            raise NodeInputError(NODE, "adapter", f"connect the adapter output of '{ADAPTER_FILE}'")
        if not isinstance(council, Council):
            raise NodeInputError(NODE, "council", f"got {describe_value(council)}; connect a COUNCIL output")
        if council.batch_size != 1:
            raise NodeInputError(
                NODE,
                "council",
                f"this council holds {council.batch_size} instructions and a LoRA file holds one; route a single "
                "instruction",
            )
        for name, value in (("lora_strength", lora_strength), ("expert_strength", expert_strength)):
            try:
                checked_strength(name, value)
            except InstructMoLEError as err:
                raise NodeInputError(NODE, name, str(err)) from None
        limit = _rank(rank)
        try:
            result = council_lora(
                adapter,
                council,
                rank="exact" if limit is None else limit,
                with_lora=bool(include_lora),
                lora_strength=lora_strength,
                expert_strength=expert_strength,
                dtype=dtype,
            )
        except InstructMoLEError as err:
            raise NodeInputError(NODE, "council", str(err)) from None
        path, listed = free_lora_path(filename_prefix)
        try:
            result.save(path)
        except InstructMoLEError as err:
            raise NodeInputError(NODE, "filename_prefix", str(err)) from None
        except OSError as err:
            raise NodeInputError(NODE, "filename_prefix", f"cannot write '{listed}': {err.strerror or err}") from None
        report = f"saved models/loras/{listed}\n{result.report()}"
        print(f"[InstructMoLE] {report}")
        return io.NodeOutput(listed, report, ui={"text": [report]})
