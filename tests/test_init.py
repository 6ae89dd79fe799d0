"""Fresh experts start as the reference implementation's do (or, on request, as a LoRA's)."""

from __future__ import annotations

import math

import pytest
import torch

import instructmole as im
from instructmole.experts import MoLELayer
from tests.helpers import tiny_mole_config

IN, OUT, N, R = 12288, 3072, 8, 32  # FLUX's double-block ff.net.2, the reference's N and rank


def uniform_std(bound: float) -> float:
    return bound / math.sqrt(3)


def test_reference_init_of_a_full_size_layer():
    torch.manual_seed(0)
    layer = MoLELayer(IN, OUT, num_experts=N, rank=R, gate_in=768)
    # kaiming_uniform_(a=√5) on the reference's A [in, r]: fan-in r, bound 1/√r, std 0.102
    assert float(layer.A.detach().std()) == pytest.approx(uniform_std(1 / math.sqrt(R)), rel=0.01)
    assert float(layer.A.detach().std()) == pytest.approx(0.102, abs=0.001)
    assert float(layer.A.detach().abs().max()) <= 1 / math.sqrt(R)
    assert float(layer.B.detach().abs().max()) == 0.0
    # the gate is the reference's plain nn.Linear(768, N): bound 1/√768
    assert float(layer.gate.weight.detach().std()) == pytest.approx(uniform_std(1 / math.sqrt(768)), rel=0.05)
    token = MoLELayer(IN, OUT, num_experts=N, rank=R, gate_in=IN)  # a token-routed layer's gate reads x
    assert float(token.gate.weight.detach().std()) == pytest.approx(uniform_std(1 / math.sqrt(IN)), rel=0.02)
    assert float(token.gate.weight.detach().std()) == pytest.approx(0.0052, abs=0.0001)


def test_lora_init_option():
    torch.manual_seed(0)
    layer = MoLELayer(IN, OUT, num_experts=N, rank=R, gate_in=768, init="lora")
    assert float(layer.A.detach().std()) == pytest.approx(uniform_std(1 / math.sqrt(IN)), rel=0.01)
    assert float(layer.gate.weight.detach().std()) == pytest.approx(uniform_std(1 / math.sqrt(768)), rel=0.05)
    with pytest.raises(ValueError, match="'kaiming' is not 'reference' or 'lora'"):
        MoLELayer(8, 8, num_experts=2, rank=2, gate_in=4, init="kaiming")


def test_the_module_passes_its_init_to_every_layer():
    config = tiny_mole_config()
    for init, fan_in in (("reference", lambda spec: config.rank), ("lora", lambda spec: spec.in_features)):
        model = im.InstructMoLE(config, init=init)
        for spec in config.layers:
            bound = 1 / math.sqrt(fan_in(spec))
            A = model.layer(spec.name).A.detach()
            assert float(A.abs().max()) <= bound and float(A.abs().max()) > 0.9 * bound, (init, spec.name)


def test_the_trainer_defaults_to_the_reference_init():
    from training.config import AdapterSection

    assert AdapterSection().expert_init == "reference"
