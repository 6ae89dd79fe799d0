"""ComfyUI twins of the tiny Qwen-Image-Edit-2511 and FLUX.2 [klein], and one comparable forward on each side.

Why: the exactness claims of the pack (diffusers ``attach`` == ComfyUI auto == fixed == merged) must
hold for each family's own module tree in ComfyUI, not only for FLUX.1's. These helpers carry the
weights of ``instructmole.tiny_families``' diffusers models into ComfyUI's own model classes
(``comfy.supported_models.QwenImage`` / ``Flux2`` -> ``model_base`` -> ``comfy.ldm``), built from
the ``unet_config`` ComfyUI's detection would give, and run both sides from the same latent to the
same denoised prediction.

ComfyUI is imported inside the functions only (as in ``comfy_tiny.py``): this file must import
without ComfyUI. Call the functions after the conftest's ``comfy`` fixture has bootstrapped it.

Conventions (both families are ``ModelType.FLUX``: CONST sampling, multiplier 1, so
``timestep = sigma`` and ``denoised = x - sigma * v``; diffusers' FLUX.2 and ComfyUI both scale the
timestep by 1000 inside, diffusers' Qwen-Image and ComfyUI's both in the embedder):

* Qwen-Image: ComfyUI latents are 5-D ``[B, 16, 1, H, W]`` (Wan 2.1's latent format) and patchified
  2x2 by the model; diffusers gets the same 2x2-packed tokens ``[B, H/2 * W/2, 64]``, the target
  first, references after (``img_shapes`` one frame each), and the text mask ``[B, T]`` (1 = token).
  Reference images use ComfyUI's ``index`` method (frame index 1, 2, ...), as diffusers numbers them;
  2511's zero-timestep modulation of reference tokens is ``zero_cond_t`` in diffusers and the
  ``index_timestep_zero`` default reference method in ComfyUI. Rope positions agree for even token
  grids no larger than the target (diffusers centres odd sides one position apart from ComfyUI, and
  starts the text after the largest image).
* FLUX.2: latents ``[B, 128, H, W]`` with patch 1 (one token per latent pixel); ids (t, h, w, l):
  the target at t = 0, reference k at t = 10 k (ComfyUI's ``ref_index_scale``), text at l = 0..T-1.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from comfy.model_patcher import ModelPatcher

__all__ = [
    "comfy_flux2_from_diffusers",
    "comfy_qwen_from_diffusers",
    "family_missing",
    "flux2_state_dict",
    "flux2_unet_config",
    "qwen_reads_text_mask",
    "qwen_state_dict",
    "qwen_unet_config",
    "run_comfy_family",
    "run_diffusers_flux2",
    "run_diffusers_qwen",
    "tiny_vae",
]

QWEN_LATENT_CHANNELS = 16
FLUX2_REF_INDEX_SCALE = 10.0  # ComfyUI's detection sets ref_index_scale 10 for FLUX.2


def family_missing(key: str) -> str | None:
    """Why the installed ComfyUI cannot run a twin of family ``key`` ("qwen_image" or "flux2"), or None.

    Tells by capability, not by version: Qwen-Image-Edit-2511 needs ComfyUI's Qwen-Image model with
    the ``index_timestep_zero`` reference method (its ``default_ref_method``); FLUX.2 needs
    ``FluxParams.global_modulation``."""
    if key == "qwen_image":
        try:
            from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel
        except ImportError:
            return "this ComfyUI has no Qwen-Image model (comfy.ldm.qwen_image)"
        if "default_ref_method" not in inspect.signature(QwenImageTransformer2DModel.__init__).parameters:
            return "this ComfyUI's Qwen-Image has no reference methods (no Qwen-Image-Edit-2511 'index_timestep_zero')"
        return None
    if key == "flux2":
        from comfy.ldm.flux.model import FluxParams

        if "global_modulation" not in {f.name for f in dataclasses.fields(FluxParams)}:
            return "this ComfyUI's Flux has no FLUX.2 (FluxParams.global_modulation)"
        return None
    raise ValueError(f"unknown family {key!r}")


def _patcher(model: Any) -> ModelPatcher:
    import comfy.model_management
    import comfy.model_patcher

    model.diffusion_model.eval()
    return comfy.model_patcher.ModelPatcher(
        model,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )


def _build(config_class: str, unet_config: dict[str, Any], sd: dict[str, torch.Tensor]) -> ModelPatcher:
    """ComfyUI's model of ``config_class`` (a ``comfy.supported_models`` class) on the CPU in fp32,
    loaded strictly with ``sd`` (ComfyUI's layers are left uninitialised: every one must be set)."""
    import comfy.supported_models

    config = getattr(comfy.supported_models, config_class)(unet_config)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu"))
    model.diffusion_model.load_state_dict(_installed_norm_names(sd, model.diffusion_model), strict=True)
    return _patcher(model)


def _installed_norm_names(sd: dict[str, torch.Tensor], module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The RMSNorm gains under the name the installed ComfyUI gives them: ``.weight`` (v0.33), or
    ``.scale`` (ComfyUI's own ``RMSNorm`` in older versions, e.g. FLUX.2's q/k norms in 0.8.0)."""
    have = set(module.state_dict())
    out = {}
    for key, value in sd.items():
        scale = key.removesuffix(".weight") + ".scale"
        out[scale if key not in have and scale in have else key] = value
    return out


# ---- Qwen-Image ---------------------------------------------------------------------------------


def qwen_unet_config(transformer: Any) -> dict[str, Any]:
    """ComfyUI's ``unet_config`` for a diffusers ``QwenImageTransformer2DModel``: the constructor
    arguments are named alike; 2511's ``zero_cond_t`` is the ``index_timestep_zero`` reference method."""
    c = transformer.config
    return {
        "image_model": "qwen_image",
        "patch_size": c.patch_size,
        "in_channels": c.in_channels,
        "out_channels": c.out_channels,
        "num_layers": c.num_layers,
        "attention_head_dim": c.attention_head_dim,
        "num_attention_heads": c.num_attention_heads,
        "joint_attention_dim": c.joint_attention_dim,
        "axes_dims_rope": tuple(c.axes_dims_rope),
        "default_ref_method": "index_timestep_zero" if getattr(c, "zero_cond_t", False) else "index",
    }


def qwen_state_dict(transformer: Any, unet_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """ComfyUI's Qwen-Image keeps the diffusers names; 2511's marker buffer is added (detection reads it)."""
    sd = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    if unet_config["default_ref_method"] == "index_timestep_zero":
        sd["__index_timestep_zero__"] = torch.tensor([])
    return sd


def comfy_qwen_from_diffusers(transformer: Any) -> ModelPatcher:
    """A CPU ComfyUI Qwen-Image (``model_base.QwenImage`` in a ``ModelPatcher``) with the twin's weights."""
    unet_config = qwen_unet_config(transformer)
    return _build("QwenImage", unet_config, qwen_state_dict(transformer, unet_config))


def qwen_reads_text_mask(patcher: ModelPatcher) -> bool:
    """Whether the installed ComfyUI's Qwen-Image attends by the text attention mask it is given (0.8.0
    hands it to no attention; diffusers and v0.33 mask the padded tokens): one masked forward, tiny."""
    g = torch.Generator().manual_seed(0)
    width = patcher.model.diffusion_model.txt_in.in_features
    x, text = torch.randn(1, QWEN_LATENT_CHANNELS, 1, 4, 4, generator=g), torch.randn(1, 4, width, generator=g)
    masked = run_comfy_family(patcher, x, 0.5, text, mask=torch.tensor([[1, 1, 0, 0]]))
    return not torch.equal(masked, run_comfy_family(patcher, x, 0.5, text))


def _pack2x2(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, C*4], channel-major within each 2x2 patch (diffusers and ComfyUI)."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def _unpack2x2(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.reshape(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def _rows(value: torch.Tensor | float, batch: int) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
    return t.expand(batch).clone() if t.numel() == 1 else t


def _batched(ref: torch.Tensor, batch: int) -> torch.Tensor:
    return ref.expand(batch, *ref.shape[1:]) if ref.shape[0] == 1 else ref


@torch.no_grad()
def run_diffusers_qwen(
    transformer: Any,
    latents: torch.Tensor,
    sigma: torch.Tensor | float,
    text: torch.Tensor,
    mask: torch.Tensor | None = None,
    ref_latent: torch.Tensor | None = None,
) -> torch.Tensor:
    """The diffusers Qwen-Image forward, returned as ComfyUI's denoised prediction ``x - sigma * v``.

    ``latents``/``ref_latent``: ComfyUI's 5-D ``[B, 16, 1, H, W]``; ``mask``: ``[B, T]`` (1 = token)."""
    b, _, frames, h, w = latents.shape
    if frames != 1:
        raise ValueError("one frame per image")
    tokens = _pack2x2(latents[:, :, 0])
    shapes = [(1, h // 2, w // 2)]
    if ref_latent is not None:
        ref = _batched(ref_latent, b)[:, :, 0]
        tokens = torch.cat([tokens, _pack2x2(ref)], dim=1)
        shapes.append((1, ref.shape[-2] // 2, ref.shape[-1] // 2))
    dtype = next(transformer.parameters()).dtype
    sig = _rows(sigma, b)
    v = transformer(
        hidden_states=tokens.to(dtype),
        encoder_hidden_states=text.to(dtype),
        encoder_hidden_states_mask=None if mask is None else mask.to(dtype),
        timestep=sig.to(dtype),
        img_shapes=[shapes] * b,
        return_dict=False,
    )[0]
    v = _unpack2x2(v[:, : (h // 2) * (w // 2)].float(), h, w)[:, :, None]
    return latents - sig.reshape(b, 1, 1, 1, 1) * v


# ---- FLUX.2 -------------------------------------------------------------------------------------


def flux2_unet_config(transformer: Any) -> dict[str, Any]:
    """ComfyUI's ``unet_config`` for a diffusers ``Flux2Transformer2DModel``, as ComfyUI's detection sets
    it for FLUX.2 (global modulation, SwiGLU MLPs, no biases, 4 rope axes with the text on the last,
    reference images indexed 10 apart) with the twin's widths."""
    c = transformer.config
    if c.patch_size != 1:
        raise ValueError("expected a FLUX.2 with patch_size 1 (latents already 2x2-packed by the VAE)")
    if c.timestep_guidance_channels != 256:
        raise ValueError(
            f"ComfyUI's Flux embeds the timestep in 256 channels; this FLUX.2 uses {c.timestep_guidance_channels} "
            "(build it with timestep_guidance_channels=256)"
        )
    return {
        "image_model": "flux2",
        "in_channels": c.in_channels,
        "out_channels": c.out_channels or c.in_channels,
        "vec_in_dim": None,
        "context_in_dim": c.joint_attention_dim,
        "hidden_size": c.num_attention_heads * c.attention_head_dim,
        "mlp_ratio": float(c.mlp_ratio),
        "num_heads": c.num_attention_heads,
        "depth": c.num_layers,
        "depth_single_blocks": c.num_single_layers,
        "axes_dim": list(c.axes_dims_rope),
        "theta": c.rope_theta,
        "patch_size": 1,
        "qkv_bias": False,
        "guidance_embed": bool(c.guidance_embeds),
        "txt_ids_dims": [len(c.axes_dims_rope) - 1],
        "global_modulation": True,
        "mlp_silu_act": True,
        "ops_bias": False,
        "default_ref_method": "index",
        "ref_index_scale": FLUX2_REF_INDEX_SCALE,
    }


# diffusers FLUX.2 -> ComfyUI (BFL) names: per double block, per single block, and outside the blocks.
_FLUX2_DOUBLE = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
}
_FLUX2_FUSED_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v")}
_FLUX2_FUSED_QKV["txt_attn.qkv"] = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
_FLUX2_SINGLE = {
    "attn.to_qkv_mlp_proj": "linear1",  # q, k, v and the SwiGLU input, already fused in diffusers
    "attn.to_out": "linear2",
    "attn.norm_q": "norm.query_norm",
    "attn.norm_k": "norm.key_norm",
}
_FLUX2_GLOBAL = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "proj_out": "final_layer.linear",
}


def _swap_halves(weight: torch.Tensor) -> torch.Tensor:
    """diffusers' final norm emits (scale, shift), ComfyUI's ``LastLayer`` (shift, scale)."""
    scale, shift = weight.chunk(2, dim=0)
    return torch.cat([shift, scale], dim=0)


def flux2_state_dict(transformer: Any) -> dict[str, torch.Tensor]:
    """The diffusers FLUX.2 weights under ComfyUI's names: q/k/v fused into ``qkv`` per stream, the
    single block's fused input and output renamed, the global modulation Linears (``.linear`` ->
    ``.lin``), the final norm's halves swapped. Every diffusers key must be used exactly once."""
    sd = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        return sd.pop(name)

    for n in range(transformer.config.num_layers):
        src, dst = f"transformer_blocks.{n}", f"double_blocks.{n}"
        for fused, parts in _FLUX2_FUSED_QKV.items():
            out[f"{dst}.{fused}.weight"] = torch.cat([take(f"{src}.{p}.weight") for p in parts], dim=0)
        for a, b in _FLUX2_DOUBLE.items():
            out[f"{dst}.{b}.weight"] = take(f"{src}.{a}.weight")
    for n in range(transformer.config.num_single_layers):
        src, dst = f"single_transformer_blocks.{n}", f"single_blocks.{n}"
        for a, b in _FLUX2_SINGLE.items():
            out[f"{dst}.{b}.weight"] = take(f"{src}.{a}.weight")
    for a, b in _FLUX2_GLOBAL.items():
        if f"{a}.weight" in sd:
            out[f"{b}.weight"] = take(f"{a}.weight")
    out["final_layer.adaLN_modulation.1.weight"] = _swap_halves(take("norm_out.linear.weight"))
    if sd:
        raise KeyError(f"diffusers FLUX.2 keys with no ComfyUI name: {sorted(sd)}")
    return out


def comfy_flux2_from_diffusers(transformer: Any) -> ModelPatcher:
    """A CPU ComfyUI FLUX.2 (``model_base.Flux2`` in a ``ModelPatcher``) with the twin's weights."""
    return _build("Flux2", flux2_unet_config(transformer), flux2_state_dict(transformer))


def _flux2_ids(height: int, width: int, t: float) -> torch.Tensor:
    """(t, row, col, 0) per token of a latent of ``height`` x ``width`` (patch 1)."""
    ids = torch.zeros(height, width, 4)
    ids[..., 0] = t
    ids[..., 1] = torch.arange(height, dtype=torch.float32)[:, None]
    ids[..., 2] = torch.arange(width, dtype=torch.float32)[None, :]
    return ids.reshape(height * width, 4)


@torch.no_grad()
def run_diffusers_flux2(
    transformer: Any,
    latents: torch.Tensor,
    sigma: torch.Tensor | float,
    text: torch.Tensor,
    ref_latent: torch.Tensor | None = None,
) -> torch.Tensor:
    """The diffusers FLUX.2 forward, returned as ComfyUI's denoised prediction ``x - sigma * v``.

    ``latents``/``ref_latent``: ``[B, 128, H, W]``; tokens are the target's pixels then the reference's."""
    b, c, h, w = latents.shape
    tokens = latents.flatten(2).transpose(1, 2)
    ids = _flux2_ids(h, w, 0.0)
    if ref_latent is not None:
        ref = _batched(ref_latent, b)
        tokens = torch.cat([tokens, ref.flatten(2).transpose(1, 2)], dim=1)
        ids = torch.cat([ids, _flux2_ids(ref.shape[-2], ref.shape[-1], FLUX2_REF_INDEX_SCALE)], dim=0)
    txt_ids = torch.zeros(text.shape[1], 4)
    txt_ids[:, 3] = torch.arange(text.shape[1], dtype=torch.float32)
    dtype = next(transformer.parameters()).dtype
    sig = _rows(sigma, b)
    v = transformer(
        hidden_states=tokens.to(dtype),
        encoder_hidden_states=text.to(dtype),
        timestep=sig.to(dtype),
        img_ids=ids,
        txt_ids=txt_ids,
        return_dict=False,
    )[0]
    v = v[:, : h * w].float().transpose(1, 2).reshape(b, c, h, w)
    return latents - sig.reshape(b, 1, 1, 1) * v


# ---- ComfyUI, either family ---------------------------------------------------------------------


@torch.no_grad()
def run_comfy_family(
    patcher_or_model: Any,
    latents: torch.Tensor,
    sigma: torch.Tensor | float,
    text: torch.Tensor,
    mask: torch.Tensor | None = None,
    ref_latent: torch.Tensor | None = None,
    extra: dict[str, Any] | None = None,
) -> torch.Tensor:
    """One ``apply_model`` call (denoised prediction) on ComfyUI's Qwen-Image or FLUX.2.

    As ``comfy_tiny.run_comfy``: a ``ModelPatcher`` is loaded first and its wrappers merged into
    ``transformer_options``, and conds arrive as ``samplers._calc_cond_batch`` hands them over:
    ``c_crossattn`` (the text features), ``attention_mask`` (Qwen-Image only: ``[B, T]`` long, 1 = token;
    ComfyUI's FLUX.2 takes none), ``ref_latents`` (a list, in model space). ``extra``: further conds,
    already row-aligned (e.g. the carried routing signal)."""
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
    kwargs: dict[str, Any] = {}
    if mask is not None:
        kwargs["attention_mask"] = mask.long()
    if ref_latent is not None:
        kwargs["ref_latents"] = [_batched(ref_latent, b)]
    kwargs.update(extra or {})
    return model.apply_model(
        latents, _rows(sigma, b), c_crossattn=text, transformer_options=transformer_options, **kwargs
    )


# ---- tiny VAEs of each family, as ComfyUI's own detection reads them (the headless workflows) ---------------

QWEN_VAE_DIM = 2  # Wan 2.1's base width (96 as released); detection reads it from decoder.head.0.gamma
FLUX2_VAE_CH = 128  # the FLUX.2 AutoencoderKL's width: ComfyUI fixes the encoder's at 128 (not read from weights)
FLUX2_VAE_DECODER_CH = 32  # the decoder's, where detection reads it (v0.33): the least GroupNorm(32) allows


def _random_vae_state(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random weights that keep a signal's scale through the network: kernels ~ N(0, 1/fan_in),
    gains near 1, biases near 0, batch-norm statistics with a positive variance."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, value in module.state_dict().items():
        if not value.is_floating_point():
            out[name] = value.clone()
        elif name.endswith("running_var"):
            out[name] = 1.0 + 0.1 * torch.rand(value.shape, generator=g)
        elif name.endswith("running_mean") or name.endswith("bias"):
            out[name] = 0.02 * torch.randn(value.shape, generator=g)
        elif name.endswith("gamma") or value.ndim == 1:
            out[name] = 1.0 + 0.1 * torch.randn(value.shape, generator=g)
        else:
            out[name] = torch.randn(value.shape, generator=g) / (value[0].numel() ** 0.5)
    return out


def tiny_vae(key: str, seed: int = 0) -> Any:
    """A ``comfy.sd.VAE`` of family ``key`` ("qwen_image" or "flux2") with random tiny weights, built in
    memory from a state dict that ComfyUI's own detection reads as that family's VAE.

    * qwen_image: Wan 2.1's VAE (Qwen-Image's), 16 latent channels, 8x, base width ``QWEN_VAE_DIM``;
    * flux2: FLUX.2's AutoencoderKL (32 channels, batch-normalised in 2x2 patches: 128 latent channels,
      16x). Detection fixes the encoder's width at 128; the decoder's is read from the weights where the
      installed ComfyUI supports a narrower decoder (``decoder_ddconfig``), else 128 too."""
    import comfy.sd

    if key == "qwen_image":
        from comfy.ldm.wan.vae import WanVAE

        config = {"dim": QWEN_VAE_DIM, "z_dim": QWEN_LATENT_CHANNELS, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                  "attn_scales": [], "temperal_downsample": [False, True, True], "dropout": 0.0}  # fmt: skip
        accepted = inspect.signature(WanVAE.__init__).parameters
        module = WanVAE(**{k: v for k, v in config.items() if k in accepted})
    elif key == "flux2":
        from comfy.ldm.models import autoencoder

        ddconfig = {"double_z": True, "z_channels": 32, "resolution": 256, "in_channels": 3, "out_ch": 3,
                    "ch": FLUX2_VAE_CH, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                    "dropout": 0.0, "batch_norm_latent": True}  # fmt: skip
        narrow = "decoder_ddconfig" in inspect.getsource(autoencoder.AutoencodingEngineLegacy.__init__)
        decoder = {"decoder_ddconfig": {**ddconfig, "ch": FLUX2_VAE_DECODER_CH}} if narrow else {}
        module = autoencoder.AutoencoderKL(ddconfig=ddconfig, embed_dim=32, **decoder)
    else:
        raise ValueError(f"unknown family {key!r}")
    return comfy.sd.VAE(sd=_random_vae_state(module, seed))
