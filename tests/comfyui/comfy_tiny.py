"""A ComfyUI twin of the tiny diffusers Flux, and one comparable forward on each side.

Why: the pack's exactness claims (dynamic MoLE == merged == reference) are checked on the tiny
diffusers model; these helpers carry the same weights into ComfyUI's own Flux so the same checks can
run through ComfyUI's real forward path (``BaseModel.apply_model`` -> DIFFUSION_MODEL wrappers ->
``comfy.ldm.flux.model.Flux``) with object/weight patches applied by a real ``ModelPatcher``.

ComfyUI modules are imported inside the functions: this file must import without ComfyUI so that
the tests using it are skipped (not errored) when COMFYUI_PATH is unset. Call them only after the
conftest's ``comfy`` fixture has bootstrapped ComfyUI.

Level of comparison: ``apply_model`` returns the *denoised* prediction. For Flux the model sampling
is ``CONST`` (``calculate_input(sigma, x) = x``; ``timestep(sigma) = sigma``) and
``calculate_denoised(sigma, v, x) = x - sigma * v``, where ``v`` is the raw transformer output. The
diffusers transformer returns ``v`` for ``timestep = sigma`` (both sides scale timestep and guidance
by 1000 inside their embedders), so ``run_diffusers`` applies the same ``x - sigma * v`` and both
helpers return the denoised latent ``[B, 16, H, W]``.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from comfy.model_base import Flux as ComfyFluxModel
    from comfy.model_patcher import ModelPatcher

__all__ = [
    "comfy_flux_from_diffusers",
    "comfy_unet_config",
    "diffusers_to_comfy_state_dict",
    "pack_latents",
    "run_comfy",
    "run_diffusers",
    "unpack_latents",
    "with_installed_flux_fields",
]

LATENT_CHANNELS = 16  # Flux VAE latent channels; the diffusers twin sees 16 * 2 * 2 = 64 per token.


def comfy_unet_config(transformer: Any) -> dict[str, Any]:
    """ComfyUI's Flux ``unet_config`` for a diffusers ``FluxTransformer2DModel`` (patch_size 1, 64 in).

    diffusers packs 2x2 latent patches before ``x_embedder`` (in_channels 64, patch_size 1); ComfyUI
    patchifies itself (in_channels 16, patch_size 2). mlp_ratio 4 and theta 10000 are hard-coded in
    diffusers' Flux blocks and rope.

    ``txt_ids_dims`` (the rope axes text ids fill; a required ``FluxParams`` field in newer ComfyUI,
    e.g. 0.8.0) is ``[]`` for FLUX.1, as ComfyUI's detection sets it. It is given only when the
    installed ComfyUI's ``FluxParams`` has the field (``_flux_param_names``): older ComfyUI (0.3.64)
    builds ``FluxParams(**unet_config)`` and rejects unknown keys (``with_installed_flux_fields``).
    """
    c = transformer.config
    if c.patch_size != 1 or c.in_channels % 4:
        raise ValueError("expected a Flux with patch_size 1 and 2x2-packed input channels (64 Kontext, 384 Fill)")
    out_channels = c.out_channels or c.in_channels
    config = {
        "image_model": "flux",
        "in_channels": c.in_channels // 4,
        "out_channels": out_channels // 4,
        "vec_in_dim": c.pooled_projection_dim,
        "context_in_dim": c.joint_attention_dim,
        "hidden_size": c.num_attention_heads * c.attention_head_dim,
        "mlp_ratio": 4.0,
        "num_heads": c.num_attention_heads,
        "depth": c.num_layers,
        "depth_single_blocks": c.num_single_layers,
        "axes_dim": list(c.axes_dims_rope),
        "theta": 10000,
        "patch_size": 2,
        "qkv_bias": True,
        "guidance_embed": bool(c.guidance_embeds),
    }
    return with_installed_flux_fields(config)


def diffusers_to_comfy_state_dict(transformer: Any, unet_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Map diffusers Flux weights onto ComfyUI (BFL) names with ComfyUI's own ``flux_to_diffusers``.

    The map's values are a ComfyUI key, ``(key, (dim, start, length))`` -- a slice of a fused
    qkv/linear1 weight -- or ``(key, None, fn)`` -- the whole weight passed through ``fn`` (the
    scale/shift swap of the final modulation). Slices are assembled into zero-initialised fused
    tensors whose full size is known only after every slice has been seen.
    """
    import comfy.utils

    key_map = comfy.utils.flux_to_diffusers(unet_config, output_prefix="")
    out: dict[str, torch.Tensor] = {}
    slices: dict[str, list[tuple[int, int, int, torch.Tensor]]] = {}
    unmapped = []
    for name, value in transformer.state_dict().items():
        target = key_map.get(name)
        if target is None:
            unmapped.append(name)
        elif isinstance(target, str):
            out[target] = value.detach().clone()
        elif target[1] is None:
            out[target[0]] = target[2](value.detach().clone())
        else:
            dim, start, length = target[1]
            if value.shape[dim] != length:
                raise ValueError(f"{name}: slice length {length} != {value.shape[dim]}")
            slices.setdefault(target[0], []).append((dim, start, length, value.detach()))
    if unmapped:
        raise KeyError(f"diffusers keys with no ComfyUI name: {unmapped}")
    for key, parts in slices.items():
        dim = parts[0][0]
        size = max(start + length for _, start, length, _ in parts)
        shape = list(parts[0][3].shape)
        shape[dim] = size
        fused = torch.zeros(shape, dtype=parts[0][3].dtype)
        covered = 0
        for _, start, length, value in parts:
            fused.narrow(dim, start, length).copy_(value)
            covered += length
        if covered != size:
            raise ValueError(f"{key}: slices cover {covered} of {size} rows")
        out[key] = fused
    return out


def comfy_flux_from_diffusers(
    transformer: Any, weight_dtype: torch.dtype = torch.float32, model_config: str = "Flux"
) -> ModelPatcher:
    """A CPU ComfyUI Flux (``model_base.Flux`` in a ``ModelPatcher``) with the twin's weights.

    ``weight_dtype`` other than fp32 (e.g. ``torch.float8_e4m3fn``) stores the weights in that format
    with fp32 compute, as ComfyUI's fp8 weight option does (manual-cast operations).

    Built through ``comfy.supported_models.Flux(unet_config).get_model`` rather than the bare
    ``comfy.ldm.flux.model.Flux`` because that is what ``UNETLoader`` produces after detection: the
    model config brings the latent format (``process_latent_in`` for Kontext references, 16-channel
    empty-latent fix), the Flux model sampling (shift 1.15, CONST), ``extra_conds`` and the memory
    estimates that ``comfy.sample`` / KSampler rely on. Detection itself cannot be used: it
    hard-codes hidden 3072, 24 heads and context 4096.
    """
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    unet_config = comfy_unet_config(transformer)
    config = getattr(comfy.supported_models, model_config)(unet_config)  # "FluxInpaint" for FLUX.1 Fill
    manual_cast = None if weight_dtype == torch.float32 else torch.float32
    config.set_inference_dtype(weight_dtype, manual_cast)
    model = config.get_model({}, device=torch.device("cpu"))
    sd = diffusers_to_comfy_state_dict(transformer, unet_config)
    # disable_weight_init leaves parameters uninitialised: strict loading guarantees all are set.
    model.diffusion_model.load_state_dict(sd, strict=True)
    model.diffusion_model.eval()
    return comfy.model_patcher.ModelPatcher(
        model,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, C*4]: the 2x2 packing both diffusers and ComfyUI use."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of ``pack_latents`` for a latent of ``height`` x ``width``."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.reshape(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def _image_ids(height: int, width: int, index: int) -> torch.Tensor:
    """Rope ids (index, row, col) per packed token, as ComfyUI's ``Flux.process_img``."""
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(h, dtype=torch.float32)[:, None]
    ids[..., 2] = torch.arange(w, dtype=torch.float32)[None, :]
    return ids.reshape(h * w, 3)


def _rows(value: torch.Tensor | float, batch: int) -> torch.Tensor:
    """A per-row float tensor [B] from a scalar or a tensor of 1 or B values."""
    t = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
    return t.expand(batch).clone() if t.numel() == 1 else t


def _batched(ref: torch.Tensor, batch: int) -> torch.Tensor:
    return ref.expand(batch, -1, -1, -1) if ref.shape[0] == 1 else ref


@torch.no_grad()
def run_comfy(
    patcher_or_model: ModelPatcher | ComfyFluxModel,
    latents: torch.Tensor,
    sigma: torch.Tensor | float,
    t5: torch.Tensor,
    pooled: torch.Tensor,
    guidance: torch.Tensor | float,
    ref_latent: torch.Tensor | None = None,
    extra: dict[str, Any] | None = None,
) -> torch.Tensor:
    """One ``apply_model`` call (denoised prediction) on ComfyUI's Flux, Kontext reference optional.

    Given a ``ModelPatcher``, it is loaded first (object patches, weight patches and injections
    applied, as ``comfy.sample`` does) and its wrappers/callbacks are merged into
    ``transformer_options`` like ``sampler_helpers.prepare_model_patcher``, so DIFFUSION_MODEL and
    APPLY_MODEL wrappers run. Extra conds are passed as ``apply_model`` kwargs exactly as
    ``samplers._calc_cond_batch`` does after ``cond_cat``: ``c_crossattn`` (T5), ``y`` (pooled),
    ``guidance`` [B] and ``ref_latents`` (a list of [B, 16, h, w]). The reference is given in model
    space: in sampling, ``model_base.Flux.extra_conds`` applies ``process_latent_in`` first.
    ``extra``: further conds, already row-aligned, as ``model_conds`` arrive after ``cond_cat``.
    """
    import comfy.model_management
    import comfy.model_patcher

    b = latents.shape[0]
    transformer_options: dict[str, Any] = {}
    if isinstance(patcher_or_model, comfy.model_patcher.ModelPatcher):
        comfy.model_management.load_models_gpu([patcher_or_model])
        transformer_options = copy.deepcopy(patcher_or_model.model_options.get("transformer_options", {}))
        transformer_options.setdefault("wrappers", {}).update(patcher_or_model.wrappers)
        transformer_options.setdefault("callbacks", {}).update(patcher_or_model.callbacks)
        model = patcher_or_model.model
    else:
        model = patcher_or_model
    transformer_options.setdefault("cond_or_uncond", [0])
    transformer_options.setdefault("sigmas", _rows(sigma, b))
    kwargs: dict[str, Any] = {"y": pooled, "guidance": _rows(guidance, b)}
    if ref_latent is not None:
        kwargs["ref_latents"] = [_batched(ref_latent, b)]
    kwargs.update(extra or {})
    return model.apply_model(
        latents, _rows(sigma, b), c_crossattn=t5, transformer_options=transformer_options, **kwargs
    )


@torch.no_grad()
def run_diffusers(
    transformer: Any,
    latents: torch.Tensor,
    sigma: torch.Tensor | float,
    t5: torch.Tensor,
    pooled: torch.Tensor,
    guidance: torch.Tensor | float,
    ref_latent: torch.Tensor | None = None,
) -> torch.Tensor:
    """The diffusers twin's forward, returned as ComfyUI's denoised prediction ``x - sigma * v``.

    Tokens are the packed target followed by the packed reference (Kontext); img_ids are
    (0, row, col) for the target and (1, row, col) for the reference (ComfyUI's default "offset"
    reference method for one reference), txt_ids are zero; the reference tokens are cropped off
    the output like ComfyUI does.
    """
    b, _, h, w = latents.shape
    tokens = pack_latents(latents)
    ids = _image_ids(h, w, 0)
    if ref_latent is not None:
        ref = _batched(ref_latent, b)
        tokens = torch.cat([tokens, pack_latents(ref)], dim=1)
        ids = torch.cat([ids, _image_ids(ref.shape[-2], ref.shape[-1], 1)], dim=0)
    dtype = next(transformer.parameters()).dtype
    sig = _rows(sigma, b)
    v = transformer(
        hidden_states=tokens.to(dtype),
        encoder_hidden_states=t5.to(dtype),
        pooled_projections=pooled.to(dtype),
        timestep=sig.to(dtype),
        img_ids=ids.to(dtype),
        txt_ids=torch.zeros(t5.shape[1], 3, dtype=dtype),
        guidance=_rows(guidance, b).to(dtype),
        return_dict=False,
    )[0]
    v = unpack_latents(v[:, : (h // 2) * (w // 2)].float(), h, w)
    return latents - sig.reshape(b, 1, 1, 1) * v


def with_installed_flux_fields(unet_config: dict) -> dict:
    """A hand-made FLUX.1 ``unet_config`` completed for the installed ComfyUI's ``FluxParams``.

    Newer ComfyUI (0.8.0) requires ``txt_ids_dims`` (``[]`` for FLUX.1, as its detection sets it);
    older ComfyUI (0.3.64) builds ``FluxParams(**unet_config)`` and rejects the unknown key. The
    dataclass itself says which it is, not a version string. Call after ComfyUI is imported (the
    test pack loads this file by path, so it imports nothing else of this folder).
    """
    import dataclasses

    from comfy.ldm.flux.model import FluxParams

    names = {f.name for f in dataclasses.fields(FluxParams)}
    return {**unet_config, "txt_ids_dims": []} if "txt_ids_dims" in names else dict(unet_config)
