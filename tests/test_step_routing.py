"""Load balancing over a whole optimizer step: batch 8 in one forward equals 8 micro-batches of 1."""

from __future__ import annotations

import torch

import instructmole as im
from instructmole.runtime import StepRouting
from instructmole.tiny import tiny_flux
from tests.helpers import flux_inputs, random_adapter

PER_ROW = {"hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance"}
ROWS = 8


def rows_of(inputs: dict, start: int, stop: int) -> dict:
    return {k: v[start:stop] if k in PER_ROW else v for k, v in inputs.items()}


def accumulate(transformer, adapter, inputs, seeds, micro: int, step_level: bool):
    """Forward + backward of ``ROWS`` rows in micro-batches of ``micro`` rows, each loss divided by the
    number of micro-batches (as gradient accumulation does); returns the mean terms and the gradients."""
    adapter.model.zero_grad(set_to_none=True)
    parts = ROWS // micro
    values = {"flow": 0.0, "load_balance": 0.0}
    with im.attach(transformer, adapter, training=True) as handle:
        runtime = handle.runtime
        step = None
        if step_level:
            counts = sum(
                runtime.routing_counts(
                    inputs["encoder_hidden_states"][m : m + micro],
                    inputs["pooled_projections"][m : m + micro],
                    seeds[m : m + micro],
                )
                for m in range(0, ROWS, micro)
            )
            step = StepRouting(counts, ROWS, parts)
        for m in range(0, ROWS, micro):
            handle.seeds = seeds[m : m + micro]
            out = transformer(**rows_of(inputs, m, m + micro))[0]
            flow = out.square().mean()
            lb = runtime.aux_losses("sum", step=step).load_balance
            ((flow + 0.1 * lb) / parts).backward()
            values["flow"] += float(flow.detach()) / parts
            values["load_balance"] += float(lb.detach()) / parts
    grads = {n: p.grad.clone() for n, p in adapter.model.named_parameters() if p.grad is not None}
    return values, grads


def test_batch_8_equals_8_micro_batches_of_1_in_value_and_gradient():
    transformer = tiny_flux(0).train()
    adapter = random_adapter(transformer, seed=2)
    adapter.model.train()  # gate noise and router dropout on: drawn from the row seeds
    inputs = flux_inputs(batch=ROWS)
    seeds = torch.arange(ROWS) * 7919 + (1 << 61)  # trainer-like 63-bit seeds
    one, grads_one = accumulate(transformer, adapter, inputs, seeds, micro=ROWS, step_level=True)
    eight, grads_eight = accumulate(transformer, adapter, inputs, seeds, micro=1, step_level=True)
    assert abs(eight["load_balance"] - one["load_balance"]) <= 1e-5 * one["load_balance"]
    assert abs(eight["flow"] - one["flow"]) <= 1e-5 * one["flow"]
    assert grads_one.keys() == grads_eight.keys()
    for name in grads_one:
        torch.testing.assert_close(grads_eight[name], grads_one[name], atol=1e-6, rtol=1e-4, msg=name)
    gate = "experts.transformer_blocks/0/ff/net/2.gate.weight"
    assert grads_one[gate].abs().sum() > 0  # the balance term reaches the gates

    # Statistics of each micro-batch alone (the old behaviour): another loss, another gradient.
    alone, grads_alone = accumulate(transformer, adapter, inputs, seeds, micro=1, step_level=False)
    assert abs(alone["load_balance"] - one["load_balance"]) > 1e-3 * one["load_balance"]
    assert not torch.allclose(grads_alone[gate], grads_one[gate], atol=1e-6)


def test_one_batch_with_its_own_step_routing_is_the_plain_loss():
    """With one micro-batch, the step's statistics are the forward's own: nothing changes."""
    transformer = tiny_flux(0).train()
    adapter = random_adapter(transformer, seed=3)
    adapter.model.train()
    inputs, seeds = flux_inputs(batch=4), torch.tensor([5, 6, 7, 8])
    with torch.no_grad(), im.attach(transformer, adapter, training=True) as handle:
        counts = handle.runtime.routing_counts(inputs["encoder_hidden_states"], inputs["pooled_projections"], seeds)
        handle.seeds = seeds
        transformer(**inputs)
        plain = handle.runtime.aux_losses("sum")
        stepped = handle.runtime.aux_losses("sum", step=StepRouting(counts, 4, 1))
        k = adapter.config.top_k
        assert float(counts.sum()) == 4 * k * len(adapter.config.instruction_layers)
    torch.testing.assert_close(stepped.load_balance, plain.load_balance)
