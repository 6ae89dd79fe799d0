"""Per-row routing inside real ComfyUI sampling: CFG batches, separate forwards, cfg = 1."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from .test_patched_model import load


def conditioning(setup: dict[str, Any], seed: int, tokens: int, exact: bool) -> list:
    g = torch.Generator().manual_seed(seed)
    t5, pooled = torch.randn(1, tokens, 64, generator=g), torch.randn(1, 32, generator=g)
    cond = [[t5, {"pooled_output": pooled, "guidance": 3.5}]]
    if exact:
        cond = setup["nodes"].signal.attach_signal(
            cond, torch.randn(1, 512, 64, generator=g), torch.randn(1, 32, generator=g)
        )
    return cond


def sample_and_record(
    setup: dict[str, Any], model: Any, positive: list, negative: list, cfg: float, size: int = 8
) -> list:
    """Run a short KSampler; record, for every model forward, each row's council and its source."""
    import nodes as comfy_nodes

    runtime = model.get_attachment("instructmole")
    seen: list[dict] = []
    begin = runtime.begin

    def spy(x, context, y, options, kwargs):
        begin(x, context, y, options, kwargs)
        seen.append(
            {
                "rows": x.shape[0],
                "cond_or_uncond": tuple(options.get("cond_or_uncond") or ()),
                "layout": runtime.last_layout,
                "council": runtime.last_council,
                "exact": runtime.last_exact,
                "exact_rows": runtime.last_exact_rows,
                "context": context.clone(),
                "y": y.clone(),
                "kwargs": dict(kwargs),
            }
        )

    runtime.begin = spy
    try:
        latent = {"samples": torch.zeros(1, 16, size, size)}
        comfy_nodes.common_ksampler(model, 1, 2, cfg, "euler", "simple", positive, negative, latent)
    finally:
        del runtime.begin
    return seen


def expected_council(setup, row_context, row_y, kwargs, row):
    adapter = setup["adapter"]
    if "instructmole_t5" in kwargs:
        t5 = kwargs["instructmole_t5"][row : row + 1].view(torch.float32)
        pooled = kwargs["instructmole_pooled"][row : row + 1].view(torch.float32)
        return adapter.route(t5, pooled)
    return adapter.route(row_context[None].float(), row_y[None].float())


@pytest.mark.parametrize(
    ("pos_tokens", "neg_tokens", "exact", "cfg", "forwards_per_step"),
    [
        (16, 16, True, 2.0, 1),  # one CFG batch: [uncond, cond] rows, each with its own signal
        (16, 24, True, 2.0, 2),  # T5 lengths differ: separate forwards
        (16, 16, False, 2.0, 1),  # no carried signal: each row routed from its own T5 features
        (16, 16, True, 1.0, 1),  # cfg = 1: the negative pass is skipped
    ],
)
def test_each_row_gets_its_own_council(setup, pos_tokens, neg_tokens, exact, cfg, forwards_per_step):
    model, _ = load(setup)
    positive = conditioning(setup, 1, pos_tokens, exact)
    negative = conditioning(setup, 2, neg_tokens, exact)
    seen = sample_and_record(setup, model, positive, negative, cfg)
    assert len(seen) == 2 * forwards_per_step  # 2 steps
    for call in seen:
        assert call["exact"] is exact
        for row in range(call["rows"]):
            want = expected_council(setup, call["context"][row], call["y"][row], call["kwargs"], row)
            assert torch.allclose(call["council"].weights[row], want.weights[0], atol=1e-5)
    councils = {tuple(c["council"].compact()[0][r].flatten().tolist()) for c in seen for r in range(c["rows"])}
    rows_total = sum(c["rows"] for c in seen)
    if cfg > 1:
        assert len(councils) == 2  # positive and negative were routed differently
    assert rows_total == (2 if cfg > 1 else 1) * 2
    # ComfyUI passes transformer_options positionally: the per-row code still sees which rows are which.
    chunks = [c["cond_or_uncond"] for c in seen]
    want = {(0,)} if cfg == 1 else ({(0,), (1,)} if forwards_per_step == 2 else {(1, 0), (0, 1)})
    assert set(chunks) <= want and all(chunks)
    assert all(c["layout"].cond_or_uncond == c["cond_or_uncond"] for c in seen)
