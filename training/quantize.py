"""The frozen base stored quantized (``model.quantize_base``): every frozen Linear's weight in fp8, int8 or
NF4, dequantised one layer at a time in the forward, under trainable terms that stay bf16/fp32.

Why: FLUX.1 Kontext's transformer is ~12 B parameters, 24 GB in bf16: more than a 24 GB card holds
with activations. Stored quantized it is ~12 GB (fp8, int8) or ~6.7 GB (NF4). It must be *every*
frozen Linear, also those that carry experts (``instructmole.attach``'s forward hooks) or a peft
LoRA (the ``base_layer`` peft wraps): the reference recipe puts a LoRA on nearly every Linear, so a
scheme that skips adapter-carrying layers (diffusers' layerwise casting, the old ``fp8_base``)
leaves most of the base in bf16.

How: each frozen ``nn.Linear`` becomes a ``QuantizedLinear`` *in place* (its class is swapped, the
object stays): it is still an ``nn.Linear`` of the same shape, so the hooks ``attach`` put on it, the
peft wrapper around it and every name in the model stay as they were, and quantizing before or after
either works. Its ``weight`` parameter is replaced by non-persistent buffers (the quantized data and
its scales): no ``state_dict``, checkpoint or adapter file can ever hold them. The forward is one
autograd function that dequantises the weight to the compute dtype (the autocast dtype, else the
weight's original dtype), applies it, and *keeps nothing of it*: the backward dequantises again for
the input's gradient. A plain ``F.linear(x, w_q.to(bf16) * s)`` (and torchao's int8 weight-only
tensor, which computes ``x @ w_int8.to(x.dtype)``) keeps the upcast weight alive until the
backward, which without gradient checkpointing would hold a full-precision copy of every layer.
The base's gradient is never computed (it is frozen); a trainable bias still gets its own.

The formats, and why these libraries (measured on this project's CPU machine, torch 2.13, and what
each library ships for CUDA):

* ``fp8``: float8 e4m3 with one fp32 scale per output row (amax / 448), in plain torch. torch casts
  to and from ``float8_e4m3fn`` on the CPU and CUDA alike, so no library is needed; torchao 0.18's
  ``Float8WeightOnlyConfig`` gave a max output error of 2.5 on the CPU on a 128→64 layer where its
  int8 gives 0.008, so it cannot serve the tests. A per-row scale keeps small weights out of e4m3's
  subnormal range, where an unscaled cast (the old ``fp8_base``) loses most of their precision.
* ``int8``: symmetric, one scale per output row (amax / 127), in plain torch: the format of torchao's
  int8 weight-only and of bitsandbytes' vector-wise quantisation. Dequantising is one cast and one
  multiply; no library kernel makes that faster, and the user installs nothing.
* ``nf4``: bitsandbytes (``quantize_4bit`` / ``dequantize_4bit``: QLoRA's 4-bit NormalFloat in blocks
  of 64 weights, one fp32 absmax per block: 4.5 bits per weight). It has CUDA kernels for speed and a
  CPU implementation (0.50) for the tests. torchao's ``NF4Tensor`` needs a weight's element count
  divisible by 64 × 256, which small layers (the tests' tiny model) are not; optimum-quanto has no
  NF4 (its 4-bit weights are affine int4). QLoRA's "double quantisation" (the block scales 8-bit
  around their mean, 4.127 bits per weight) is not used: it loses every block whose weights are much
  smaller than its neighbours' (measured: errors 58× the block's largest weight on rows spanning four
  decades, against 0.15× with fp32 scales); it would save ~0.55 GB on FLUX.

Error of the dequantised weight, element-wise: fp8 ≤ 2⁻⁴·|w| (≤ 2⁻¹⁰·scale in the subnormal range),
int8 ≤ scale / 2, NF4 ≤ ~0.15 × its block's largest |w| (about half the widest gap between NF4 levels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .optim import require

__all__ = [
    "QUANTIZE_FORMATS",
    "QuantizedLinear",
    "quantize_base",
    "quantized_buffer_names",
    "quantized_bytes",
]

QUANTIZE_FORMATS = ("none", "fp8", "int8", "nf4")
_FP8 = torch.float8_e4m3fn
_FP8_MAX = 448.0  # the largest finite float8 e4m3fn
_NF4_BLOCK = 64  # QLoRA's block size: one absmax per 64 weights
_TINY = 1e-12  # floor of a row's scale: an all-zero row quantizes to zeros, not NaNs

# The buffers each format keeps (in this order they reach the autograd function).
_BUFFERS = {
    "fp8": ("weight_data", "weight_scale"),
    "int8": ("weight_data", "weight_scale"),
    "nf4": ("weight_data", "weight_absmax"),
}


@dataclass(frozen=True)
class QuantSpec:
    """What a layer's buffers alone do not say: the format and the weight's shape."""

    format: str
    shape: tuple[int, int]  # (out_features, in_features)


# ---- the formats ------------------------------------------------------------------------------


def _quantize(weight: Tensor, fmt: str) -> tuple[QuantSpec, dict[str, Tensor]]:
    """``weight`` ``[out, in]`` as ``fmt``'s buffers (on the weight's device)."""
    shape = (weight.shape[0], weight.shape[1])
    if fmt in ("fp8", "int8"):
        w = weight.float()
        top = _FP8_MAX if fmt == "fp8" else 127.0
        scale = (w.abs().amax(dim=1, keepdim=True) / top).clamp_min(_TINY)
        if fmt == "fp8":
            data = (w / scale).clamp(-_FP8_MAX, _FP8_MAX).to(_FP8)
        else:
            data = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
        return QuantSpec(fmt, shape), {"weight_data": data, "weight_scale": scale}
    if fmt == "nf4":
        bnb = _bitsandbytes()
        data, state = bnb.functional.quantize_4bit(
            weight.contiguous(), blocksize=_NF4_BLOCK, compress_statistics=False, quant_type="nf4"
        )
        return QuantSpec(fmt, shape), {"weight_data": data, "weight_absmax": state.absmax}
    raise ValueError(f"unknown quantization format {fmt!r}; one of {QUANTIZE_FORMATS[1:]}")  # a bug: config checks it


def _dequantize(spec: QuantSpec, tensors: tuple[Tensor, ...], dtype: torch.dtype) -> Tensor:
    """The ``[out, in]`` weight in ``dtype`` from a layer's buffers (``_BUFFERS`` order)."""
    if spec.format in ("fp8", "int8"):
        data, scale = tensors
        return data.to(dtype) * scale.to(dtype)
    bnb = _bitsandbytes()
    data, absmax = tensors
    # Dequantised as one flat row, then viewed as the matrix: the blocks run over the flattened weight, and
    # bitsandbytes 0.50's CPU kernel, given the matrix shape, takes them per row (wrong values whenever
    # in_features is not a multiple of 64, as in the tests' tiny model). The same values on CUDA.
    out, inp = spec.shape
    state = bnb.functional.QuantState(
        absmax=absmax, shape=torch.Size([out * inp]), blocksize=_NF4_BLOCK, quant_type="nf4", dtype=dtype
    )
    return bnb.functional.dequantize_4bit(data, state).view(out, inp)


def _bitsandbytes() -> Any:
    return require("model.quantize_base", "nf4")


# ---- the layer --------------------------------------------------------------------------------


class _DequantizedLinear(torch.autograd.Function):
    """``y = x Wᵀ + b`` with ``W`` dequantised in the forward and again in the backward: nothing of
    ``W`` is kept between them (only the quantized buffers, which exist anyway)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, bias: Tensor | None, spec: QuantSpec, dtype: torch.dtype, *tensors: Tensor):
        ctx.spec, ctx.dtype = spec, dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(*tensors)
        weight = _dequantize(spec, tensors, dtype)
        return F.linear(x, weight, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        tensors = ctx.saved_tensors  # read once: under gradient checkpointing each read recomputes
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.to(ctx.dtype) @ _dequantize(ctx.spec, tensors, ctx.dtype)
        if ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
        return (grad_x, grad_bias, None, None, *(None for _ in tensors))


class QuantizedLinear(nn.Linear):
    """A frozen ``nn.Linear`` whose weight is stored quantized (made by ``quantize_base``, never built).

    ``weight`` reads as the dequantised weight in the original dtype, for code that looks at a Linear's
    weight (its dtype, device, shape); the forward never builds it that way."""

    quant: QuantSpec
    compute_dtype: torch.dtype  # the weight's dtype before quantization: the forward's dtype without autocast

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        return self.dequantized_weight()

    def quantized_tensors(self) -> tuple[Tensor, ...]:
        return tuple(getattr(self, name) for name in _BUFFERS[self.quant.format])

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        with torch.no_grad():
            return _dequantize(self.quant, self.quantized_tensors(), dtype or self.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        dtype = self.compute_dtype
        if torch.is_autocast_enabled(x.device.type):  # as F.linear under autocast: compute in its dtype
            dtype = torch.get_autocast_dtype(x.device.type)
        return _DequantizedLinear.apply(x.to(dtype), self.bias, self.quant, dtype, *self.quantized_tensors())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, quantized={self.quant.format}"


def _quantize_linear(linear: nn.Linear, fmt: str, device: torch.device | None) -> None:
    """Turn ``linear`` into a ``QuantizedLinear`` in place; its buffers are made on ``device`` (default:
    where its weight is), so a base loaded on the CPU is quantized on the GPU one layer at a time."""
    weight = linear.weight.detach()
    spec, buffers = _quantize(weight.to(device) if device is not None else weight, fmt)
    del linear._parameters["weight"]
    linear.__class__ = QuantizedLinear
    linear.quant, linear.compute_dtype = spec, weight.dtype
    for name, tensor in buffers.items():
        linear.register_buffer(name, tensor, persistent=False)  # never in a state_dict: no file can hold them


def quantize_base(model: nn.Module, fmt: str, device: torch.device | str | None = None) -> list[str]:
    """Store the weight of every frozen ``nn.Linear`` of ``model`` as ``fmt``; returns their names.

    Frozen means its weight does not require grad: trainable Linears (peft's ``lora_A``/``lora_B``) stay
    as they are, and Linears that carry experts or a LoRA (peft's ``base_layer``) are quantized like any
    other. ``fmt="none"`` changes nothing. Only plain ``nn.Linear`` modules are touched (a subclass may
    have a forward of its own)."""
    if fmt == "none":
        return []
    if fmt not in QUANTIZE_FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}; one of {QUANTIZE_FORMATS}")
    device = torch.device(device) if device is not None else None
    names = [
        name for name, module in model.named_modules() if type(module) is nn.Linear and not module.weight.requires_grad
    ]
    for name in names:
        _quantize_linear(model.get_submodule(name), fmt, device)
    return names


def quantized_buffer_names(model: nn.Module) -> list[str]:
    """The full names of every quantized weight buffer of ``model`` (DDP must neither broadcast nor sync them)."""
    return [
        f"{name}.{buffer}"
        for name, module in model.named_modules()
        if isinstance(module, QuantizedLinear)
        for buffer in _BUFFERS[module.quant.format]
    ]


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of the quantized weights (data and scales) of ``model``."""
    return sum(
        t.numel() * t.element_size()
        for m in model.modules()
        if isinstance(m, QuantizedLinear)
        for t in m.quantized_tensors()
    )
