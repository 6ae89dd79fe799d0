"""The ComfyUI nodes of InstructMoLE (V3 schema). Thin: the math lives in ``instructmole/``."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .card_routes import register_routes
from .common import register_folder
from .council_io import LoadCouncil
from .council_nodes import ApplyCouncil, BlendCouncils, CouncilPreview, OverrideCouncil
from .export_nodes import SaveCouncilLora
from .icedit_nodes import ICEditDiptych, ICEditRightHalf
from .loaders import AdapterFile, ApplyAdapter, LoadAdapter, LoadKontext
from .routing_nodes import QwenEditTextEncode, Route, TextEncode
from .token_map import TokenExpertMap

NODES: list[type[io.ComfyNode]] = [
    LoadAdapter,
    LoadKontext,
    AdapterFile,
    ApplyAdapter,
    TextEncode,
    QwenEditTextEncode,
    Route,
    OverrideCouncil,
    BlendCouncils,
    ApplyCouncil,
    CouncilPreview,
    LoadCouncil,
    SaveCouncilLora,
    TokenExpertMap,
    ICEditDiptych,
    ICEditRightHalf,
]


class InstructMoLEExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> InstructMoLEExtension:
    register_folder()
    register_routes()  # the adapter card and preview the loader nodes show (web/adapter_card.js)
    return InstructMoLEExtension()
