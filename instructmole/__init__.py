"""InstructMoLE: instruction-routed mixtures of low-rank experts for FLUX.1 Kontext.

Pure PyTorch at import time: nothing here imports ComfyUI or diffusers at module level, so the
ComfyUI nodes, the trainer and plain scripts all share this one core.
"""

from .adapter import Adapter, AdapterError
from .attach import AttachedAdapter, AttachError, attach
from .config import ConfigError, LayerSpec, MoLEConfig
from .council import Council, CouncilMismatchError
from .errors import InstructMoLEError
from .formats import load_adapter
from .model import InstructMoLE
from .overrides import CouncilRuleError, apply_rules, ban, blend, force, only, parse_rules, scale, take, top
from .reference import import_reference

__all__ = [
    "Adapter",
    "AdapterError",
    "AttachError",
    "AttachedAdapter",
    "ConfigError",
    "Council",
    "CouncilMismatchError",
    "CouncilRuleError",
    "InstructMoLE",
    "InstructMoLEError",
    "LayerSpec",
    "MoLEConfig",
    "apply_rules",
    "attach",
    "ban",
    "blend",
    "force",
    "import_reference",
    "load_adapter",
    "only",
    "parse_rules",
    "scale",
    "take",
    "top",
]

__version__ = "0.1.0"
