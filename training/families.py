"""One training recipe per model family: what the trainer does differently for FLUX.1 Kontext,
Qwen-Image-Edit (2511, 2509) and FLUX.2 [klein] (4B, 9B), in one object each.

The trainer has one code path (cache, micro-batches, forward, routing, export); wherever a family
differs it asks its ``Recipe``:

* **parts**: what is loaded and from where. Kontext: a diffusers folder or ComfyUI's single files
  (``loading.py``, unchanged). The others: a diffusers pipeline folder (``transformer/``, ``vae/``,
  ``text_encoder/`` + ``tokenizer/``), read by ``load_family_folder``.
* **texts**: what is cached per instruction. Kontext: T5 features padded to ``adapter.text_length``
  and the CLIP-L pooled vector (``cache.encode_texts``, unchanged). The chat-LLM families encode the
  instruction inside the family's template (``instruction.templated_ids``: prefix, instruction and
  suffix tokenized apart) and keep two things: the model's conditioning and the router's signal,
  the LLM features with the instruction mask (template and padding false; ``routing.py`` reads only
  those tokens):

  - FLUX.2 [klein]: three stacked hidden states of the templated prompt, right-padded to
    ``adapter.text_length`` (its pipeline's ``max_sequence_length``; longer prompts are cut there),
    passed without a mask as its pipeline does; the router reads the same tensor with the mask.
  - Qwen-Image-Edit: the last hidden state. The conditioning is what its pipeline keeps after
    dropping the template's prefix (``prompt_template_encode_start_idx``: the system turn and
    ``<|im_start|>user\\n``), with its padding mask; the router's signal is the whole templated prompt
    with the instruction mask. Both are encoded text-only: the pipeline's Qwen2.5-VL also reads the
    reference image ("Picture 1: <|vision_start|>…"), which a text-only encoder cannot, so the
    conditioning here has no image tokens (the router's signal never has them).

* **latents**: how the VAE posterior is taken, normalised and cut into tokens. Kontext:
  ``(z − shift)·scale``, 2x2 patches packed. Qwen-Image: a one-frame video through the causal VAE,
  ``(z − latents_mean_c) / latents_std_c`` per channel, the same 2x2 packing. FLUX.2: 2x2
  patchified to 128 channels first, then its VAE's batch-norm statistics, one token per patch.
* **layout**: where target and reference tokens sit. Kontext: position ids with reference index 1
  (``kontext.token_ids``). Qwen-Image-Edit: ``img_shapes``, per row the target's and each
  reference's ``(1, h, w)`` token grid (2511 modulates the references with t = 0 from it). FLUX.2:
  4-axis ids, the target at T = 0, reference i at T = 10 + 10·i, text tokens at (0, 0, 0, l).
* **forward**: the transformer's keyword arguments (timestep σ = t / 1000 for all three; Kontext's
  guidance embedding at ``train.guidance``, none for the others).

The family comes from ``model.family`` or, without it, from the transformer in the model folder
(``instructmole.families.architecture_of`` on the model built from its config on the meta device,
no weights read); a resized test model matches no released family and takes its architecture's
trainable one (Kontext, Qwen-Image-Edit-2511, FLUX.2 [klein] 4B).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from instructmole.families import FAMILIES, Architecture, Family, architecture_of, block_counts, family_of
from instructmole.kontext import pack, token_ids
from instructmole.layers import REFERENCE_LORA_TARGETS, reference_targets

from .errors import ConfigError, ModelLoadError

__all__ = [
    "TRAINABLE",
    "ChannelNorm",
    "FamilyParts",
    "Flux2Recipe",
    "KontextRecipe",
    "QwenEditRecipe",
    "Recipe",
    "load_family_folder",
    "recipe_for",
    "recipe_of",
    "recipe_of_model",
]

# The families the trainer trains (``model.family``); the first of each architecture is the one a
# resized model (which matches no released family's widths) is trained as.
TRAINABLE: tuple[str, ...] = (
    "flux.1-kontext-dev",
    "qwen-image-edit-2511",
    "qwen-image-edit-2509",
    "flux.2-klein-4b",
    "flux.2-klein-9b",
)
_TRANSFORMER_CLASSES = {
    "flux1": "FluxTransformer2DModel",
    "qwen_image": "QwenImageTransformer2DModel",
    "flux2": "Flux2Transformer2DModel",
}
_VAE_CLASSES = {"qwen_image": "AutoencoderKLQwenImage", "flux2": "AutoencoderKLFlux2"}


# ---- latent normalisation -------------------------------------------------------------------------


@dataclass(frozen=True)
class ChannelNorm:
    """A per-channel latent normalisation ``z ↦ (patchify(z) − mean_c) / std_c``.

    ``patch``: 1 (Qwen-Image: the VAE's channels) or 2 (FLUX.2: the 2x2-patchified channels, ``c·4 +
    dy·2 + dx`` as its pipeline's ``_patchify_latents``). ``z``: one latent ``[c, h, w]``."""

    mean: Tensor
    std: Tensor
    patch: int = 1

    def __call__(self, z: Tensor) -> Tensor:
        if self.patch > 1:
            c, h, w = z.shape
            p = self.patch
            z = z.view(c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3).reshape(c * p * p, h // p, w // p)
        return (z - self.mean.view(-1, 1, 1)) / self.std.view(-1, 1, 1)


# ---- the recipes ----------------------------------------------------------------------------------


class Recipe:
    """What one family's training needs (see the module docstring). Stateless: safe to pickle into
    data-loader workers."""

    key: str = ""

    @property
    def family(self) -> Family:
        return FAMILIES[self.key]

    @property
    def arch(self) -> Architecture:
        return self.family.arch

    # -- parts
    text_parts: tuple[str, ...] = ("text",)

    def load(self, config: Any, parts: Sequence[str], dtype: torch.dtype) -> Any:
        """The asked-for parts (``"transformer"``, ``"vae"``, ``self.text_parts``); ``()``: none,
        with every part's fingerprint in ``identity``."""
        return load_family_folder(config.model.pretrained, self, parts=parts, dtype=dtype)

    def latent_norm(self, config: Any) -> Callable[[Tensor], Tensor]:
        raise NotImplementedError

    def posterior(self, vae: Any, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """The VAE posterior ``(mean, std)`` ``[b, c, h, w]`` of ``pixels [b, 3, H, W]`` in [-1, 1]."""
        dist = vae.encode(pixels).latent_dist
        return dist.mean, dist.std

    def encode_texts(self, parts: Any, instructions: Sequence[str], **kw: Any) -> None:
        """Cache every instruction's text entry (``write(text, tensors)``); Kontext's is ``cache.encode_texts``
        (called by the loop itself)."""
        raise NotImplementedError

    # -- a micro-batch
    def tokens(self, z: Tensor) -> Tensor:
        """One normalised latent ``[c, h, w]`` as the transformer's image tokens ``[n, channels]``."""
        return pack(z[None])[0]

    def conditioning(self, entries: Sequence[dict[str, Tensor]]) -> dict[str, Any]:
        """The ``MicroBatch`` text fields of one micro-batch's cached text entries."""
        raise NotImplementedError

    def layout(self, size: tuple[int, int], references: int, text_tokens: int) -> dict[str, Any]:
        """The ``MicroBatch`` position fields for a ``size`` (width, height) pixel bucket with
        ``references`` reference images and ``text_tokens`` conditioning tokens."""
        raise NotImplementedError

    def route_signal(self, entries: Sequence[dict[str, Tensor]]) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The router's ``(text, pooled, mask)`` of cached text entries (one row each)."""
        raise NotImplementedError

    def transformer_kwargs(
        self,
        *,
        hidden_states: Tensor,
        text: Tensor,
        pooled: Tensor | None,
        sigma: Tensor,
        img_ids: Tensor | None,
        txt_ids: Tensor | None,
        guidance: Tensor | None,
        text_mask: Tensor | None,
        img_shapes: list | None,
    ) -> dict[str, Any]:
        raise NotImplementedError

    # -- the adapter
    def mole_targets(self, transformer: Any) -> list[str]:
        """The reference setup's MoLE layers (``adapter.targets: [reference]``)."""
        return self.arch.reference_targets(*block_counts(transformer, self.arch))

    def text_dim(self, transformer: Any) -> int:
        return transformer.get_submodule(self.arch.inputs["diffusers"].text).in_features

    def router_dim(self, transformer: Any, given: int | None) -> int:
        """The router's width: ``adapter.router_dim`` (default: the reference's 768)."""
        return 768 if given is None else given

    def lora_targets(self, targets: Sequence[str]) -> list[str]:
        """``adapter.lora.targets`` with ``reference`` (and the untouched default, FLUX.1's list) as
        this family's reference plain-LoRA targets."""
        if list(targets) == list(REFERENCE_LORA_TARGETS):
            return list(self.arch.lora_targets)
        out: list[str] = []
        for t in targets:
            out += list(self.arch.lora_targets) if t == "reference" else [t]
        return list(dict.fromkeys(out))


class KontextRecipe(Recipe):
    """FLUX.1 Kontext [dev]: the trainer's original recipe, by its original code."""

    key = "flux.1-kontext-dev"
    text_parts = ("t5", "clip")

    def load(self, config: Any, parts: Sequence[str], dtype: torch.dtype) -> Any:
        from .loading import load_comfyui_files, load_diffusers_folder

        m = config.model
        if m.pretrained:
            return load_diffusers_folder(m.pretrained, dtype=dtype, parts=parts)
        return load_comfyui_files(
            transformer=m.diffusion_model,
            t5=m.t5,
            clip=m.clip,
            vae=m.vae,
            comfyui_path=m.comfyui_path,
            dtype=dtype,
            parts=parts,
        )

    def latent_norm(self, config: Any):
        from .loading import SHIPPED_CONFIGS
        from .recipe import LatentNorm

        folder = Path(config.model.pretrained) if config.model.pretrained else SHIPPED_CONFIGS
        vae = json.loads((folder / "vae" / "config.json").read_text())
        return LatentNorm(shift=float(vae.get("shift_factor") or 0.0), scale=float(vae["scaling_factor"]))

    def conditioning(self, entries):
        return {"text": torch.stack([e["t5"] for e in entries]), "pooled": torch.stack([e["pooled"] for e in entries])}

    def layout(self, size, references, text_tokens):
        width, height = size
        lat_hw = (height // 8, width // 8)
        return {"img_ids": token_ids(lat_hw, [lat_hw] * references), "txt_ids": torch.zeros(text_tokens, 3)}

    def route_signal(self, entries):
        return torch.stack([e["t5"] for e in entries]), torch.stack([e["pooled"] for e in entries]), None

    def transformer_kwargs(self, *, hidden_states, text, pooled, sigma, img_ids, txt_ids, guidance, **_unused):
        return {
            "hidden_states": hidden_states,
            "encoder_hidden_states": text,
            "pooled_projections": pooled,
            "timestep": sigma,
            "img_ids": img_ids,
            "txt_ids": txt_ids,
            "guidance": guidance,
            "return_dict": False,
        }

    def mole_targets(self, transformer):
        tc = transformer.config
        return reference_targets(tc.num_layers, tc.num_single_layers)

    def text_dim(self, transformer):
        return transformer.config.joint_attention_dim

    def router_dim(self, transformer, given):
        pooled = transformer.config.pooled_projection_dim
        if given is not None and given != pooled:
            raise ConfigError(
                f"adapter.router_dim={given}: a FLUX.1 router adds the CLIP pooled vector, so its width is the "
                f"model's pooled width ({pooled}); leave adapter.router_dim unset"
            )
        return pooled

    def lora_targets(self, targets):
        return list(targets) if "reference" not in targets else super().lora_targets(targets)


def _pad(rows: Sequence[Tensor], masks: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Rows ``[t_i, d]`` right-padded with zeros to the longest, and their masks ``[t_i]`` with false."""
    t = max(r.shape[0] for r in rows)
    out = rows[0].new_zeros(len(rows), t, rows[0].shape[1])
    mask = torch.zeros(len(rows), t, dtype=torch.bool)
    for i, (r, m) in enumerate(zip(rows, masks, strict=True)):
        out[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = m.bool()
    return out, mask


class _ChatRecipe(Recipe):
    """The families whose text encoder is a chat LLM read inside a template (``tiny_llm``'s encoder
    logic, which the hosts share: ``TinyChatEncoder.ids`` and ``.features``)."""

    layout_kind: str = "last"  # "last": the final hidden state; "stacked": three layers side by side

    def chat_encoder(self, parts: Any) -> Any:
        from instructmole.tiny_llm import TinyChatEncoder

        layers = parts.text_encoder.config.num_hidden_layers
        # FLUX.2 [klein]'s pipeline stacks layers 9, 18 and 27 of its 36-layer Qwen3; a smaller LLM
        # (the tiny test one) gives a third, two thirds and all of its layers.
        stacked = (9, 18, 27) if layers >= 27 else (layers // 3, 2 * layers // 3, layers)
        template = self.family.routing_template
        return TinyChatEncoder(parts.text_encoder, parts.tokenizer, template, self.layout_kind, stacked)

    def _encoded(
        self, encoder: Any, chunk: Sequence[str], pad_to: int | None
    ) -> tuple[Tensor, list[list[bool]], list[int]]:
        """Features ``[b, t, d]`` of the templated prompts, each row's instruction mask and length;
        right-padded to the longest (or ``pad_to``, where longer prompts are cut)."""
        rows = [encoder.ids(text) for text in chunk]
        if pad_to is not None:
            rows = [(ids[:pad_to], keep[:pad_to]) for ids, keep in rows]
        t = max([len(ids) for ids, _ in rows] + [pad_to or 0])
        ids = torch.full((len(rows), t), encoder.pad_id, dtype=torch.long)
        attention = torch.zeros(len(rows), t, dtype=torch.long)
        for i, (row, _) in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention[i, : len(row)] = 1
        device = next(encoder.model.parameters()).device
        features = encoder.features(ids.to(device), attention.to(device))
        return features, [keep for _, keep in rows], [len(row) for row, _ in rows]

    def route_signal(self, entries):
        key = "route" if "route" in entries[0] else "text"
        text, mask = _pad([e[key] for e in entries], [e["route_mask"] for e in entries])
        return text, None, mask


class QwenEditRecipe(_ChatRecipe):
    """Qwen-Image-Edit-2511 (and 2509): ``QwenImageEditPlusPipeline``'s inputs, text-only."""

    key = "qwen-image-edit-2511"
    layout_kind = "last"

    def __init__(self, key: str = "qwen-image-edit-2511") -> None:
        self.key = key

    def latent_norm(self, config):
        vae = json.loads((Path(config.model.pretrained) / "vae" / "config.json").read_text())
        return ChannelNorm(torch.tensor(vae["latents_mean"]), torch.tensor(vae["latents_std"]))

    def posterior(self, vae, pixels):
        dist = vae.encode(pixels[:, :, None]).latent_dist  # one frame of a video: [b, c, 1, h, w]
        return dist.mean[:, :, 0], dist.std[:, :, 0]

    def encode_texts(self, parts, instructions, *, text_length, batch_size, write, progress=lambda n: None):
        encoder = self.chat_encoder(parts)
        from instructmole.instruction import split_template

        prefix = len(encoder.tokenize(split_template(encoder.template)[0]))  # the pipeline's drop_idx
        with torch.no_grad():
            for start in range(0, len(instructions), batch_size):
                chunk = list(instructions[start : start + batch_size])
                features, keeps, lengths = self._encoded(encoder, chunk, None)
                for i, text in enumerate(chunk):
                    n = lengths[i]
                    write(
                        text,
                        {
                            "text": features[i, prefix:n].clone(),  # its own storage: the file holds both
                            "route": features[i, :n],
                            "route_mask": torch.tensor(keeps[i], dtype=torch.bool),
                        },
                    )
                progress(len(chunk))

    def conditioning(self, entries):
        texts = [e["text"] for e in entries]
        text, mask = _pad(texts, [torch.ones(t.shape[0], dtype=torch.bool) for t in texts])
        route, route_mask = self.route_signal(entries)[::2]
        return {"text": text, "pooled": None, "text_mask": mask.long(), "route_text": route, "route_mask": route_mask}

    def layout(self, size, references, text_tokens):
        width, height = size
        grid = (1, height // 16, width // 16)
        return {"img_ids": None, "txt_ids": None, "img_shapes": [grid] * (1 + references)}

    def transformer_kwargs(self, *, hidden_states, text, sigma, text_mask, img_shapes, **_unused):
        return {
            "hidden_states": hidden_states,
            "encoder_hidden_states": text,
            "encoder_hidden_states_mask": text_mask,
            "timestep": sigma,
            "img_shapes": [list(img_shapes)] * hidden_states.shape[0],
            "guidance": None,
            "return_dict": False,
        }


class Flux2Recipe(_ChatRecipe):
    """FLUX.2 [klein] 4B (and 9B): ``Flux2KleinPipeline``'s inputs."""

    key = "flux.2-klein-4b"
    layout_kind = "stacked"

    def __init__(self, key: str = "flux.2-klein-4b") -> None:
        self.key = key

    def latent_norm(self, config):
        from safetensors import safe_open

        folder = Path(config.model.pretrained) / "vae"
        vae = json.loads((folder / "config.json").read_text())
        stats = {}
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                for name in ("bn.running_mean", "bn.running_var"):
                    if name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                        stats[name] = f.get_tensor(name).float()
        if len(stats) != 2:
            raise ModelLoadError(
                f"{folder} holds no bn.running_mean and bn.running_var (FLUX.2's latent statistics): replace the "
                "vae/ folder with the FLUX.2 VAE"
            )
        eps = float(vae.get("batch_norm_eps", 1e-4))
        return ChannelNorm(stats["bn.running_mean"], torch.sqrt(stats["bn.running_var"] + eps), patch=2)

    def tokens(self, z):
        return z.flatten(1).T  # [128, h, w] -> [h·w, 128], row-major (``_pack_latents``)

    def encode_texts(self, parts, instructions, *, text_length, batch_size, write, progress=lambda n: None):
        encoder = self.chat_encoder(parts)
        with torch.no_grad():
            for start in range(0, len(instructions), batch_size):
                chunk = list(instructions[start : start + batch_size])
                features, keeps, _ = self._encoded(encoder, chunk, text_length)
                for i, text in enumerate(chunk):
                    mask = torch.zeros(features.shape[1], dtype=torch.bool)
                    mask[: len(keeps[i])] = torch.tensor(keeps[i], dtype=torch.bool)
                    write(text, {"text": features[i], "route_mask": mask})
                progress(len(chunk))

    def conditioning(self, entries):
        text = torch.stack([e["text"] for e in entries])
        mask = torch.stack([e["route_mask"].bool() for e in entries])
        return {"text": text, "pooled": None, "route_mask": mask}

    def layout(self, size, references, text_tokens):
        width, height = size
        h, w = height // 16, width // 16

        def grid(t: int) -> Tensor:
            return torch.cartesian_prod(torch.tensor([t]), torch.arange(h), torch.arange(w), torch.arange(1))

        img_ids = torch.cat([grid(0), *[grid(10 + 10 * i) for i in range(references)]])
        txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(text_tokens))
        return {"img_ids": img_ids, "txt_ids": txt_ids}

    def transformer_kwargs(self, *, hidden_states, text, sigma, img_ids, txt_ids, **_unused):
        return {
            "hidden_states": hidden_states,
            "encoder_hidden_states": text,
            "timestep": sigma,
            "img_ids": img_ids,
            "txt_ids": txt_ids,
            "guidance": None,
            "return_dict": False,
        }


def recipe_of(key: str) -> Recipe:
    """The recipe of a trainable family key (``TRAINABLE``)."""
    arch = FAMILIES[key].architecture
    if key not in TRAINABLE:
        raise ConfigError(f"the trainer does not train {FAMILIES[key].title}; trainable: {', '.join(TRAINABLE)}")
    if arch == "flux1":
        return KontextRecipe()
    return QwenEditRecipe(key) if arch == "qwen_image" else Flux2Recipe(key)


# ---- which family a config trains -----------------------------------------------------------------


def _meta_transformer(folder: Path) -> Any:
    """The transformer of a diffusers folder built from its config on the meta device (no weights)."""
    import diffusers

    from .loading import _empty_weights, _read_json

    path = folder / "transformer" / "config.json"
    config = _read_json(path, "transformer", "point model.pretrained at a diffusers pipeline folder")
    name = config.get("_class_name", "FluxTransformer2DModel")
    if name not in _TRANSFORMER_CLASSES.values():
        raise ModelLoadError(
            f"{path} describes a {name}, not a transformer the trainer knows: point model.pretrained at a FLUX.1 "
            "Kontext, Qwen-Image-Edit or FLUX.2 [klein] folder"
        )
    with _empty_weights():
        return getattr(diffusers, name).from_config(config)


def recipe_of_model(model: Any, given: str | None = None) -> Recipe:
    """The recipe for training ``model`` (a diffusers transformer, real or on the meta device):
    ``given`` (``model.family``) where it is of the model's architecture, else the model's own
    family (``families.family_of``; a resized model takes its architecture's first trainable one)."""
    arch = architecture_of(model)
    if arch is None:
        raise ConfigError(
            f"the transformer ({type(model).__name__}) is not a FLUX.1, Qwen-Image or FLUX.2 model; point "
            "model.pretrained at a FLUX.1 Kontext, Qwen-Image-Edit or FLUX.2 [klein] folder"
        )
    if given is not None:
        if FAMILIES[given].architecture != arch.key:
            raise ConfigError(
                f"model.family={given}, but the transformer is a {arch.title} model; set model.family to a "
                f"{arch.title} family or leave it unset"
            )
        return recipe_of(given)
    known = [f.key for f in family_of(model) if f.key in TRAINABLE]
    return recipe_of(known[0] if known else next(k for k in TRAINABLE if FAMILIES[k].architecture == arch.key))


@functools.lru_cache(maxsize=8)
def _folder_recipe(folder: str, given: str | None, _stamp: tuple) -> Recipe:
    return recipe_of_model(_meta_transformer(Path(folder)), given)


def _stamp(path: Path) -> tuple:
    """What tells a changed file apart (the detection is cached per folder and its transformer config)."""
    try:
        st = path.stat()
    except OSError:
        return ()
    return (st.st_size, st.st_mtime_ns)


def recipe_for(config: Any) -> Recipe:
    """The recipe of the family ``config`` trains: ``model.family``, checked against the architecture of
    the transformer in ``model.pretrained``, or that transformer's own family (``recipe_of_model`` on
    the model built from its config on the meta device: no weights are read)."""
    m = config.model
    given = getattr(m, "family", None)
    if m.pretrained:
        folder = Path(m.pretrained).resolve()
        recipe = _folder_recipe(str(folder), given, _stamp(folder / "transformer" / "config.json"))
    elif given not in (None, KontextRecipe.key):  # ComfyUI single files: FLUX.1 Kontext only (loading.py)
        raise ConfigError(
            f"model.family={given}: ComfyUI single files are read for FLUX.1 Kontext only; give model.pretrained, "
            "a diffusers folder of the model"
        )
    else:
        recipe = KontextRecipe()
    if recipe.key != KontextRecipe.key:
        _check_beyond_kontext(config, recipe.family.title)
    return recipe


def _check_beyond_kontext(config: Any, title: str) -> None:
    """What the trainer does for FLUX.1 Kontext only: refused for another family, one sentence each."""
    only = {
        "sample.items": (config.sample.items, "renders FLUX.1 Kontext edits only"),
        "train.fsdp": (config.train.fsdp, "shards FLUX.1's transformer blocks only"),
    }
    for key, (value, what) in only.items():
        if value:
            raise ConfigError(f"{key} {what}, and this run trains {title}; turn it off")


# ---- loading a family's diffusers folder ------------------------------------------------------------


@dataclass
class FamilyParts:
    """The loaded parts of a chat-LLM family (None where not asked for) and a fingerprint per part
    (``transformer``, ``vae``, ``text``: the LLM's weights, tokenizer and config), for cache keys."""

    transformer: Any = None
    vae: Any = None
    text_encoder: Any = None
    tokenizer: Any = None
    identity: dict[str, str] = field(default_factory=dict)


_FOLDERS = {"transformer": ("transformer", None), "vae": ("vae", None), "text": ("text_encoder", "tokenizer")}


def load_family_folder(
    folder: Any, recipe: Recipe, *, parts: Sequence[str] = ("transformer", "vae", "text"), dtype=torch.bfloat16
) -> FamilyParts:
    """Load the asked-for parts of a local diffusers pipeline folder of ``recipe``'s family
    (``transformer/``, ``vae/``, ``text_encoder/`` + ``tokenizer/``); nothing is downloaded. The text
    encoder's class is its config's ``architectures`` entry (Qwen2.5-VL, Qwen3, or the tiny Qwen3)."""
    import diffusers
    import transformers

    from .loading import _files, _first_line, _read_json, _weight_files, fingerprint

    root = Path(folder)
    title = recipe.family.title
    result = FamilyParts()
    for part in ("transformer", "vae", "text"):
        sub, tok = _FOLDERS[part]
        cfg, weights = root / sub / "config.json", _weight_files(root / sub)
        if cfg.is_file() and weights:
            config = _read_json(cfg, f"{title} {sub}", f"replace the {sub}/ folder")
            result.identity[part] = fingerprint([*weights, *(_files(root / tok) if tok else [])], config)
        elif part in parts:
            raise ModelLoadError(
                f"The model folder {root} has no {sub}/ with config.json and weights: point model.pretrained at a "
                f"complete diffusers {title} folder (transformer/, vae/, text_encoder/, tokenizer/)"
            )
    result.identity["family"] = recipe.key

    def attempt(what: str, path: Path, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as e:
            raise ModelLoadError(
                f"Could not load the {what} from {path} ({_first_line(e)}): replace that folder with the one of {title}"
            ) from e

    arch = recipe.arch.key
    if "transformer" in parts:
        cls = getattr(diffusers, _TRANSFORMER_CLASSES[arch])
        result.transformer = attempt(
            "transformer",
            root / "transformer",
            lambda: cls.from_pretrained(str(root), subfolder="transformer", torch_dtype=dtype, local_files_only=True),
        )
    if "vae" in parts:
        cls = getattr(diffusers, _VAE_CLASSES[arch])
        result.vae = attempt(
            "VAE",
            root / "vae",
            lambda: cls.from_pretrained(str(root), subfolder="vae", torch_dtype=dtype, local_files_only=True),
        )
    if "text" in parts:
        config = _read_json(root / "text_encoder" / "config.json", f"{title} text encoder", "replace text_encoder/")
        name = (config.get("architectures") or ["AutoModel"])[0]
        cls = getattr(transformers, name, transformers.AutoModel)
        result.text_encoder = attempt(
            "text encoder",
            root / "text_encoder",
            lambda: cls.from_pretrained(str(root / "text_encoder"), dtype=dtype, local_files_only=True),
        ).eval()
        result.tokenizer = attempt(
            "tokenizer",
            root / "tokenizer",
            lambda: transformers.AutoTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True),
        )
        if result.tokenizer.pad_token_id is None:
            raise ModelLoadError(
                f"The tokenizer in {root / 'tokenizer'} has no padding token: replace that folder with the one of "
                f"{title}"
            )
    return result
