"""Model families: which base model an adapter fits, how its layers are named, how it is told apart.

An adapter records the family it was trained on (``config.base_model``); every host checks it
against the loaded transformer before anything runs, so a late shape error deep inside a forward,
or worse a silently wrong image, becomes one sentence at load time.

Three architectures carry the families InstructMoLE knows:

* ``flux1``: FLUX.1 (Kontext, dev, Fill, Canny, Depth). Double and single blocks; T5 tokens and a
  CLIP-L pooled vector, which the router adds to its signal (``router_pool="clip"``).
* ``qwen_image``: Qwen-Image(-Edit). Dual-stream blocks only; Qwen2.5-VL token features with the
  chat template stripped; no pooled vector.
* ``flux2``: FLUX.2 (dev, Klein 4B/9B). Double and single blocks without biases, global modulation,
  SwiGLU MLPs; stacked LLM layers as text features; no pooled vector.

Families without a pooled vector route from the text alone (``router_pool="text"``: a masked mean of
the instruction tokens, projected; see ``routing.py``). The architecture is told from the module
tree (the same test for a diffusers model and a ComfyUI one, whose names differ), the family
within it from widths read off weight shapes: FLUX.1 Kontext and Fill differ in image input
channels (64 and 384), FLUX.2 Klein 4B and 9B in text width (7680 and 12288), Qwen-Image-Edit 2511
from 2509 in the zero-timestep modulation of its reference tokens.

Adapters always name layers the diffusers way; ``Architecture.comfy_target`` maps a name to the
module (and the rows of a fused weight) ComfyUI's native model holds it in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from .config import MoLEConfig, RouterPool
from .errors import InstructMoLEError
from .layers import REFERENCE_LORA_TARGETS, BflTarget, reference_targets, to_bfl, to_comfy_flux2

__all__ = [
    "ARCHITECTURES",
    "FAMILIES",
    "ArchKey",
    "Architecture",
    "Family",
    "SignalArgs",
    "architecture_of",
    "block_counts",
    "check_model_fits",
    "family_of",
    "model_widths",
    "reference_layers",
]

Host = Literal["diffusers", "comfy"]
ArchKey = Literal["flux1", "qwen_image", "flux2"]


@dataclass(frozen=True)
class Inputs:
    """Module paths of the Linears that read the image latents, the text features and (FLUX.1) the
    pooled vector, in one host's naming."""

    image: str
    text: str
    pooled: str | None = None


@dataclass(frozen=True)
class SignalArgs:
    """Where an architecture's diffusers forward takes the routing signal: argument names, and the
    positions diffusers gives them (used when the forward's signature cannot be read)."""

    text: str
    pooled: str | None
    mask: str | None
    order: tuple[str, ...]


@dataclass(frozen=True)
class Architecture:
    """How one architecture is built and named, in both hosts.

    ``marker``: a module path that exists only in this architecture, in each host's naming (the
    detection test; checked in ``_MARKER_ORDER``). ``comfy_patch``: the latent patch ComfyUI's model
    folds into one token (2x2 for FLUX.1 and Qwen-Image; FLUX.2's VAE latents are already packed).
    ``reference_targets``: the reference setup's MoLE layers for ``(num_double, num_single)``
    blocks; ``lora_targets``: the plain-LoRA module suffixes of the reference recipe.
    """

    key: ArchKey
    title: str
    router_pool: RouterPool
    text_features: str  # what its text input reads, in words
    inputs: dict[Host, Inputs]
    marker: dict[Host, str]
    comfy_patch: int
    double_blocks: dict[Host, str]
    single_blocks: dict[Host, str | None]
    reference_targets: Callable[[int, int], list[str]]
    lora_targets: tuple[str, ...]
    diffusers_signal: SignalArgs
    _comfy: Callable[[str, int, int], BflTarget]

    def comfy_target(self, name: str, hidden: int, mlp_hidden: int) -> BflTarget:
        """Where the canonical layer ``name`` lives in ComfyUI's native model of this architecture."""
        return self._comfy(name, hidden, mlp_hidden)


def _qwen_targets(num_double: int, _num_single: int = 0) -> list[str]:
    return [f"transformer_blocks.{n}.img_mlp.net.2" for n in range(num_double)]


def _flux2_targets(num_double: int, num_single: int) -> list[str]:
    return [f"transformer_blocks.{n}.ff.linear_out" for n in range(num_double)] + [
        f"single_transformer_blocks.{n}.attn.to_out" for n in range(num_single)
    ]


def _same_name(name: str, _hidden: int, _mlp_hidden: int) -> BflTarget:
    """ComfyUI's Qwen-Image keeps the diffusers module names."""
    return BflTarget(name)


ARCHITECTURES: dict[ArchKey, Architecture] = {
    "flux1": Architecture(
        key="flux1",
        title="FLUX.1",
        router_pool="clip",
        text_features="T5 text features",
        inputs={
            "diffusers": Inputs("x_embedder", "context_embedder", "time_text_embed.text_embedder.linear_1"),
            "comfy": Inputs("img_in", "txt_in", "vector_in.in_layer"),
        },
        marker={"diffusers": "single_transformer_blocks", "comfy": "single_blocks"},
        comfy_patch=2,
        double_blocks={"diffusers": "transformer_blocks", "comfy": "double_blocks"},
        single_blocks={"diffusers": "single_transformer_blocks", "comfy": "single_blocks"},
        reference_targets=reference_targets,
        lora_targets=REFERENCE_LORA_TARGETS,
        diffusers_signal=SignalArgs(
            "encoder_hidden_states",
            "pooled_projections",
            None,
            ("hidden_states", "encoder_hidden_states", "pooled_projections"),
        ),
        _comfy=lambda name, hidden, mlp: to_bfl(name, hidden, mlp / hidden),
    ),
    "qwen_image": Architecture(
        key="qwen_image",
        title="Qwen-Image",
        router_pool="text",
        text_features="Qwen2.5-VL text features",
        inputs={
            "diffusers": Inputs("img_in", "txt_in"),
            "comfy": Inputs("img_in", "txt_in"),
        },
        marker={"diffusers": "txt_norm", "comfy": "txt_norm"},
        comfy_patch=2,
        double_blocks={"diffusers": "transformer_blocks", "comfy": "transformer_blocks"},
        single_blocks={"diffusers": None, "comfy": None},
        reference_targets=_qwen_targets,
        lora_targets=(
            "img_in",
            "attn.to_q",
            "attn.to_k",
            "attn.to_v",
            "attn.to_out.0",
            "img_mod.1",
            "img_mlp.net.0.proj",
        ),
        diffusers_signal=SignalArgs(
            "encoder_hidden_states",
            None,
            "encoder_hidden_states_mask",
            ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask"),
        ),
        _comfy=_same_name,
    ),
    "flux2": Architecture(
        key="flux2",
        title="FLUX.2",
        router_pool="text",
        text_features="stacked Qwen3 / Mistral text features",
        inputs={
            "diffusers": Inputs("x_embedder", "context_embedder"),
            "comfy": Inputs("img_in", "txt_in"),
        },
        marker={"diffusers": "double_stream_modulation_img", "comfy": "double_stream_modulation_img"},
        comfy_patch=1,
        double_blocks={"diffusers": "transformer_blocks", "comfy": "double_blocks"},
        single_blocks={"diffusers": "single_transformer_blocks", "comfy": "single_blocks"},
        reference_targets=_flux2_targets,
        lora_targets=(
            "x_embedder",
            "attn.to_q",
            "attn.to_k",
            "attn.to_v",
            "attn.to_out.0",
            "ff.linear_in",
            "attn.to_qkv_mlp_proj",
        ),
        diffusers_signal=SignalArgs("encoder_hidden_states", None, None, ("hidden_states", "encoder_hidden_states")),
        _comfy=to_comfy_flux2,
    ),
}
# FLUX.2 also has single blocks, so its marker is tested before FLUX.1's.
_MARKER_ORDER: tuple[ArchKey, ...] = ("flux2", "qwen_image", "flux1")


@dataclass(frozen=True)
class Family:
    """One released model: what its transformer reads, at its real size.

    ``text_dim``/``hidden``/``blocks``: the released model's widths and ``(double, single)`` block
    counts; an adapter's own config holds the widths it was trained at (tiny test models are
    smaller), and those are what a loaded model must match. ``zero_t_reference``: reference tokens
    are modulated with t = 0 (Qwen-Image-Edit 2511), or None where the architecture has no such
    switch.
    """

    key: str
    title: str
    architecture: ArchKey
    image_channels: int  # packed latent channels into the transformer's image input
    text_dim: int
    hidden: int
    blocks: tuple[int, int]
    zero_t_reference: bool | None = None
    # The chat template the router's text is encoded in (``instruction.py``): the text-only form
    # of what the family's own text encode node uses. FLUX.1 reads T5 on the literal text.
    routing_template: str = "{}"

    @property
    def arch(self) -> Architecture:
        return ARCHITECTURES[self.architecture]


# ComfyUI's TextEncodeQwenImageEditPlus and diffusers' QwenImageEditPlusPipeline use this template, with
# "Picture 1: <|vision_start|><|image_pad|><|vision_end|>" before the instruction; the router's signal is the
# instruction alone (the image tokens of the VL encoder are not an instruction).
QWEN_EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
# FLUX.2 [klein] (Qwen3, thinking off) and FLUX.2 [dev] (Mistral Small 3), as ComfyUI and diffusers write them.
KLEIN_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
FLUX2_DEV_TEMPLATE = (
    "[SYSTEM_PROMPT]You are an AI that reasons about image descriptions. You give structured responses focusing "
    "on object relationships, object\nattribution and actions without speculation.[/SYSTEM_PROMPT][INST]{}[/INST]"
)

FAMILIES: dict[str, Family] = {
    f.key: f
    for f in (
        Family("flux.1-kontext-dev", "FLUX.1 Kontext [dev]", "flux1", 64, 4096, 3072, (19, 38)),
        Family("flux.1-dev", "FLUX.1 [dev]", "flux1", 64, 4096, 3072, (19, 38)),
        Family("flux.1-fill-dev", "FLUX.1 Fill [dev]", "flux1", 384, 4096, 3072, (19, 38)),
        Family("flux.1-canny-dev", "FLUX.1 Canny [dev]", "flux1", 128, 4096, 3072, (19, 38)),
        Family("flux.1-depth-dev", "FLUX.1 Depth [dev]", "flux1", 128, 4096, 3072, (19, 38)),
        Family(
            "qwen-image-edit-2511",
            "Qwen-Image-Edit-2511",
            "qwen_image",
            64,
            3584,
            3072,
            (60, 0),
            True,
            QWEN_EDIT_TEMPLATE,
        ),
        Family(
            "qwen-image-edit-2509",
            "Qwen-Image-Edit-2509",
            "qwen_image",
            64,
            3584,
            3072,
            (60, 0),
            False,
            QWEN_EDIT_TEMPLATE,
        ),
        Family("flux.2-klein-4b", "FLUX.2 [klein] 4B", "flux2", 128, 7680, 3072, (5, 20), None, KLEIN_TEMPLATE),
        Family("flux.2-klein-9b", "FLUX.2 [klein] 9B", "flux2", 128, 12288, 4096, (8, 24), None, KLEIN_TEMPLATE),
        Family("flux.2-dev", "FLUX.2 [dev]", "flux2", 128, 15360, 6144, (8, 48), None, FLUX2_DEV_TEMPLATE),
    )
}


def _has(model: Any, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _host(model: Any) -> Host:
    """diffusers and ComfyUI name the input Linears apart (``x_embedder``/``img_in`` for the Fluxes;
    Qwen-Image is named alike in both, and its checks do not depend on the host)."""
    return "diffusers" if _has(model, "x_embedder") else "comfy"


def architecture_of(model: Any) -> Architecture | None:
    """The architecture of a transformer (diffusers or ComfyUI's ``diffusion_model``), or None."""
    host = _host(model)
    for key in _MARKER_ORDER:
        arch = ARCHITECTURES[key]
        if _has(model, arch.marker[host]) and _has(model, arch.double_blocks[host]):
            return arch
    return None


def block_counts(model: Any, arch: Architecture | None = None) -> tuple[int, int]:
    """(double, single) blocks of a transformer of ``arch`` (default: its own), in either host's naming."""
    arch = arch or architecture_of(model)
    if arch is None:
        raise ValueError(f"{type(model).__name__} is not a FLUX.1, FLUX.2 or Qwen-Image transformer")
    host = _host(model)
    single = arch.single_blocks[host]
    return len(model.get_submodule(arch.double_blocks[host])), 0 if single is None else len(model.get_submodule(single))


def reference_layers(model: Any) -> list[str]:
    """The reference setup's MoLE layers (canonical names) for this transformer, in model order."""
    arch = architecture_of(model)
    if arch is None:
        raise ValueError(f"{type(model).__name__} is not a FLUX.1, FLUX.2 or Qwen-Image transformer")
    return arch.reference_targets(*block_counts(model, arch))


def _width(model: Any, path: str | None) -> int | None:
    if path is None:
        return None
    try:
        return model.get_submodule(path).in_features
    except AttributeError:  # no such module (or not a Linear): that check is skipped
        return None


def model_widths(model: Any, arch: Architecture) -> tuple[int | None, int | None, int | None]:
    """(image input channels, text width, pooled width) the model reads, where it has those Linears."""
    inputs = arch.inputs[_host(model)]
    return _width(model, inputs.image), _width(model, inputs.text), _width(model, inputs.pooled)


def _zero_t_reference(model: Any) -> bool | None:
    """Whether the model modulates reference tokens with t = 0: diffusers' ``zero_cond_t`` config,
    ComfyUI's ``default_ref_method`` (``index_timestep_zero``). None where neither says."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "zero_cond_t"):
        return bool(config.zero_cond_t)
    method = getattr(model, "default_ref_method", None)
    return None if method is None else method == "index_timestep_zero"


def family_of(model: Any) -> list[Family]:
    """The released families whose architecture and widths this model has (several where only an
    adapter's own record can tell them apart, none for a resized test model)."""
    arch = architecture_of(model)
    if arch is None:
        return []
    image, text, _ = model_widths(model, arch)
    zero_t = _zero_t_reference(model)
    return [
        f
        for f in FAMILIES.values()
        if f.architecture == arch.key
        and f.image_channels == image
        and f.text_dim == text
        and (zero_t is None or f.zero_t_reference is None or f.zero_t_reference == zero_t)
    ]


def _looks_like(candidates: list[str]) -> str:
    return f" (like {' or '.join(candidates)})" if candidates else ""


def check_model_fits(config: MoLEConfig, model: Any, error: type[InstructMoLEError] = InstructMoLEError) -> Family:
    """Refuse a transformer of another family, or with widths the router cannot read; return the family.

    ``model``: a diffusers transformer or ComfyUI's ``diffusion_model``.
    """
    family = FAMILIES.get(config.base_model)
    if family is None:
        raise error(
            f"the adapter was made for {config.base_model!r}, a base model this InstructMoLE does not know "
            f"(known: {', '.join(FAMILIES)}); update the pack or use an adapter made for one of those"
        )
    arch = architecture_of(model)
    if arch is None:
        raise error(
            f"this model is not one InstructMoLE knows (FLUX.1, FLUX.2 or Qwen-Image), and the adapter was made "
            f"for {family.title}; load {family.title}"
        )
    if arch.key != family.architecture:
        raise error(f"this is a {arch.title} model, but the adapter was made for {family.title}; load {family.title}")
    if config.router_pool != arch.router_pool and config.instruction_layers:
        raise error(
            f"the adapter's router adds a {config.router_pool!r} pooled vector, but {arch.title} models route from "
            f"{arch.router_pool!r}; the adapter file is inconsistent, re-export it from its trainer"
        )
    image, text, pooled = model_widths(model, arch)
    if image is not None and image != family.image_channels:
        alike = [f.title for f in FAMILIES.values() if f.architecture == arch.key and f.image_channels == image]
        raise error(
            f"the model takes {image} image input channels{_looks_like(alike)}, but the adapter was made for "
            f"{family.title} ({family.image_channels}); load {family.title} or an adapter made for this model"
        )
    zero_t = _zero_t_reference(model)
    if family.zero_t_reference is not None and zero_t is not None and zero_t != family.zero_t_reference:
        alike = [f.title for f in FAMILIES.values() if f.architecture == arch.key and f.zero_t_reference == zero_t]
        raise error(
            f"this model{_looks_like(alike)} {'modulates' if zero_t else 'does not modulate'} its reference images "
            f"with t = 0, unlike {family.title}, which the adapter was made for; load {family.title}"
        )
    if config.instruction_layers:
        alike = [f.title for f in FAMILIES.values() if f.architecture == arch.key and f.text_dim == text]
        checks = [(arch.text_features, text, config.text_dim, _looks_like(alike))]
        if config.router_pool == "clip":
            checks.append(("CLIP pooled vectors", pooled, config.router_dim, ""))
        for what, have, need, looks in checks:
            if have is not None and have != need:
                raise error(
                    f"the model reads {what} of width {have}{looks}, but the adapter's router reads width {need}; "
                    f"use an adapter made for this model (this one is for {family.title})"
                )
    return family
