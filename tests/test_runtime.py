"""The core runtime in training mode: gradients, auxiliary losses, gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import CheckpointError

import instructmole as im
from instructmole.losses import load_balancing_loss, orthogonality_loss_reference
from instructmole.runtime import RoutingError
from instructmole.tiny import tiny_flux
from tests.helpers import flux_inputs, random_adapter

TOKEN_LAYER = "single_transformer_blocks.1.proj_out"


def train_adapter(**config) -> im.Adapter:
    adapter = random_adapter(tiny_flux(0), seed=2, token_routed=(TOKEN_LAYER,), **config)
    adapter.model.train()
    return adapter


def step(transformer, adapter, inputs, *, checkpointing: bool, seed: int = 0, clear_after_forward: bool = False):
    """One training forward + backward; returns (loss parts, {param name: grad})."""
    transformer.train()
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    else:
        transformer.disable_gradient_checkpointing()
    adapter.model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # gate noise and router dropout draw from the global generator
    with im.attach(transformer, adapter, training=True) as handle:
        if clear_after_forward:  # the bug the runtime avoids: forget the councils when the forward ends
            transformer.register_forward_hook(lambda *_: setattr(handle.runtime, "_active", None))
        out = transformer(**inputs)[0]
        aux = handle.runtime.aux_losses()
        loss = out.square().mean() + 0.1 * aux.load_balance + 0.01 * aux.load_balance_token + 0.01 * aux.orthogonality
        loss.backward()
    transformer._forward_hooks.clear()
    grads = {n: p.grad.clone() for n, p in adapter.model.named_parameters() if p.grad is not None}
    return aux, grads


def test_routing_gradients_reach_gates_router_and_experts():
    transformer, adapter = tiny_flux(0), train_adapter()
    _, grads = step(transformer, adapter, flux_inputs(batch=2), checkpointing=False)
    names = set(grads)
    for name, layer in adapter.model.named_layers():
        key = name.replace(".", "/")
        assert {f"experts.{key}.A", f"experts.{key}.B", f"experts.{key}.gate.weight"} <= names
        assert grads[f"experts.{key}.gate.weight"].abs().sum() > 0, name
        assert layer.A.requires_grad
    router = [n for n in names if n.startswith("router.")]
    assert {"router.latents", "router.proj_in.weight", "router.proj_out.weight"} <= set(router)
    assert all(grads[n].abs().sum() > 0 for n in ("router.latents", "router.proj_in.weight"))
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_flow_gradient_reaches_gates_through_council_weights():
    """With the aux losses off, the gates learn only because the council weights carry gradients."""
    transformer, adapter = tiny_flux(0), train_adapter()
    adapter.model.eval()  # no noise/dropout: the gradient below is the flow term's alone
    inputs = flux_inputs(batch=2)
    with im.attach(transformer, adapter, training=True):
        transformer(**inputs)[0].square().mean().backward()
    gate = adapter.model.layer("transformer_blocks.0.ff.net.2").gate.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    transformer, adapter = tiny_flux(0), train_adapter()
    inputs = flux_inputs(batch=2)
    aux_plain, plain = step(transformer, adapter, inputs, checkpointing=False)
    aux_ckpt, ckpt = step(transformer, adapter, inputs, checkpointing=True)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    assert aux_plain.as_floats() == pytest.approx(aux_ckpt.as_floats(), rel=1e-6)
    # A runtime that forgot its councils when the forward ended would recompute another forward.
    with pytest.raises(CheckpointError, match="different number of tensors"):
        step(transformer, adapter, inputs, checkpointing=True, clear_after_forward=True)


def test_aux_losses_equal_their_formulas():
    transformer, adapter = tiny_flux(0), train_adapter()
    adapter.model.eval()  # deterministic routing, so the formulas can be evaluated on the same councils
    inputs = flux_inputs(batch=3)
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        transformer.get_submodule(name).register_forward_hook(lambda _m, i, _o, name=name: seen.__setitem__(name, i[0]))
        for name in adapter.config.layer_names
    ]
    with torch.no_grad(), im.attach(transformer, adapter, training=True) as handle:
        transformer(**inputs)
        summed, mean = handle.runtime.aux_losses("sum"), handle.runtime.aux_losses("mean")
        probs, indices, _ = handle.runtime.route(inputs["encoder_hidden_states"], inputs["pooled_projections"])
    for h in hooks:
        h.remove()
    cfg = adapter.config
    lb = [load_balancing_loss(probs[:, row], indices[:, row]) for row in range(len(cfg.instruction_layers))]
    torch.testing.assert_close(summed.load_balance, torch.stack(lb).sum())
    torch.testing.assert_close(mean.load_balance, torch.stack(lb).mean())
    layer = adapter.model.layer(TOKEN_LAYER)
    token_probs = (seen[TOKEN_LAYER] @ layer.gate.weight.t()).softmax(-1)
    token_idx = token_probs.topk(cfg.top_k, dim=-1).indices
    n = cfg.num_experts  # every token of every row is one routed unit
    lb_token = load_balancing_loss(token_probs.reshape(-1, n), token_idx.reshape(-1, cfg.top_k))
    torch.testing.assert_close(summed.load_balance_token, lb_token)
    ortho = [orthogonality_loss_reference(seen[n], adapter.model.layer(n).A, adapter.model.layer(n).B) for n in seen]
    torch.testing.assert_close(summed.orthogonality, torch.stack(ortho).sum(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(mean.orthogonality, torch.stack(ortho).mean(), rtol=1e-5, atol=1e-7)


def test_training_output_equals_inference_output_in_eval_mode():
    """The training path (P = X A once, gathered) computes the same forward as inference."""
    transformer, adapter = tiny_flux(0), train_adapter()
    adapter.model.eval()
    inputs = flux_inputs(batch=2)
    with torch.no_grad():
        with im.attach(transformer, adapter, training=True):
            trained = transformer(**inputs)[0]
        with im.attach(transformer, adapter):
            inferred = transformer(**inputs)[0]
    torch.testing.assert_close(trained, inferred, atol=1e-5, rtol=1e-5)


def test_training_refuses_merged_and_plain_lora():
    transformer, adapter = tiny_flux(0), train_adapter()
    council = adapter.route(*[flux_inputs(batch=1)[k] for k in ("encoder_hidden_states", "pooled_projections")])
    with pytest.raises(im.AttachError, match="peft"):
        im.attach(transformer, adapter, mode="merged", council=council, training=True)
    with pytest.raises(RoutingError, match="training=True"):
        im.attach(transformer, adapter).runtime.aux_losses()


def test_seeded_rows_draw_the_same_noise_alone_or_in_a_batch():
    """Per-row seeds make a training forward of a batch equal to its rows run one by one."""
    transformer, adapter = tiny_flux(0), train_adapter()
    inputs = flux_inputs(batch=3)
    seeds = torch.tensor([11, 22, 33])
    per_row = {"hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance"}
    with torch.no_grad(), im.attach(transformer, adapter, training=True) as handle:
        handle.seeds = seeds
        together = transformer(**inputs)[0]
        for b in range(3):
            handle.seeds = seeds[b : b + 1]
            alone = transformer(**{k: v[b : b + 1] if k in per_row else v for k, v in inputs.items()})[0]
            torch.testing.assert_close(alone[0], together[b], atol=1e-5, rtol=1e-5)
        handle.seeds = torch.tensor([11, 22, 34])
        assert not torch.allclose(transformer(**inputs)[0][2], together[2], atol=1e-4)  # the seed matters


def test_recomputed_blocks_do_not_replace_the_first_pass_records():
    """With checkpointing, blocks run again in backward; what they compute again must not be kept
    (it would hold the recomputed activations until the next forward)."""
    transformer, adapter = tiny_flux(0), train_adapter()
    transformer.train()
    transformer.enable_gradient_checkpointing()
    with im.attach(transformer, adapter, training=True) as handle:
        out = transformer(**flux_inputs(batch=2))[0]
        aux = handle.runtime.aux_losses()
        first = {kind: {n: id(v) for n, v in handle.runtime._records[kind].items()} for kind in ("grams", "token")}
        (out.square().mean() + aux.orthogonality + aux.load_balance_token).backward()
        after = {kind: {n: id(v) for n, v in handle.runtime._records[kind].items()} for kind in ("grams", "token")}
    assert first == after and len(first["grams"]) == len(adapter.config.layers) and first["token"]


def test_modes_live_in_the_runtime():
    """The runtime names its mode, says where a per-forward term goes and folds a merged council at its
    strength; a host only installs what it is given."""
    from instructmole.fold import fold_council
    from instructmole.overrides import with_strength
    from instructmole.runtime import MoLERuntime
    from instructmole.tiny import tiny_mole_config

    config = tiny_mole_config()
    model = im.InstructMoLE(config).eval()
    text, pooled = torch.randn(1, 32, config.text_dim), torch.randn(1, config.router_dim)
    council = im.Adapter(model).route(text, pooled)
    auto, fixed = MoLERuntime(model), MoLERuntime(model, council=council)
    merged = MoLERuntime(model, council=council, merged=True, expert_strength=0.5)
    assert (auto.mode, fixed.mode, merged.mode) == ("auto", "fixed", "merged")
    assert auto.layers == fixed.layers == set(config.layer_names)
    assert merged.layers == {s.name for s in config.layers if s.routing == "token"}
    assert list(auto.folded()) == list(fixed.folded()) == []
    want = fold_council(model, with_strength(council, 0.5))
    got = dict(merged.folded())
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(RoutingError, match="merged mode folds one council"):
        MoLERuntime(model, merged=True)
    with pytest.raises(RoutingError, match="folded into the weights"):
        merged.council = None


def test_add_term_adds_in_place_and_reuses_the_council_matrices_while_the_council_stays():
    from instructmole.runtime import MoLERuntime
    from instructmole.tiny import tiny_mole_config

    config = tiny_mole_config()
    model = im.InstructMoLE(config).eval()
    name = config.instruction_layers[0]
    spec = next(s for s in config.layers if s.name == name)
    text, pooled = torch.randn(1, 32, config.text_dim), torch.randn(1, config.router_dim)
    x = torch.randn(1, 5, spec.in_features)
    runtime = MoLERuntime(model, expert_strength=0.7)

    def forward(signal: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        runtime.begin(*signal, rows=1)
        out = torch.randn(1, 5, spec.out_features)
        want = out + runtime.delta(name, x)
        with torch.no_grad():
            got = runtime.add_term(name, x, out)
        assert got is out  # in place: no term tensor, no second pass
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        runtime.end()
        return runtime._factors[(name, x.device, x.dtype)]

    first = forward((text, pooled))
    again = forward((text.clone(), pooled.clone()))  # the same instruction routed anew: the same council
    assert again[0] is first[0] and again[1] is first[1]
    other = forward((torch.randn_like(text), torch.randn_like(pooled)))
    assert other[0] is not first[0]
    out = torch.randn(1, 5, spec.out_features, requires_grad=True)  # autograd on the output: never in place
    runtime.begin(text, pooled, rows=1)
    assert runtime.add_term(name, x, out) is not out
