"""InstructMoLE for ComfyUI: instruction-routed mixtures of LoRA experts on FLUX.1 Kontext.

ComfyUI loads this folder as a custom node pack and calls ``comfy_entrypoint``. Imported anywhere
else (tests, scripts), it imports cleanly and offers no nodes: the core library ``instructmole``
needs no ComfyUI.
"""

WEB_DIRECTORY = "./web"

try:
    import comfy_api.latest  # noqa: F401  (present only inside ComfyUI)
except ImportError:
    __all__ = ["WEB_DIRECTORY"]
else:
    from .nodes import comfy_entrypoint

    __all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
