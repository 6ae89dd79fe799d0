"""Test-only ComfyUI node pack (V1 API): tiny MODELs, CLIPs and VAEs, random Flux CONDITIONING.

Why it exists: a headless server can only run a workflow on models it can load, and nothing real
is tiny -- ``UNETLoader`` detection hard-codes Flux's 3072 width, and ComfyUI's T5-XXL / CLIP-L
configs are fixed. These nodes hand the server the same tiny models the in-process tests use:

- ``InstructMoLETest_TinyFlux(seed, family)``: ComfyUI's own Flux with the weights of
  ``instructmole.tiny.tiny_flux(seed)`` (so server results are comparable with in-process ones),
  Kontext-shaped or FLUX.1 Fill-shaped (384 input channels);
- ``InstructMoLETest_TinyConditioning(seed, tokens, guidance)``: random T5 ``[1, tokens, 64]`` and
  pooled ``[1, 32]``;
- ``InstructMoLETest_TinyCLIP(seed)``: ``tests/comfyui/tiny_clip.TinyCLIP``, a duck-typed CLIP;
- the other families (Qwen-Image-Edit-2511, FLUX.2 [klein]), for the workflows that load them:
  ``InstructMoLETest_TinyFamilyModel(family, seed)``, ComfyUI's own Qwen-Image or FLUX.2 with the
  weights of ``instructmole.tiny_families``' ``tiny_qwen_image(seed)`` / ``tiny_flux2(seed)``
  (``comfy_tiny_families.py``); ``InstructMoLETest_TinyChatCLIP(family, seed)``, the family's chat-LLM
  text encoder (``tiny_chat_clip.TinyChatCLIP``); ``InstructMoLETest_TinyVAE(family, seed)``, a random
  tiny VAE that ComfyUI's own detection reads as the family's (Wan 2.1's for Qwen-Image, FLUX.2's
  AutoencoderKL), built in memory.

Import rules (ComfyUI loads this folder under a module name made from its path):
- the repo root is *appended* to ``sys.path`` so ``instructmole`` imports while ComfyUI's own
  top-level modules (``nodes``, ``utils``, ``server``) keep priority over ours;
- ``comfy_tiny.py``, ``comfy_tiny_families.py``, ``tiny_clip.py`` and ``tiny_chat_clip.py`` are loaded
  by file path under unique module names, since inside the server ``tests`` is ComfyUI's own
  ``tests/`` package.
"""

from __future__ import annotations

import importlib.util
import sys
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

HERE = Path(__file__).resolve().parent  # resolve(): the server sees this folder through a symlink
REPO_ROOT = HERE.parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))

CATEGORY = "InstructMoLE/testing"
SEED = ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "Seed of the random weights or tensors."})


@cache
def _helper(name: str) -> ModuleType:
    """``tests/comfyui/<name>.py`` as a module of its own (``tests`` is ComfyUI's package here)."""
    spec = importlib.util.spec_from_file_location(f"instructmole_testing_{name}", HERE.parent / f"{name}.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {HERE.parent / name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class TinyFlux:
    """The tiny Flux as a ComfyUI MODEL (a ModelPatcher over ComfyUI's own Flux implementation)."""

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("ComfyUI's Flux with the weights of instructmole.tiny.tiny_flux(seed).",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        family = (["kontext", "fill"], {"default": "kontext", "tooltip": "fill: FLUX.1 Fill shaped (384 inputs)."})
        return {"required": {"seed": SEED}, "optional": {"family": family}}

    def load(self, seed: int, family: str = "kontext") -> tuple[Any]:
        from instructmole.tiny import tiny_flux

        comfy_tiny = _helper("comfy_tiny")
        if family == "fill":
            fill = tiny_flux(seed, in_channels=384, out_channels=64)
            return (comfy_tiny.comfy_flux_from_diffusers(fill, model_config="FluxInpaint"),)
        return (comfy_tiny.comfy_flux_from_diffusers(tiny_flux(seed)),)


class TinyConditioning:
    """Random Flux conditioning for the tiny model: T5 features, pooled vector and guidance."""

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("Random T5 [1, tokens, 64] with pooled_output [1, 32] and guidance.",)
    FUNCTION = "make"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "seed": SEED,
                "tokens": ("INT", {"default": 16, "min": 1, "max": 4096, "tooltip": "T5 token count."}),
                "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "tooltip": "Flux guidance."}),
            }
        }

    def make(self, seed: int, tokens: int, guidance: float) -> tuple[list]:
        g = torch.Generator().manual_seed(seed)
        t5 = torch.randn(1, tokens, 64, generator=g)
        pooled = torch.randn(1, 32, generator=g)
        return ([[t5, {"pooled_output": pooled, "guidance": guidance}]],)


class TinyCLIP:
    """A duck-typed FLUX text encoder (T5 + CLIP pooled) of the tiny model's widths."""

    RETURN_TYPES = ("CLIP",)
    OUTPUT_TOOLTIPS = ("tests/comfyui/tiny_clip.TinyCLIP(seed): T5 64-wide, pooled 32.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"seed": SEED}}

    def load(self, seed: int) -> tuple[Any]:
        return (_helper("tiny_clip").TinyCLIP(seed),)


FAMILY_MODELS = ["qwen_image", "flux2"]  # the architectures (comfy_tiny_families' keys)
CHAT_CLIPS = {"qwen_image": "qwen-image-edit-2511", "flux2": "flux.2-klein-4b"}  # the chat CLIP of each


def _family_input(tooltip: str) -> tuple:
    return (FAMILY_MODELS, {"default": FAMILY_MODELS[0], "tooltip": tooltip})


def _runnable(family: str) -> Any:
    """comfy_tiny_families, once this ComfyUI is known to run the family's twin (else a one-line error)."""
    families = _helper("comfy_tiny_families")
    why = families.family_missing(family)
    if why is not None:
        raise RuntimeError(why)
    return families


class TinyFamilyModel:
    """The tiny Qwen-Image-Edit-2511 or FLUX.2 [klein] as a ComfyUI MODEL (ComfyUI's own model class)."""

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("ComfyUI's Qwen-Image / FLUX.2 with the weights of tiny_qwen_image(seed) / tiny_flux2(seed).",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"family": _family_input("Qwen-Image-Edit-2511 or FLUX.2 [klein]."), "seed": SEED}}

    def load(self, family: str, seed: int) -> tuple[Any]:
        from instructmole.tiny_families import tiny_flux2, tiny_qwen_image

        families = _runnable(family)
        if family == "qwen_image":
            return (families.comfy_qwen_from_diffusers(tiny_qwen_image(seed)),)
        return (families.comfy_flux2_from_diffusers(tiny_flux2(seed)),)


class TinyChatCLIP:
    """The family's chat-LLM text encoder, tiny (Qwen2.5-VL's for Qwen-Image, Qwen3 4B's for FLUX.2 [klein])."""

    RETURN_TYPES = ("CLIP",)
    OUTPUT_TOOLTIPS = ("tests/comfyui/tiny_chat_clip.TinyChatCLIP of the family, widths of the tiny models.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"family": _family_input("Whose text encoder."), "seed": SEED}}

    def load(self, family: str, seed: int) -> tuple[Any]:
        return (_helper("tiny_chat_clip").TinyChatCLIP(CHAT_CLIPS[family], seed),)


class TinyVAE:
    """A random tiny VAE that ComfyUI's detection reads as the family's (Wan 2.1's / FLUX.2's AutoencoderKL)."""

    RETURN_TYPES = ("VAE",)
    OUTPUT_TOOLTIPS = ("comfy.sd.VAE of a random state dict: comfy_tiny_families.tiny_vae(family, seed).",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"family": _family_input("Whose VAE."), "seed": SEED}}

    def load(self, family: str, seed: int) -> tuple[Any]:
        return (_runnable(family).tiny_vae(family, seed),)


NODE_CLASS_MAPPINGS = {
    "InstructMoLETest_TinyFlux": TinyFlux,
    "InstructMoLETest_TinyConditioning": TinyConditioning,
    "InstructMoLETest_TinyCLIP": TinyCLIP,
    "InstructMoLETest_TinyFamilyModel": TinyFamilyModel,
    "InstructMoLETest_TinyChatCLIP": TinyChatCLIP,
    "InstructMoLETest_TinyVAE": TinyVAE,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "InstructMoLETest_TinyFlux": "Tiny Flux (test)",
    "InstructMoLETest_TinyConditioning": "Tiny Conditioning (test)",
    "InstructMoLETest_TinyCLIP": "Tiny CLIP (test)",
    "InstructMoLETest_TinyFamilyModel": "Tiny Qwen-Image / FLUX.2 (test)",
    "InstructMoLETest_TinyChatCLIP": "Tiny chat CLIP (test)",
    "InstructMoLETest_TinyVAE": "Tiny family VAE (test)",
}
