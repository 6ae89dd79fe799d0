"""Compatibility: MODELs with quantized weights, and the core TorchCompileModel node around ours.

Quantized weights. A tiny Flux is written to a .safetensors file the way quantized checkpoints are
shipped and loaded with ComfyUI's own ``comfy.sd.load_diffusion_model``:

* ``comfy_quant``: per-layer quantization metadata (``_quantization_metadata`` in the file's
  header, fp8 ``weight`` + fp32 ``weight_scale``); ComfyUI 0.8.0 builds ``mixed_precision_ops``
  layers whose weights are ``QuantizedTensor`` s (``TensorCoreFP8E4M3Layout``). Only the blocks
  are quantized (the embedders and the final layer stay fp32), as in real mixed checkpoints.
* ``scaled_fp8``: the older format (a ``scaled_fp8`` marker, fp8 ``weight`` + ``scale_weight``);
  0.8.0 converts it to the same per-layer metadata, 0.3.64 loads it with ``scaled_fp8_ops``.

Detection hard-codes some of FLUX.1's dims (24 heads, rope axes; 0.3.64 also hidden and context
widths), so those are set for the tiny model; everything else (depth, widths read from weights,
quantization, compute dtype) is ComfyUI's own.

The reference is the core's diffusers path on the *dequantized* weights (fp8 value x scale, exact
in fp32; 0.3.64 also rounds biases to fp8, which the twin then takes): on CPU ComfyUI computes in
fp32 with the weights dequantized, so auto and fixed must match it to the same 1e-4 as the
unquantized tests (test_patched_model.py). Weight patches (the plain-LoRA part, merged councils) are
requantized by ComfyUI: each stored weight must be W0 + dW within one fp8 step, and the output the
core's on the weights so stored, to 1e-4.

TorchCompileModel: ``torch.compile`` of the diffusion model as the core node sets it up (an
APPLY_MODEL wrapper that swaps in the compiled module; 0.8.0 also drops every guard on
``transformer_options``, where our wrapper lives). Inductor needs about two minutes for this tiny
model on this CPU, so the node's own ``execute`` is given an eager backend that records what dynamo
captured (``backend="eager"`` plus recording): tracing, guards, graph breaks and recompiles --
everything that could bake a council into a graph or drop our term -- are inductor's; only code
generation differs. ``INSTRUCTMOLE_SLOW_COMPILE_TESTS=1`` also runs it with inductor, and compiles a
quantized MODEL. A frame that recompiles past dynamo's limit fails the test rather than silently
running uncompiled.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import instructmole as im

from .comfy_tiny import comfy_unet_config, diffusers_to_comfy_state_dict, run_comfy, run_diffusers
from .test_patched_model import inputs, signal_kwargs

ATOL = 1e-4  # fp32 on the same (dequantized) weights, as in test_patched_model.py
FP8_MAX = 448.0  # largest float8_e4m3fn


# ---- a quantized tiny Flux, loaded by ComfyUI's loader ---------------------------------------


def has_mixed_precision_ops() -> bool:
    """ComfyUI 0.8.0's per-layer quantization (``comfy.quant_ops`` + ``mixed_precision_ops``)."""
    import comfy.ops

    try:
        import comfy.quant_ops
    except ImportError:
        return False
    return hasattr(comfy.ops, "mixed_precision_ops") and getattr(comfy.quant_ops, "_CK_AVAILABLE", True)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-tensor scaled fp8 e4m3: (stored fp8, fp32 scale, the dequantized fp32 weight)."""
    scale = (weight.abs().amax() / FP8_MAX).float()
    stored = (weight / scale).to(torch.float8_e4m3fn)
    return stored, scale, stored.float() * scale


def write_quantized(path: str, transformer: Any, fmt: str) -> dict[str, torch.Tensor]:
    """Write the twin's weights as a quantized ComfyUI checkpoint; returns the dequantized weights.

    ``comfy_quant`` quantizes the blocks' Linear weights and describes them in the header's
    ``_quantization_metadata``; ``scaled_fp8`` quantizes every Linear weight (0.3.64 casts every
    Linear of a scaled-fp8 model to fp8, so a left-out one would be rounded without a scale).
    """
    unet_config = comfy_unet_config(transformer)
    sd = diffusers_to_comfy_state_dict(transformer, unet_config)
    stored: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, str]] = {}
    for key, value in sd.items():
        layer = key.removesuffix(".weight")
        is_linear = key.endswith(".weight") and value.ndim == 2
        if is_linear and (fmt == "scaled_fp8" or key.startswith(("double_blocks.", "single_blocks."))):
            stored[key], scale, dequantized[key] = quantize(value)
            if fmt == "comfy_quant":
                stored[f"{layer}.weight_scale"] = scale
                layers[layer] = {"format": "float8_e4m3fn"}
            else:
                stored[f"{layer}.scale_weight"] = scale
                stored[f"{layer}.scale_input"] = torch.ones((), dtype=torch.float32)  # as such files carry
        else:
            stored[key] = value.contiguous()
    metadata = None
    if fmt == "comfy_quant":
        metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    else:
        stored["scaled_fp8"] = torch.tensor([], dtype=torch.float8_e4m3fn)  # the format's marker
    save_file(stored, path, metadata=metadata)
    return dequantized


def load_with_comfy(path: str, transformer: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``comfy.sd.load_diffusion_model`` with detection told the dims it hard-codes for FLUX.1.

    0.8.0 hard-codes 24 heads and the rope axes (and reads hidden and context widths from the
    file); 0.3.64 also hard-codes hidden 3072 and context 4096. The tiny model's values of these
    four are given; the rest (depth, widths read from weights, quantization, dtypes) is detected.
    """
    import comfy.model_detection
    import comfy.sd

    unet_config = comfy_unet_config(transformer)
    detect = comfy.model_detection.detect_unet_config

    def tiny_detect(state_dict, key_prefix, *args, **kwargs):
        config = detect(state_dict, key_prefix, *args, **kwargs)
        if config is not None and config.get("image_model") == "flux":
            config.update({k: unet_config[k] for k in ("num_heads", "axes_dim", "hidden_size", "context_in_dim")})
        return config

    with monkeypatch.context() as patch:
        patch.setattr(comfy.model_detection, "detect_unet_config", tiny_detect)
        return comfy.sd.load_diffusion_model(path)


def dequantized_twin(transformer: Any, dequantized: dict[str, torch.Tensor]) -> Any:
    """A copy of the diffusers twin holding the dequantized weights (ComfyUI's fused layers split back)."""
    import comfy.utils

    key_map = comfy.utils.flux_to_diffusers(comfy_unet_config(transformer), output_prefix="")
    twin = copy.deepcopy(transformer)
    sd = twin.state_dict()
    for name, target in key_map.items():
        if name not in sd:  # v0.33's map also names FLUX.2's aliases (ff.linear_in, attn.to_out, ...)
            continue
        if isinstance(target, str):
            if target in dequantized:
                sd[name] = dequantized[target]
        elif target[0] in dequantized:
            if target[1] is None:  # the final layer's scale/shift swap, its own inverse
                sd[name] = target[2](dequantized[target[0]])
            else:
                dim, start, length = target[1]
                sd[name] = dequantized[target[0]].narrow(dim, start, length)
    twin.load_state_dict(sd, strict=True)
    return twin


FORMATS = [
    pytest.param("comfy_quant", id="comfy_quant"),
    pytest.param("scaled_fp8", id="scaled_fp8"),
]


@pytest.fixture(params=FORMATS)
def quantized(request, setup, tmp_path, monkeypatch) -> dict[str, Any]:
    """A quantized ComfyUI MODEL of the setup's twin, its dequantized diffusers twin, and the format."""
    fmt = request.param
    if fmt == "comfy_quant" and not has_mixed_precision_ops():
        pytest.skip(
            "needs ComfyUI's per-layer quantization (comfy/quant_ops.py QuantizedTensor and "
            "comfy.ops.mixed_precision_ops with comfy_kitchen, ComfyUI 0.8.0); this ComfyUI has none"
        )
    path = str(tmp_path / f"tiny_{fmt}.safetensors")
    dequantized = write_quantized(path, setup["transformer"], fmt)
    model = load_with_comfy(path, setup["transformer"], monkeypatch)
    # 0.3.64's scaled_fp8_ops also store every Linear's bias in fp8, without a scale: the twin
    # takes what the loader holds there (0.8.0 keeps biases in the compute dtype: none).
    for name, param in model.model.diffusion_model.named_parameters():
        if name.endswith(".bias") and param.dtype == torch.float8_e4m3fn:
            dequantized[name] = param.float()
    return {
        "model": model,
        "twin": dequantized_twin(setup["transformer"], dequantized),
        "dequantized": dequantized,
        "format": fmt,
    }


def assert_really_quantized(model: Any, fmt: str) -> None:
    """The target layers hold fp8 data with a scale, as ComfyUI loaded them (not a float copy)."""
    lin = model.get_model_object("diffusion_model.single_blocks.0.linear2")
    if has_mixed_precision_ops():  # 0.8.0: both formats become QuantizedTensor weights
        from comfy.quant_ops import QuantizedTensor

        assert isinstance(lin.weight, QuantizedTensor), type(lin.weight)
        assert lin.weight._qdata.dtype == torch.float8_e4m3fn
        img_in = model.get_model_object("diffusion_model.img_in").weight
        assert isinstance(img_in, QuantizedTensor) == (fmt == "scaled_fp8")  # comfy_quant: mixed
    else:  # 0.3.64: scaled_fp8_ops, fp8 weights and a scale per layer
        assert lin.weight.dtype == torch.float8_e4m3fn
        assert float(lin.scale_weight) != 1.0
    assert model.model.manual_cast_dtype == torch.float32 or model.model.get_dtype() == torch.float32


def route(setup: dict[str, Any], adapter: Any, x: dict[str, torch.Tensor]) -> Any:
    """A COUNCIL node output for the second row's conditioning."""
    cond = [[x["t5"][1:2], {"pooled_output": x["pooled"][1:2]}]]
    return setup["nodes"].routing_nodes.Route.execute(adapter, conditioning=cond).result[0]


def test_quantized_model_routes_and_applies_experts_exactly(setup, quantized):
    """Auto and fixed on a quantized MODEL: the core's result on the dequantized weights, to 1e-4."""
    model, twin, nodes = quantized["model"], quantized["twin"], setup["nodes"]
    assert_really_quantized(model, quantized["format"])
    x = inputs(4, seed=21)
    base = run_comfy(model, **x)
    torch.testing.assert_close(base, run_diffusers(twin, **x), atol=ATOL, rtol=0)  # the loader is what we think

    auto, adapter = nodes.loaders.LoadAdapter.execute(model, "tiny.safetensors", 0.0, 1.0).result
    got = run_comfy(auto, **x)
    with im.attach(twin, setup["adapter"], lora_strength=0.0):
        want = run_diffusers(twin, **x)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert (got - base).abs().max() > 1e-2  # the experts really act
    council = auto.get_attachment("instructmole").last_council
    assert len({tuple(council.compact()[0][b].flatten().tolist()) for b in range(4)}) > 1  # per-row councils

    chosen = route(setup, adapter, x)
    fixed = nodes.council_nodes.ApplyCouncil.execute(auto, chosen, "fixed").result[0]
    with im.attach(twin, setup["adapter"], lora_strength=0.0, council=im.Council.from_dict(chosen.to_dict())):
        want_fixed = run_diffusers(twin, **x)
    torch.testing.assert_close(run_comfy(fixed, **x), want_fixed, atol=ATOL, rtol=0)


def fp8_storage(linear: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A quantized Linear's stored fp8 data and its scale (0.8.0: QuantizedTensor; 0.3.64: scaled_fp8_ops)."""
    weight = linear.weight
    if hasattr(weight, "_qdata"):
        return weight._qdata, weight._params.scale
    return weight, linear.scale_weight


@torch.no_grad()  # as ComfyUI patches weights (the adapter's own tensors carry grad)
def patched_weights(patcher: Any, dequantized: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Every weight-patched layer of a loaded ``patcher``: W0 + dW as ComfyUI computes it from our
    patches (on the dequantized W0, in fp32), and the weight it stored, dequantized -- after
    checking that the stored one is W0 + dW rounded to a neighbouring fp8 value of the layer's scale
    (ComfyUI rounds stochastically: at most one fp8 step, the only error a requantized patch adds)."""
    import comfy.lora

    exact, stored = {}, {}
    for key, patches in patcher.patches.items():
        name = key.removeprefix("diffusion_model.")
        data, scale = fp8_storage(patcher.get_model_object(key.removesuffix(".weight")))
        exact[name] = comfy.lora.calculate_weight(patches, dequantized[name].clone(), key).float()
        # 0.8.0 recomputes the scale (the largest value lands on 448); 0.3.64 keeps the file's scale,
        # so ComfyUI clips values that grew past fp8's largest (its limitation, not the pack's).
        want = (exact[name] / scale.float()).clamp(-FP8_MAX, FP8_MAX)
        got = data.float()
        # One fp8 e4m3 step at the value's magnitude (3 mantissa bits; subnormals below 2^-6).
        step = torch.exp2(torch.floor(torch.log2(want.abs().clamp(min=2.0**-6))) - 3)
        err = float(((got - want).abs() / step).max())
        assert err <= 1.01, f"{key}: the stored weight is {err:.2f} fp8 steps off W0 + dW"
        stored[name] = got * scale.float()
    return exact, stored


def test_quantized_model_weight_patches_are_requantized(setup, quantized):
    """Merged councils and the plain-LoRA part are weight patches: ComfyUI requantizes W0 + dW to fp8.

    Three exact checks instead of one loose one: W0 + dW from our patches is the core's term (the
    diffusers path with the dynamic term, 1e-4); ComfyUI stored it rounded by at most one fp8 step
    (``patched_weights``); and the patched MODEL computes, to 1e-4, what the core computes on the
    weights so stored (plus the routed experts where a layer is not merged).
    """
    nodes, transformer, adapter_ = setup["nodes"], setup["transformer"], setup["adapter"]
    x = inputs(2, seed=22)
    dequantized, twin = quantized["dequantized"], quantized["twin"]
    assert not [s for s in adapter_.config.layers if s.routing == "token"]  # merged: no dynamic term left

    auto, adapter = nodes.loaders.LoadAdapter.execute(quantized["model"], "tiny.safetensors", 0.0, 1.0).result
    chosen = route(setup, adapter, x)
    merged = nodes.council_nodes.ApplyCouncil.execute(auto, chosen, "merged").result[0]
    got = run_comfy(merged, **x)
    exact, stored = patched_weights(merged, dequantized)
    assert len(stored) == len(adapter_.config.instruction_layers)
    with im.attach(twin, adapter_, lora_strength=0.0, council=im.Council.from_dict(chosen.to_dict())):
        dynamic = run_diffusers(twin, **x)
    torch.testing.assert_close(
        run_diffusers(dequantized_twin(transformer, {**dequantized, **exact}), **x), dynamic, atol=ATOL, rtol=0
    )
    torch.testing.assert_close(
        got, run_diffusers(dequantized_twin(transformer, {**dequantized, **stored}), **x), atol=ATOL, rtol=0
    )
    assert (got - run_comfy(quantized["model"], **x)).abs().max() > 1e-2  # the council is in the weights

    with_lora, _ = nodes.loaders.LoadAdapter.execute(quantized["model"], "tiny.safetensors", 1.0, 1.0).result
    got = run_comfy(with_lora, **x)
    exact, stored = patched_weights(with_lora, dequantized)
    assert len(stored) == 3  # the three layers of the setup adapter's LoRA part (two in fused weights)
    with im.attach(twin, adapter_, lora_strength=1.0):
        want = run_diffusers(twin, **x)
    lora_twin = dequantized_twin(transformer, {**dequantized, **exact})
    with im.attach(lora_twin, adapter_, lora_strength=0.0):
        torch.testing.assert_close(run_diffusers(lora_twin, **x), want, atol=ATOL, rtol=0)
    stored_twin = dequantized_twin(transformer, {**dequantized, **stored})
    with im.attach(stored_twin, adapter_, lora_strength=0.0):
        torch.testing.assert_close(got, run_diffusers(stored_twin, **x), atol=ATOL, rtol=0)


# ---- TorchCompileModel in front of and behind the pack's nodes --------------------------------

COMPILE_ATOL = 1e-5  # the same fp32 ops, captured: eager gave 0.0, inductor (fused kernels) 1.4e-6


class RecordingBackend:
    """A ``torch.compile`` backend that keeps every graph dynamo captured, then runs it as captured
    (what ``backend="eager"`` does) or hands it to inductor. The graphs tell whether the expert term
    was compiled (traced into a graph) rather than left to a graph break."""

    def __init__(self, inductor: bool = False) -> None:
        self.inductor = inductor
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Any:
        self.graphs.append(gm)
        if self.inductor:
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs)
        return gm.forward

    def traced(self, fragment: str) -> bool:
        """Whether any captured op came from a file whose path contains ``fragment``."""
        return any(fragment in (n.meta.get("stack_trace") or "") for gm in self.graphs for n in gm.graph.nodes)


EXPERT_TERM = os.path.join("instructmole", "experts.py")  # council_delta: the routed term's ops


@pytest.fixture
def strict_dynamo() -> Any:
    """An empty dynamo cache, and a frame that would recompile past the limit fails instead of
    silently running uncompiled (which would make the test vacuous). The limit is raised from 8:
    the block frames get an entry per block and per configuration (each object patch's layer name
    is a constant to dynamo), and one test runs seven configurations."""
    import torch._dynamo

    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True, recompile_limit=64):
            yield
    finally:
        torch._dynamo.reset()


def compile_node(model: Any, backend: RecordingBackend) -> Any:
    """The core TorchCompileModel node's own code; its combo offers inductor/cudagraphs, but
    ``execute`` hands any backend to ``torch.compile`` (here the recording eager one)."""
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    return TorchCompileModel.execute(model, backend).result[0]


def is_compiled(model: Any) -> bool:
    """Whether the MODEL carries TorchCompileModel's APPLY_MODEL wrapper (it swaps in the compiled module)."""
    from comfy.patcher_extension import WrappersMP
    from comfy_api.torch_helpers.torch_compile import COMPILE_KEY

    return bool(model.wrappers.get(WrappersMP.APPLY_MODEL, {}).get(COMPILE_KEY))


def assert_same(compiled: Any, reference: Any, x: dict[str, torch.Tensor], **kw: Any) -> torch.Tensor:
    """The compiled MODEL's output is the uncompiled one's (COMPILE_ATOL)."""
    assert is_compiled(compiled) and not is_compiled(reference)
    got = run_comfy(compiled, **x, **kw)
    torch.testing.assert_close(got, run_comfy(reference, **x, **kw), atol=COMPILE_ATOL, rtol=0)
    return got


def compile_in_front(setup: dict[str, Any], model: Any, backend: RecordingBackend, lora: float) -> tuple:
    """MODEL -> TorchCompileModel -> InstructMoLE Load Adapter, checked against the uncompiled
    chain on two batches that route differently (nothing of the first may be baked into a graph)."""
    load_adapter = setup["nodes"].loaders.LoadAdapter.execute
    front, adapter = load_adapter(compile_node(model, backend), "tiny.safetensors", lora, 1.0).result
    plain, _ = load_adapter(model, "tiny.safetensors", lora, 1.0).result
    councils = []
    for seed in (31, 32):
        x = inputs(2, seed=seed)
        got = assert_same(front, plain, x)
        assert (got - run_comfy(model, **x)).abs().max() > 1e-2  # the adapter acts
        council, want = (m.get_attachment("instructmole").last_council.compact() for m in (front, plain))
        assert torch.equal(council[0], want[0])  # the same experts; weights to inductor's rounding
        torch.testing.assert_close(council[1], want[1], atol=COMPILE_ATOL, rtol=0)
        councils.append(council[0])
    assert not torch.equal(councils[0], councils[1])
    assert backend.traced(EXPERT_TERM), "the expert term was never compiled (always left to a graph break)"
    return front, plain, adapter, x


def compile_around_the_pack(setup: dict[str, Any], backend: RecordingBackend) -> None:
    """TorchCompileModel in front of InstructMoLE Load Adapter (then Apply Council on the compiled
    chain), behind it, and behind Apply Council fixed / merged: each output is the uncompiled one."""
    apply = setup["nodes"].council_nodes.ApplyCouncil.execute
    front, plain, adapter, x = compile_in_front(setup, setup["base"], backend, lora=1.0)
    assert_same(front, plain, x, extra=signal_kwargs(torch.randn(2, 512, 64), torch.randn(2, 32)))
    assert front.get_attachment("instructmole").last_exact is True  # the carried exact signal
    chosen = route(setup, adapter, x)
    for mode in ("fixed", "merged"):  # Apply Council on the compiled chain
        assert_same(apply(front, chosen, mode).result[0], apply(plain, chosen, mode).result[0], x)

    x = inputs(2, seed=33)
    assert_same(compile_node(plain, backend), plain, x)  # InstructMoLE Load Adapter -> TorchCompileModel
    for mode in ("fixed", "merged"):  # ... -> Apply Council -> TorchCompileModel
        applied = apply(plain, chosen, mode).result[0]
        got = assert_same(compile_node(applied, backend), applied, x)
        assert (got - run_comfy(setup["base"], **x)).abs().max() > 1e-2


def test_torch_compile_around_the_pack(setup, strict_dynamo):
    compile_around_the_pack(setup, RecordingBackend())


SLOW = pytest.mark.skipif(
    not os.environ.get("INSTRUCTMOLE_SLOW_COMPILE_TESTS"),
    reason="slow on CPU (inductor: 1-2 min, a compiled quantized MODEL: ~20 s); set INSTRUCTMOLE_SLOW_COMPILE_TESTS=1",
)


@SLOW
def test_torch_compile_around_the_pack_with_inductor(setup, strict_dynamo):
    compile_around_the_pack(setup, RecordingBackend(inductor=True))


@SLOW
def test_torch_compile_in_front_of_the_pack_on_a_quantized_model(setup, quantized, strict_dynamo):
    """Quantized weights and TorchCompileModel together (the LoRA part requantized the same way on
    both sides: ComfyUI seeds its rounding with the weight's name)."""
    compile_in_front(setup, quantized["model"], RecordingBackend(), lora=1.0)
