"""The quantized frozen base (``model.quantize_base``): every frozen Linear (also those under experts or a
peft LoRA) stored as fp8, int8 or NF4 and dequantised per layer; the forward equals the base's with the
dequantised weights, the dequantised weights are within each format's error, gradients reach every
trainable term, nothing of the base reaches a file, and a short run trains, resumes exactly and exports
an adapter the core loads."""

from __future__ import annotations

import copy
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import instructmole as im
from instructmole import InstructMoLE
from instructmole.tiny import kontext_inputs, tiny_flux
from tests.training.conftest import TINY_CONFIG, run_overrides
from training.config import load_config, resume_conflicts
from training.errors import ConfigError
from training.loop import train
from training.modules import TrainingModel, build_mole_config, setup_transformer
from training.quantize import QuantizedLinear, quantize_base, quantized_buffer_names, quantized_bytes

FORMATS = ("fp8", "int8", "nf4")
# The tiny transformer's output error (relative Frobenius norm) measured with each format: fp8 0.037,
# int8 0.0053, nf4 0.12; the bounds leave room for another random draw.
MODEL_ERROR = {"fp8": 0.08, "int8": 0.015, "nf4": 0.25}


def frozen_linear(out_features: int, in_features: int, seed: int = 0, bias: bool = True) -> nn.Linear:
    """A frozen Linear whose rows span four orders of magnitude (per-row scales must handle them)."""
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias).requires_grad_(False)
    with torch.no_grad():
        row_scale = 10 ** (torch.rand(out_features, 1, generator=g) * 4 - 3)
        layer.weight.copy_(torch.randn(out_features, in_features, generator=g) * row_scale)
    return layer


def quantized(layer: nn.Linear, fmt: str) -> nn.Linear:
    layer = copy.deepcopy(layer)
    assert quantize_base(nn.Sequential(layer), fmt) == ["0"]
    return layer


# ---- the formats ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantised_weights_are_within_the_formats_error(fmt):
    layer = frozen_linear(96, 80)  # 7680 weights: 120 NF4 blocks
    w = layer.weight.detach().clone()
    q = quantized(layer, fmt)
    error = (q.dequantized_weight() - w).abs()
    row_max = w.abs().amax(dim=1, keepdim=True)
    if fmt == "fp8":  # 3 mantissa bits: half a step is 2^-4 of the value; subnormals: 2^-10 of the row's scale
        bound = 2**-4 * w.abs() + 2**-10 * row_max / 448
    elif fmt == "int8":
        bound = row_max / 127 / 2
    else:  # NF4: half the widest gap between levels (0.277 / 2) of the block's absmax; bitsandbytes' decision
        # thresholds are not exactly the midpoints (measured up to 0.151)
        block_max = w.flatten().view(-1, 64).abs().amax(dim=1, keepdim=True).expand(-1, 64).reshape(w.shape)
        bound = 0.16 * block_max
    assert (error <= bound * (1 + 1e-5) + 1e-12).all(), float((error / bound).max())
    assert error.max() > 0  # it is quantized


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_layer_keeps_only_quantized_buffers_and_reads_as_a_linear(fmt):
    layer = frozen_linear(64, 32)
    q = quantized(layer, fmt)
    assert isinstance(q, QuantizedLinear) and isinstance(q, nn.Linear)
    assert (q.in_features, q.out_features) == (32, 64) and fmt in repr(q)
    assert [n for n, _ in q.named_parameters()] == ["bias"]  # the weight is no parameter any more
    assert list(q.state_dict()) == ["bias"]  # non-persistent buffers: no state_dict or file holds them
    assert q.weight.shape == (64, 32) and q.weight.dtype == torch.float32  # reads as the dequantised weight
    full = 64 * 32 * 4
    assert quantized_bytes(q) < full * (0.3 if fmt != "nf4" else 0.2)
    assert {"0.weight_data"} <= set(quantized_buffer_names(nn.Sequential(q)))


@pytest.mark.parametrize("fmt", FORMATS)
def test_forward_and_input_gradient_are_the_linear_with_the_dequantised_weight(fmt):
    layer = frozen_linear(48, 64)
    q = quantized(layer, fmt)
    plain = copy.deepcopy(layer)
    with torch.no_grad():
        plain.weight.copy_(q.dequantized_weight())
    x = torch.randn(3, 5, 64)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = q(a), plain(b)
    torch.testing.assert_close(ya, yb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(a.grad, b.grad)


def test_a_trainable_bias_gets_its_gradient():
    layer = frozen_linear(16, 8)
    q = quantized(layer, "int8")
    q.bias.requires_grad_(True)
    x = torch.randn(4, 3, 8)
    q(x).sum().backward()
    torch.testing.assert_close(q.bias.grad, torch.full((16,), 12.0))


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_forward_keeps_no_dequantised_weight_for_the_backward(fmt):
    """What autograd keeps between forward and backward: the input and the quantized buffers, never a
    full-precision weight (a plain ``x @ w_q.to(dtype)`` would keep one per layer until the backward)."""
    q = quantized(frozen_linear(256, 128), fmt)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    x = torch.randn(4, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = q(x)
    weights = [t for t in saved if t.dtype in (torch.float32, torch.bfloat16, torch.float16) and t.shape == (256, 128)]
    assert weights == []
    assert sum(t.numel() * t.element_size() for t in saved) < 256 * 128 * 2  # less than a bf16 weight
    y.sum().backward()
    assert x.grad is not None


def test_under_autocast_it_computes_as_a_linear_does():
    layer = frozen_linear(32, 16)
    q = quantized(layer, "fp8")
    plain = copy.deepcopy(layer)
    with torch.no_grad():  # the weight autocast's Linear computes with: the dequantised weight in bf16
        plain.weight.copy_(q.dequantized_weight(torch.bfloat16))
    x = torch.randn(2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = q(x), plain(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_bf16_base_quantizes_and_computes_in_bf16(fmt):
    layer = frozen_linear(64, 64).to(torch.bfloat16)
    q = quantized(layer, fmt)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    out = q(x)
    assert out.dtype == torch.bfloat16 and q.weight.dtype == torch.bfloat16
    rel = (out.float() - layer(x).float()).norm() / layer(x).float().norm()
    assert rel < MODEL_ERROR[fmt]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="quantizing onto a GPU needs CUDA; this machine has none")
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantizing_onto_the_gpu_leaves_the_weights_there(fmt):
    layer = frozen_linear(64, 64)
    model = nn.Sequential(layer)
    quantize_base(model, fmt, device="cuda")
    assert all(t.device.type == "cuda" for t in layer.quantized_tensors())
    model.cuda()
    x = torch.randn(2, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16


# ---- the transformer ------------------------------------------------------------------------------


def tiny_inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    return kontext_inputs(torch.randn(2, 32, 64, generator=g), torch.randn(2, 32, generator=g), size=2)


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_quantized_transformer_is_the_base_with_dequantised_weights(fmt):
    base = tiny_flux(0).requires_grad_(False).eval()
    model = copy.deepcopy(base)
    names = quantize_base(model, fmt)
    linears = [n for n, m in base.named_modules() if isinstance(m, nn.Linear)]
    assert names == linears  # every Linear of a frozen transformer
    same = copy.deepcopy(base)  # the base carrying exactly the dequantised weights
    with torch.no_grad():
        for name in names:
            same.get_submodule(name).weight.copy_(model.get_submodule(name).dequantized_weight())
        got, want, ref = model(**tiny_inputs())[0], same(**tiny_inputs())[0], base(**tiny_inputs())[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - ref).norm() / ref.norm() < MODEL_ERROR[fmt]


def training_model(fmt: str, tiny_kontext) -> tuple[TrainingModel, list[str]]:
    """The tiny transformer set up as the trainer does (peft LoRA rank 2), with ``fmt``, and its adapter."""
    cfg = load_config(
        TINY_CONFIG,
        run_overrides(tiny_kontext, Path("unused"), f"model.quantize_base={fmt}", "adapter.lora.rank=2"),
    )
    transformer = tiny_flux(0)
    mole = build_mole_config(cfg, transformer)
    torch.manual_seed(0)
    lora = setup_transformer(transformer, cfg, mole)
    model = TrainingModel(transformer, InstructMoLE(mole), lora, 2.0)
    with torch.no_grad():  # nonzero B and LoRA-B, so that every trainable tensor gets a gradient
        g = torch.Generator().manual_seed(2)
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model, lora


def flow_loss(model: TrainingModel) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    hidden, target = torch.randn(2, 8, 64, generator=g), torch.randn(2, 4, 64, generator=g)
    text, pooled = torch.randn(2, 32, 64, generator=g), torch.randn(2, 32, generator=g)
    out = model(
        hidden,
        text,
        pooled,
        sigma=torch.tensor([0.3, 0.8]),
        img_ids=torch.zeros(8, 3),
        txt_ids=torch.zeros(32, 3),
        guidance=torch.ones(2),
        target=target,
        seeds=torch.tensor([1, 2]),
    )
    return out["flow"].mean()


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_frozen_linear_is_quantized_and_gradients_reach_every_trainable_term(fmt, tiny_kontext):
    model, lora = training_model(fmt, tiny_kontext)
    reference, _ = training_model("none", tiny_kontext)
    transformer = model.transformer
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in reference.named_parameters() if p.requires_grad}
    assert all(model.get_parameter(n).dtype == torch.float32 for n in trainable)  # fp32 masters, not quantized
    for name, module in transformer.named_modules():
        if type(module) is nn.Linear:  # the only plain Linears left are peft's trainable lora_A / lora_B
            assert module.weight.requires_grad and ".lora_" in name, name
    for name in model.mole.config.layer_names:  # the Linears that carry experts
        assert isinstance(transformer.get_submodule(name), QuantizedLinear), name
    for name in lora:  # the Linears that carry the LoRA: peft's base layer
        assert isinstance(transformer.get_submodule(name).base_layer, QuantizedLinear), name
    assert not any(k.endswith(("weight_data", "weight_scale", "weight_absmax")) for k in model.state_dict())

    model.eval()
    reference.eval()
    with torch.no_grad():  # the reference model carries the dequantised weights: the same function
        for name, module in transformer.named_modules():
            if isinstance(module, QuantizedLinear):
                reference.transformer.get_submodule(name).weight.copy_(module.dequantized_weight())
    loss, want = flow_loss(model), flow_loss(reference)
    loss.backward()
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    own = dict(model.named_parameters())
    for name, p in reference.named_parameters():
        if p.requires_grad:
            grad = own[name].grad
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
            torch.testing.assert_close(grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


# ---- the config -----------------------------------------------------------------------------------


def config(tiny, *extra: str):
    return load_config(TINY_CONFIG, run_overrides(tiny, Path("unused"), *extra))


def test_quantize_base_takes_the_four_values_and_fp8_base_is_its_old_name(tiny_kontext):
    assert config(tiny_kontext).model.quantize_base == "none"
    for fmt in ("none", *FORMATS):
        assert config(tiny_kontext, f"model.quantize_base={fmt}").model.quantize_base == fmt
    with pytest.raises(ConfigError, match=r"model\.quantize_base=.int4. must be one of: none, fp8, int8, nf4"):
        config(tiny_kontext, "model.quantize_base=int4")
    old = config(tiny_kontext, "model.fp8_base=true")
    assert old.model.quantize_base == "fp8" and "fp8_base" not in old.to_dict()["model"]
    assert config(tiny_kontext, "model.fp8_base=false", "model.quantize_base=nf4").model.quantize_base == "nf4"
    assert config(tiny_kontext, "model.fp8_base=true", "model.quantize_base=fp8").model.quantize_base == "fp8"
    with pytest.raises(ConfigError, match=r"model\.fp8_base=true .* model\.quantize_base='int8' disagree"):
        config(tiny_kontext, "model.fp8_base=true", "model.quantize_base=int8")


def test_a_checkpoint_of_an_earlier_trainer_resumes_under_the_new_name(tiny_kontext):
    now = config(tiny_kontext, "model.quantize_base=fp8").to_dict()
    saved = copy.deepcopy(now)
    del saved["model"]["quantize_base"]
    saved["model"]["fp8_base"] = True
    assert resume_conflicts(saved, now) == []
    saved["model"]["fp8_base"] = False
    assert resume_conflicts(saved, now) == [("model.quantize_base", "none", "fp8")]
    assert resume_conflicts(saved, config(tiny_kontext).to_dict()) == []


def test_nf4_without_bitsandbytes_is_one_sentence_with_the_pip_command(tiny_kontext, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(ConfigError) as err:
        config(tiny_kontext, "model.quantize_base=nf4")
    assert str(err.value) == (
        "model.quantize_base=nf4 needs bitsandbytes, which cannot be imported: pip install 'bitsandbytes>=0.50'"
    )
    with pytest.raises(ConfigError, match=r"pip install 'bitsandbytes>=0\.50'"):
        quantize_base(nn.Sequential(frozen_linear(8, 8)), "nf4")
    config(tiny_kontext, "model.quantize_base=int8")  # fp8 and int8 need no library


# ---- training -------------------------------------------------------------------------------------


def run(tiny, out: Path, *extra: str, resume: str | None = None):
    overrides = run_overrides(
        tiny, out, "save.report=false", "adapter.lora.rank=2", "train.lr=3e-3", *extra, steps=3, every=1
    )
    return train(load_config(TINY_CONFIG, overrides), resume=resume)


@pytest.fixture(scope="module")
def unquantized(tiny_kontext, tmp_path_factory) -> Path:
    return run(tiny_kontext, tmp_path_factory.mktemp("unquantized")).adapter


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_quantized_run_trains_resumes_exactly_and_exports_only_the_adapter(fmt, tiny_kontext, unquantized, tmp_path):
    out = tmp_path / fmt
    first = run(tiny_kontext, out, f"model.quantize_base={fmt}")
    assert first.steps == 3
    trained = load_file(str(first.adapter))
    plain = load_file(str(unquantized))
    assert trained.keys() == plain.keys()  # the adapter's tensors and nothing of the base
    assert all(v.dtype in (torch.float32, torch.bfloat16) for v in trained.values())
    lora_b = [k for k in trained if "lora_B" in k]
    assert lora_b and all(trained[k].abs().sum() > 0 for k in lora_b)  # it trained (LoRA B starts at zero)
    assert any(not torch.equal(trained[k], plain[k]) for k in trained)  # on another base than the unquantized
    state = load_file(str(out / "checkpoints" / "step-0000003" / "model.safetensors"))
    assert set(state) == set(first.model.trainable_state())  # the checkpoint holds the trainable weights only
    adapter = im.load_adapter(first.adapter)
    assert adapter.model is not None and adapter.lora_parts()
    # an interrupted run (its last checkpoint lost) resumed from step 2 ends with the same weights
    shutil.rmtree(out / "checkpoints" / "step-0000003")
    first.adapter.unlink()
    resumed = run(tiny_kontext, out, f"model.quantize_base={fmt}", resume="latest")
    assert resumed.steps == 3
    again = load_file(str(resumed.adapter))
    assert again.keys() == trained.keys() and all(torch.equal(again[k], trained[k]) for k in trained)
