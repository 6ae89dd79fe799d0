"""Load the parts of FLUX.1 Kontext [dev] that the trainer needs, from local files only.

Two layouts are supported:

- ``load_diffusers_folder``: a diffusers pipeline folder (``transformer/``, ``vae/``,
  ``text_encoder/`` = CLIP-L, ``tokenizer/``, ``text_encoder_2/`` = T5-XXL, ``tokenizer_2/``).
- ``load_comfyui_files``: the single files a ComfyUI install holds: the diffusion model in BFL
  names (``models/diffusion_models/flux1-kontext-dev.safetensors``), T5-XXL and CLIP-L in Hugging
  Face names (``models/text_encoders/t5xxl_fp16.safetensors``, ``clip_l.safetensors``) and the VAE
  in BFL/LDM names (``models/vae/ae.safetensors``). Their configs ship with this package
  (``training/model_configs/flux1-kontext-dev``); the tokenizers come from the ComfyUI checkout.

Only the parts asked for are loaded: the trainer loads the text encoders and the VAE to cache
features, frees them, then loads the transformer to train. Each part also gets a short content
fingerprint (``KontextParts.identity``) for cache keys. Every failure is a ``ModelLoadError``
with one sentence naming the file and the way out.

The BFL transformer names are converted here, driven by the config: diffusers' own converter
(``convert_flux_transformer_checkpoint_to_diffusers``) hard-codes the 3072-wide FLUX and cannot
load other sizes; the tests check that both give the same tensors for the real size. The VAE goes
through diffusers' ``convert_ldm_vae_checkpoint``. Both are then loaded strictly (every weight
present, no unknown weight, every shape as the config says) onto a model built on the meta device.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ModelLoadError

__all__ = [
    "PARTS",
    "SHIPPED_CONFIGS",
    "KontextParts",
    "bfl_to_diffusers_flux",
    "fingerprint",
    "load_comfyui_files",
    "load_diffusers_folder",
]

PathLike = str | os.PathLike

PARTS: tuple[str, ...] = ("transformer", "vae", "t5", "clip")
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "model_configs" / "flux1-kontext-dev"

# Part -> (diffusers model subfolder, tokenizer subfolder or None).
_SUBFOLDERS: dict[str, tuple[str, str | None]] = {
    "transformer": ("transformer", None),
    "vae": ("vae", None),
    "t5": ("text_encoder_2", "tokenizer_2"),
    "clip": ("text_encoder", "tokenizer"),
}
# Tokenizer folders inside a ComfyUI checkout.
_COMFY_TOKENIZERS = {"t5": "comfy/text_encoders/t5_tokenizer", "clip": "comfy/sd1_tokenizer"}
# What each part is called in messages, and where ComfyUI keeps its file.
_NAMES = {
    "transformer": ("FLUX.1 Kontext transformer", "models/diffusion_models/flux1-kontext-dev.safetensors"),
    "vae": ("FLUX VAE", "models/vae/ae.safetensors"),
    "t5": ("T5-XXL text encoder", "models/text_encoders/t5xxl_fp16.safetensors"),
    "clip": ("CLIP-L text encoder", "models/text_encoders/clip_l.safetensors"),
}
_MIB = 1 << 20
# Keys that mark a BFL-format FLUX transformer, a diffusers-format one, and the prefixes files use.
_BFL_MARK = "double_blocks.0.img_attn.qkv.weight"
_DIFFUSERS_MARK = "transformer_blocks.0.attn.to_q.weight"
_TRANSFORMER_PREFIXES = ("", "model.diffusion_model.", "diffusion_model.")
_T5_MARK = "encoder.block.0.layer.0.SelfAttention.q.weight"
_CLIP_MARK = "embeddings.token_embedding.weight"
# Extra weights a CLIP-L text file may carry that CLIPTextModel does not use: beside the text model
# (projection, logit scale; "text_projection" is an old transposed save) and inside it.
_CLIP_EXTRAS = ("text_projection.weight", "text_projection", "logit_scale")
_CLIP_INNER_EXTRAS = ("embeddings.position_ids",)
# A full T5 (encoder-decoder) file carries these besides the encoder.
_T5_EXTRA_PREFIXES = ("decoder.", "lm_head.")


@dataclass
class KontextParts:
    """The loaded parts (``None`` where not asked for) and a content fingerprint per part.

    ``identity`` maps "transformer", "vae", "t5", "clip" to 16 hex characters over the part's
    weight files (size, first and last MiB of each), its tokenizer files and its config, for every
    part whose files are there, loaded or not; equal files give equal fingerprints wherever they lie.
    """

    transformer: Any = None
    vae: Any = None
    t5: Any = None
    t5_tokenizer: Any = None
    clip: Any = None
    clip_tokenizer: Any = None
    identity: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Fingerprints


def fingerprint(paths: Sequence[PathLike], config: dict | None) -> str:
    """16 hex characters of sha256 over each file's size, first MiB and last MiB, then the config.

    Reads at most 2 MiB per file, so multi-GB weights fingerprint in milliseconds; files of up to
    2 MiB are hashed whole. Keys of ``config`` starting with "_" and ``transformers_version`` (which
    only record the library that wrote it) are left out.
    """
    h = hashlib.sha256()
    for p in paths:
        path = Path(p)
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(_MIB)
                f.seek(max(_MIB, size - _MIB))
                tail = f.read() if size > _MIB else b""
        except OSError as e:
            raise ModelLoadError(f"Cannot read {path} to fingerprint it ({e.strerror}): check that it exists.") from e
        h.update(f"{size}:{len(head)}:{len(tail)}:".encode())
        h.update(head)
        h.update(tail)
    if config is not None:
        kept = {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}
        h.update(json.dumps(kept, sort_keys=True, default=str).encode())
    else:
        h.update(b"null")
    return h.hexdigest()[:16]


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def _weight_files(folder: Path) -> list[Path]:
    files = _files(folder)
    safetensors = [p for p in files if p.name.endswith(".safetensors")]
    return safetensors or [p for p in files if p.suffix in (".bin", ".pt", ".pth")]


# --------------------------------------------------------------------------------------------
# Small helpers


def _check_parts(parts: Iterable[str]) -> tuple[str, ...]:
    parts = tuple(parts)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown model parts {unknown}; choose from {PARTS}")
    return parts


def _read_json(path: Path, what: str, way_out: str) -> dict:
    if not path.is_file():
        raise ModelLoadError(f"The {what} config {path} does not exist: {way_out}.")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"The {what} config {path} is not readable JSON ({e}): {way_out}.") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"The {what} config {path} is not a JSON object: {way_out}.")
    return data


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__).rstrip(".")


def _count(items: Sequence) -> str:
    return f"{len(items)} weight" if len(items) == 1 else f"{len(items)} weights"


def _empty_weights():
    """Parameters on the meta device, buffers (e.g. CLIP's position ids) real."""
    from accelerate import init_empty_weights

    return init_empty_weights(include_buffers=False)


def _assign_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, what: str, config: Path):
    """Load ``state`` into a meta-device ``model`` (assign), after checking names and shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise ModelLoadError(
            f"{path} lacks {len(missing)} of the {len(expected)} weights of the {what} "
            f"(first: {', '.join(missing[:3])}): it is not a complete {what} of the model the config "
            f"{config} describes; pick the right file, or pass config_folder= with the configs of this model."
        )
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise ModelLoadError(
            f"{path} holds {_count(unexpected)} the {what} does not have "
            f"(first: {', '.join(unexpected[:3])}): it is not a {what} file, pick the right one."
        )
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:
        k, got, want = wrong[0]
        raise ModelLoadError(
            f"{path} does not fit the config {config}: {_count(wrong)} of other shapes "
            f"(first: {k} is {list(got)}, the config expects {list(want)}); use the {what} of "
            f"FLUX.1 Kontext [dev], or pass config_folder= with the configs of this model."
        )
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


class _SafetensorsFile:
    """An open safetensors file: its keys, and tensors read one by one (cast to a dtype)."""

    def __init__(self, path: PathLike | None, part: str, stack: ExitStack):
        what, where = _NAMES[part]
        if path is None:
            raise ModelLoadError(
                f"No {what} file was given: pass {part}=<ComfyUI>/{where}, or leave '{part}' out of parts."
            )
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"The {what} file {self.path} does not exist: point it at <ComfyUI>/{where}.")
        from safetensors import safe_open

        try:
            self.handle = stack.enter_context(safe_open(str(self.path), framework="pt", device="cpu"))
            self.keys = list(self.handle.keys())
        except Exception as e:
            raise ModelLoadError(
                f"The {what} file {self.path} is not a safetensors file ({_first_line(e)}): "
                f"use the .safetensors release ({where})."
            ) from e
        self.what = what
        if "scaled_fp8" in self.keys or any(k.endswith((".scale_weight", ".weight_scale")) for k in self.keys):
            raise ModelLoadError(
                f"The {what} file {self.path} is a scaled-fp8 (quantised) checkpoint, which training cannot "
                f"load: use the bf16/fp16 release ({where})."
            )

    def prefix_of(self, mark: str, prefixes: Iterable[str] | None = None) -> str | None:
        """The prefix under which ``mark`` is a key (among ``prefixes``, or any), or None."""
        if prefixes is not None:
            return next((p for p in prefixes if p + mark in self.keys), None)
        found = [k[: -len(mark)] for k in self.keys if k.endswith(mark)]
        found = sorted((p for p in found if p == "" or p.endswith(".")), key=len)
        return found[0] if found else None

    def read(self, prefix: str, dtype: torch.dtype, skip: Iterable[str] = ()) -> dict[str, torch.Tensor]:
        """Every tensor under ``prefix`` (prefix removed, ``skip`` names left out), floating point
        ones cast to ``dtype``; read one by one, so peak memory is the model plus one tensor."""
        skip = set(skip)
        out = {}
        for k in self.keys:
            if k.startswith(prefix) and k[len(prefix) :] not in skip:
                t = self.handle.get_tensor(k)
                out[k[len(prefix) :]] = t.to(dtype) if t.is_floating_point() else t
        return out

    def outside(self, prefix: str, known: Callable[[str], bool]) -> None:
        """Raise if a key outside ``prefix`` is not a known extra (checked on names, before reading)."""
        unknown = [k for k in self.keys if not k.startswith(prefix) and not known(k)]
        if unknown:
            raise ModelLoadError(
                f"{self.path} holds {_count(unknown)} the {self.what} does not have "
                f"(first: {', '.join(unknown[:3])}): it is not a {self.what} file, pick the right one."
            )


# --------------------------------------------------------------------------------------------
# BFL -> diffusers FLUX transformer names

_BFL_TOP = {
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "txt_in": "context_embedder",
    "img_in": "x_embedder",
    "final_layer.linear": "proj_out",
}
_BFL_DOUBLE = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}


def _either_norm_name(norms: dict[str, str]) -> dict[str, str]:
    """The q/k RMSNorm weights under both names files use: BFL's ``.scale`` and the ``.weight``
    that ComfyUI v0.33 saves (its RMSNorm is a plain ``nn.Module`` weight now)."""
    return {**norms, **{k.removesuffix(".scale") + ".weight": v for k, v in norms.items()}}


_BFL_DOUBLE_NORMS = _either_norm_name(
    {
        "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
        "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
        "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
        "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
    }
)
_BFL_DOUBLE_QKV = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_BFL_SINGLE = {"modulation.lin": "norm.linear", "linear2": "proj_out"}
_BFL_SINGLE_NORMS = _either_norm_name(
    {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
)
_BFL_SINGLE_FUSED = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")


def _swap_scale_shift(t: torch.Tensor) -> torch.Tensor:
    shift, scale = t.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def bfl_to_diffusers_flux(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """BFL/ComfyUI FLUX transformer weights (no prefix) -> diffusers ``FluxTransformer2DModel`` names.

    The same map as diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` (fused qkv and
    ``linear1`` split, final modulation's shift/scale swapped), with the widths taken from
    ``config`` instead of the 3072 hard-coded there. ``state`` is consumed (emptied). Raises
    ``KeyError`` naming a key it does not know and ``ValueError`` for a fused weight of the wrong size.
    """
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    split = (inner, inner, inner, int(inner * 4.0))
    out: dict[str, torch.Tensor] = {}

    def fused(key: str, value: torch.Tensor, sizes: Sequence[int], names: Sequence[str], prefix: str, suffix: str):
        if value.shape[0] != sum(sizes):
            raise ValueError(f"{key} has {value.shape[0]} rows where the config gives {sum(sizes)}")
        for name, piece in zip(names, torch.split(value, list(sizes), dim=0), strict=True):
            out[f"{prefix}{name}.{suffix}"] = piece.clone()

    for key in list(state):
        value = state.pop(key)
        stem, _, suffix = key.rpartition(".")
        if key.startswith("double_blocks."):
            _, index, rest = key.split(".", 2)
            prefix = f"transformer_blocks.{index}."
            rest_stem = rest.rpartition(".")[0]
            if rest in _BFL_DOUBLE_NORMS:
                out[prefix + _BFL_DOUBLE_NORMS[rest]] = value
            elif rest_stem in _BFL_DOUBLE and suffix in ("weight", "bias"):
                out[f"{prefix}{_BFL_DOUBLE[rest_stem]}.{suffix}"] = value
            elif rest_stem in _BFL_DOUBLE_QKV and suffix in ("weight", "bias"):
                fused(key, value, (inner,) * 3, _BFL_DOUBLE_QKV[rest_stem], prefix, suffix)
            else:
                raise KeyError(key)
        elif key.startswith("single_blocks."):
            _, index, rest = key.split(".", 2)
            prefix = f"single_transformer_blocks.{index}."
            rest_stem = rest.rpartition(".")[0]
            if rest in _BFL_SINGLE_NORMS:
                out[prefix + _BFL_SINGLE_NORMS[rest]] = value
            elif rest_stem in _BFL_SINGLE and suffix in ("weight", "bias"):
                out[f"{prefix}{_BFL_SINGLE[rest_stem]}.{suffix}"] = value
            elif rest_stem == "linear1" and suffix in ("weight", "bias"):
                fused(key, value, split, _BFL_SINGLE_FUSED, prefix, suffix)
            else:
                raise KeyError(key)
        elif stem == "final_layer.adaLN_modulation.1" and suffix in ("weight", "bias"):
            out[f"norm_out.linear.{suffix}"] = _swap_scale_shift(value)
        elif stem in _BFL_TOP and suffix in ("weight", "bias"):
            out[f"{_BFL_TOP[stem]}.{suffix}"] = value
        else:
            raise KeyError(key)
    return out


# --------------------------------------------------------------------------------------------
# diffusers folder


def load_diffusers_folder(
    folder: PathLike, *, dtype: torch.dtype = torch.bfloat16, parts: Iterable[str] = PARTS
) -> KontextParts:
    """Load the asked-for parts of a local diffusers FLUX.1 Kontext [dev] pipeline folder.

    Subfolders: ``transformer``, ``vae``, ``text_encoder`` (CLIP-L) + ``tokenizer``,
    ``text_encoder_2`` (T5-XXL) + ``tokenizer_2``. Nothing is downloaded (``local_files_only``).
    """
    parts = _check_parts(parts)
    root = Path(folder)
    layout = "transformer/, vae/, text_encoder/, tokenizer/, text_encoder_2/ and tokenizer_2/"
    if not root.is_dir():
        raise ModelLoadError(
            f"The model folder {root} does not exist: point it at a diffusers FLUX.1 Kontext [dev] folder "
            f"(with {layout})."
        )
    result = KontextParts()
    for part in PARTS:
        sub, tok = _SUBFOLDERS[part]
        cfg_path, weights = root / sub / "config.json", _weight_files(root / sub)
        if cfg_path.is_file() and weights:
            config = _read_json(cfg_path, _NAMES[part][0], f"replace the {sub}/ folder")
            tok_files = _files(root / tok) if tok else []
            result.identity[part] = fingerprint([*weights, *tok_files], config)
        elif part in parts:
            raise ModelLoadError(
                f"The model folder {root} has no {sub}/ with config.json and weights: point it at a "
                f"complete diffusers FLUX.1 Kontext [dev] folder (with {layout}), or leave '{part}' out of parts."
            )

    def attempt(what: str, path: Path, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as e:
            raise ModelLoadError(
                f"Could not load the {what} from {path} ({_first_line(e)}): replace that folder with the "
                f"one of FLUX.1 Kontext [dev]."
            ) from e

    if "transformer" in parts:
        from diffusers import FluxTransformer2DModel

        result.transformer = attempt(
            _NAMES["transformer"][0],
            root / "transformer",
            lambda: FluxTransformer2DModel.from_pretrained(
                str(root), subfolder="transformer", torch_dtype=dtype, local_files_only=True
            ),
        )
    if "vae" in parts:
        from diffusers import AutoencoderKL

        result.vae = attempt(
            _NAMES["vae"][0],
            root / "vae",
            lambda: AutoencoderKL.from_pretrained(str(root), subfolder="vae", torch_dtype=dtype, local_files_only=True),
        )
    for part, cls_name in (("t5", "T5EncoderModel"), ("clip", "CLIPTextModel")):
        if part not in parts:
            continue
        import transformers

        sub, tok = _SUBFOLDERS[part]
        cls = getattr(transformers, cls_name)
        model, info = attempt(
            _NAMES[part][0],
            root / sub,
            lambda cls=cls, sub=sub: cls.from_pretrained(
                str(root / sub), dtype=dtype, local_files_only=True, output_loading_info=True
            ),
        )
        missing = sorted(info.get("missing_keys") or ())
        if missing:  # transformers only warns, and leaves them random
            raise ModelLoadError(
                f"The weights in {root / sub} lack {_count(missing)} of the {_NAMES[part][0]} (first: "
                f"{', '.join(missing[:3])}): replace that folder with the one of FLUX.1 Kontext [dev]."
            )
        tokenizer = _load_tokenizer(root / str(tok), part, model, f"replace {root / str(tok)}")
        setattr(result, part, model.eval())
        setattr(result, f"{part}_tokenizer", tokenizer)
    return result


def _load_tokenizer(folder: Path, part: str, model: Any, way_out: str) -> Any:
    """A tokenizer from a local folder, checked against the model's vocabulary; CLIP's length capped
    to the encoder's positions (ComfyUI's CLIP tokenizer says 8192)."""
    from transformers import AutoTokenizer

    what = "T5" if part == "t5" else "CLIP"
    if not folder.is_dir():
        raise ModelLoadError(f"The {what} tokenizer folder {folder} does not exist: {way_out}.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise ModelLoadError(
            f"The {what} tokenizer in {folder} could not be loaded ({_first_line(e)}): {way_out}."
        ) from e
    if len(tokenizer) > model.config.vocab_size:
        raise ModelLoadError(
            f"The {what} tokenizer in {folder} has {len(tokenizer)} tokens, more than the encoder's "
            f"{model.config.vocab_size}: {way_out} with the tokenizer of this encoder."
        )
    if part == "clip":
        positions = model.config.max_position_embeddings
        if tokenizer.model_max_length > positions:
            tokenizer.model_max_length = positions
    return tokenizer


# --------------------------------------------------------------------------------------------
# ComfyUI single files


def load_comfyui_files(
    *,
    transformer: PathLike | None = None,
    t5: PathLike | None = None,
    clip: PathLike | None = None,
    vae: PathLike | None = None,
    comfyui_path: PathLike | None = None,
    dtype: torch.dtype = torch.bfloat16,
    parts: Iterable[str] = PARTS,
    config_folder: PathLike | None = None,
) -> KontextParts:
    """Load the asked-for parts from the single files of a ComfyUI install.

    ``transformer``: BFL-format diffusion model (``model.diffusion_model.`` prefix allowed; a
    diffusers-format single file works too). ``t5`` / ``clip``: Hugging Face encoder names (CLIP may
    carry ``text_projection.weight`` and ``logit_scale``). ``vae``: BFL/LDM names. Tokenizers come
    from ``comfyui_path`` (``comfy/text_encoders/t5_tokenizer``, ``comfy/sd1_tokenizer``).
    ``config_folder``: a folder laid out like the shipped ``SHIPPED_CONFIGS`` (``transformer/``,
    ``vae/``, ``text_encoder/``, ``text_encoder_2/``, each with ``config.json``; a diffusers pipeline
    folder qualifies) for models of other sizes; default: the FLUX.1 Kontext [dev] configs.
    """
    parts = _check_parts(parts)
    configs = Path(config_folder) if config_folder is not None else SHIPPED_CONFIGS
    if config_folder is not None and not configs.is_dir():
        raise ModelLoadError(
            f"The config folder {configs} does not exist: give a folder with transformer/, vae/, "
            f"text_encoder/ and text_encoder_2/ configs, or leave config_folder unset for FLUX.1 Kontext [dev]."
        )
    files = {"transformer": transformer, "vae": vae, "t5": t5, "clip": clip}
    result = KontextParts()
    comfy = Path(comfyui_path) if comfyui_path is not None else None

    def config_of(part: str) -> tuple[Path, dict]:
        path = configs / _SUBFOLDERS[part][0] / "config.json"
        way_out = (
            f"add {_SUBFOLDERS[part][0]}/config.json to {configs}"
            if config_folder is not None
            else "reinstall the trainer (its shipped configs are incomplete)"
        )
        return path, _read_json(path, _NAMES[part][0], way_out)

    def tokenizer_folder(part: str) -> Path:
        what = "T5" if part == "t5" else "CLIP"
        if comfy is None:
            raise ModelLoadError(
                f"The {what} tokenizer comes from the ComfyUI checkout, but comfyui_path is not set: set it "
                f"to the ComfyUI folder (the one holding main.py and comfy/)."
            )
        folder = comfy / _COMFY_TOKENIZERS[part]
        if not folder.is_dir():
            raise ModelLoadError(
                f"The ComfyUI checkout {comfy} has no {_COMFY_TOKENIZERS[part]} folder (the {what} "
                f"tokenizer): set comfyui_path to the ComfyUI folder (the one holding main.py and comfy/)."
            )
        return folder

    # Fingerprints of every part whose file is there (cheap; for cache keys).
    for part, path in files.items():
        if path is None or not Path(path).is_file():
            continue
        cfg = configs / _SUBFOLDERS[part][0] / "config.json"
        config = config_of(part)[1] if cfg.is_file() else None
        extra: list[Path] = []
        if part in _COMFY_TOKENIZERS and comfy is not None:
            extra = _files(comfy / _COMFY_TOKENIZERS[part])
        result.identity[part] = fingerprint([Path(path), *extra], config)

    with ExitStack() as stack:
        if "transformer" in parts:
            result.transformer = _comfy_transformer(
                _SafetensorsFile(transformer, "transformer", stack), dtype, config_of
            )
        if "vae" in parts:
            result.vae = _comfy_vae(_SafetensorsFile(vae, "vae", stack), dtype, config_of)
        if "t5" in parts:
            f = _SafetensorsFile(t5, "t5", stack)
            folder = tokenizer_folder("t5")
            result.t5 = _comfy_t5(f, dtype, config_of)
            result.t5_tokenizer = _load_tokenizer(
                folder, "t5", result.t5, f"set comfyui_path to a ComfyUI checkout with an intact {folder.name}"
            )
        if "clip" in parts:
            f = _SafetensorsFile(clip, "clip", stack)
            folder = tokenizer_folder("clip")
            result.clip = _comfy_clip(f, dtype, config_of)
            result.clip_tokenizer = _load_tokenizer(
                folder, "clip", result.clip, f"set comfyui_path to a ComfyUI checkout with an intact {folder.name}"
            )
    return result


def _comfy_transformer(f: _SafetensorsFile, dtype: torch.dtype, config_of: Callable) -> Any:
    from diffusers import FluxTransformer2DModel

    config_path, config = config_of("transformer")
    bfl = f.prefix_of(_BFL_MARK, _TRANSFORMER_PREFIXES)
    if bfl is not None:
        raw = f.read(bfl, dtype)
        try:
            state = bfl_to_diffusers_flux(raw, config)
        except KeyError as e:
            raise ModelLoadError(
                f"{f.path} holds a weight a FLUX transformer does not have ({e.args[0]}): use the FLUX.1 "
                f"Kontext [dev] diffusion model file ({_NAMES['transformer'][1]})."
            ) from e
        except ValueError as e:
            raise ModelLoadError(
                f"{f.path} does not fit the config {config_path} ({e}): use the FLUX.1 Kontext [dev] "
                f"diffusion model, or pass config_folder= with the configs of this model."
            ) from e
    elif _DIFFUSERS_MARK in f.keys:
        state = f.read("", dtype)
    else:
        raise ModelLoadError(
            f"{f.path} is not a FLUX transformer (it has no {_BFL_MARK} weight): use the FLUX.1 Kontext "
            f"[dev] diffusion model file ({_NAMES['transformer'][1]})."
        )
    with _empty_weights():
        model = FluxTransformer2DModel.from_config(config)
    return _assign_strict(model, state, f.path, _NAMES["transformer"][0], config_path)


def _comfy_vae(f: _SafetensorsFile, dtype: torch.dtype, config_of: Callable) -> Any:
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config_path, config = config_of("vae")
    ldm = f.prefix_of("encoder.down.0.block.0.conv1.weight", ("", "first_stage_model.", "vae."))
    if ldm is not None:
        state = convert_ldm_vae_checkpoint(f.read(ldm, dtype), config)
    elif "encoder.down_blocks.0.resnets.0.conv1.weight" in f.keys:
        state = f.read("", dtype)
    else:
        raise ModelLoadError(
            f"{f.path} is not a VAE (it has no encoder.down.0.block.0.conv1.weight weight): use the FLUX "
            f"VAE file ({_NAMES['vae'][1]})."
        )
    with _empty_weights():
        model = AutoencoderKL.from_config(config)
    return _assign_strict(model, state, f.path, _NAMES["vae"][0], config_path)


def _comfy_t5(f: _SafetensorsFile, dtype: torch.dtype, config_of: Callable) -> Any:
    from transformers import T5Config, T5EncoderModel

    config_path, config = config_of("t5")
    prefix = f.prefix_of(_T5_MARK)
    if prefix is None:
        raise ModelLoadError(
            f"{f.path} is not a T5 encoder (it has no {_T5_MARK} weight): use the T5-XXL text encoder "
            f"file ({_NAMES['t5'][1]})."
        )
    f.outside(prefix, lambda k: False)
    state = {k: v for k, v in f.read(prefix, dtype).items() if not k.startswith(_T5_EXTRA_PREFIXES)}
    # The token embedding is one weight stored under either name (or both).
    tied = "shared.weight" not in state or "encoder.embed_tokens.weight" not in state
    if "shared.weight" not in state and "encoder.embed_tokens.weight" in state:
        state["shared.weight"] = state["encoder.embed_tokens.weight"]
    if "encoder.embed_tokens.weight" not in state and "shared.weight" in state:
        state["encoder.embed_tokens.weight"] = state["shared.weight"]
    if not tied:
        tied = torch.equal(state["shared.weight"], state["encoder.embed_tokens.weight"])
    with _empty_weights():
        model = T5EncoderModel(T5Config.from_dict(config))
    model = _assign_strict(model, state, f.path, _NAMES["t5"][0], config_path)
    if tied:
        model.encoder.embed_tokens.weight = model.shared.weight
    return model


def _comfy_clip(f: _SafetensorsFile, dtype: torch.dtype, config_of: Callable) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    config_path, config = config_of("clip")
    prefix = f.prefix_of(_CLIP_MARK)
    if prefix is None:
        raise ModelLoadError(
            f"{f.path} is not a CLIP text encoder (it has no text_model.{_CLIP_MARK} weight): use the CLIP-L "
            f"text encoder file ({_NAMES['clip'][1]})."
        )
    with _empty_weights():
        model = CLIPTextModel(CLIPTextConfig.from_dict(config))
    # Files say "text_model.embeddings…"; transformers 5 dropped that level from CLIPTextModel, 4 has it.
    mark = next(k for k in model.state_dict() if k.endswith(_CLIP_MARK))
    model_prefix = mark[: -len(_CLIP_MARK)]
    f.outside(prefix, lambda k: k in _CLIP_EXTRAS)
    state = {model_prefix + k: v for k, v in f.read(prefix, dtype, skip=_CLIP_INNER_EXTRAS).items()}
    return _assign_strict(model, state, f.path, _NAMES["clip"][0], config_path)
