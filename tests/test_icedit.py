"""ICEdit's MoE-LoRA: files written from the documented key names run exactly as its formula says.

The formula (per token x of a routed layer's input, text and image tokens alike): logits =
route(x); keep the top-k logits; softmax over the selected ones only; out = W0 x + Σ_j w_j B_j A_j x.
The reference below computes every expert for every token (dense), independently of our code.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

import instructmole as im
from instructmole.cli import main
from instructmole.experts import token_route
from instructmole.icedit import ICEDIT_BASE, convert_icedit, is_icedit
from instructmole.tiny import tiny_flux

ATOL = 1e-5
N, RANK = 4, 3
PLAIN = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "proj_mlp", "ff.net.0.proj")


def fill_flux():
    return tiny_flux(seed=0, in_channels=384)


def moe_modules(transformer) -> list[str]:
    """ICEdit's routed Linears: every double block's ff.net.2, every single block's proj_out."""
    return [
        name
        for name, _ in transformer.named_modules()
        if (name.startswith("transformer_blocks.") and name.endswith("ff.net.2"))
        or (name.startswith("single_transformer_blocks.") and name.endswith("proj_out"))
    ]


def icedit_state_dict(transformer, seed: int = 0, plain: bool = True) -> dict[str, torch.Tensor]:
    """Random tensors under ICEdit's key names (routes decisive, experts non-trivial)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in moe_modules(transformer):
        mod = transformer.get_submodule(name)
        for j in range(N):
            sd[f"transformer.{name}.lora_A.expert_{j}.weight"] = torch.randn(RANK, mod.in_features, generator=g) * 0.1
            sd[f"transformer.{name}.lora_B.expert_{j}.weight"] = torch.randn(mod.out_features, RANK, generator=g) * 0.1
        sd[f"transformer.{name}.lora_route.weight"] = torch.randn(N, mod.in_features, generator=g)
    if plain:
        for name, mod in transformer.named_modules():
            if isinstance(mod, torch.nn.Linear) and (name.endswith(PLAIN) or name == "x_embedder"):
                sd[f"transformer.{name}.lora_A.weight"] = torch.randn(2, mod.in_features, generator=g) * 0.1
                sd[f"transformer.{name}.lora_B.weight"] = torch.randn(mod.out_features, 2, generator=g) * 0.1
    return sd


def write_icedit(path, transformer, **kw) -> dict[str, torch.Tensor]:
    sd = icedit_state_dict(transformer, **kw)
    save_file(sd, str(path), metadata={"format": "pt"})  # what diffusers' save_lora_weights writes
    return sd


def fill_inputs(batch: int = 2, size: int = 4, text_len: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = size * size
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    img_ids = torch.stack([torch.zeros(n), rows.flatten().float(), cols.flatten().float()], -1)
    return {
        "hidden_states": torch.randn(batch, n, 384, generator=g),
        "encoder_hidden_states": torch.randn(batch, text_len, 64, generator=g),
        "pooled_projections": torch.randn(batch, 32, generator=g),
        "timestep": torch.full((batch,), 0.5),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(text_len, 3),
        "guidance": torch.full((batch,), 50.0),
        "return_dict": False,
    }


def run(transformer, inputs):
    with torch.no_grad():
        return transformer(**inputs)[0]


def formula_hooks(transformer, sd, top_k: int, seen: dict | None = None):
    """ICEdit's formula, hand-wired from the raw file tensors (dense: every expert for every token)."""
    hooks = []

    def moe(name):
        A = torch.stack([sd[f"transformer.{name}.lora_A.expert_{j}.weight"] for j in range(N)])  # [n, r, in]
        B = torch.stack([sd[f"transformer.{name}.lora_B.expert_{j}.weight"] for j in range(N)])  # [n, out, r]
        route = sd[f"transformer.{name}.lora_route.weight"]

        def term(x):
            logits = x @ route.t()  # [b, t, n]
            top, idx = logits.topk(top_k, dim=-1)
            w = top.softmax(-1)  # over the selected logits only
            every = torch.einsum("bti,nri,nor->btno", x, A, B)  # every expert, every token
            mix = torch.zeros_like(logits).scatter(-1, idx, w)
            if seen is not None:
                seen[name] = idx
            return torch.einsum("btno,btn->bto", every, mix)

        return term

    def plain(name):
        down, up = sd[f"transformer.{name}.lora_A.weight"], sd[f"transformer.{name}.lora_B.weight"]
        return lambda x: x @ down.t() @ up.t()

    for key in sd:
        if key.endswith(".lora_route.weight"):
            name = key[len("transformer.") : -len(".lora_route.weight")]
            fn = moe(name)
        elif key.endswith(".lora_A.weight"):
            name = key[len("transformer.") : -len(".lora_A.weight")]
            fn = plain(name)
        else:
            continue
        hooks.append(transformer.get_submodule(name).register_forward_hook(lambda _m, i, o, fn=fn: o + fn(i[0])))
    return hooks


@pytest.mark.parametrize("top_k", [1, 2])
def test_icedit_file_runs_exactly_as_its_formula(tmp_path, top_k):
    transformer = fill_flux()
    path = tmp_path / "pytorch_lora_weights.safetensors"
    sd = write_icedit(path, transformer)
    adapter = im.load_adapter(path) if top_k == 1 else convert_icedit(sd, top_k=top_k)
    cfg = adapter.config
    assert (cfg.top_k, cfg.num_experts, cfg.rank, cfg.scale) == (top_k, N, RANK, 1.0)
    assert cfg.base_model == ICEDIT_BASE and cfg.token_weights == "renormalised"
    assert cfg.instruction_layers == [] and {s.routing for s in cfg.layers} == {"token"}
    assert cfg.layer_names == moe_modules(transformer)  # double blocks first, in block order

    inputs = fill_inputs()
    seen: dict = {}
    hooks = formula_hooks(transformer, sd, top_k, seen)
    want = run(transformer, inputs)
    for h in hooks:
        h.remove()
    base = run(transformer, inputs)
    with im.attach(transformer, adapter) as attached:
        got = run(transformer, inputs)
        recorded = attached.runtime.last_token_experts
    assert (want - base).abs().max() > 1e-3  # the adapter really changes the output
    torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)
    assert torch.equal(run(transformer, inputs), base)  # detached cleanly

    # Single blocks route text and image tokens alike, each its own experts.
    single = "single_transformer_blocks.0.proj_out"
    chosen = seen[single][..., 0]
    assert chosen.shape[1] == inputs["encoder_hidden_states"].shape[1] + inputs["hidden_states"].shape[1]
    assert len(chosen.unique()) > 1
    # The runtime keeps each token's first choice of the latest forward, for maps (every layer).
    assert set(recorded) == set(cfg.layer_names)
    for name in cfg.layer_names:
        assert torch.equal(recorded[name], seen[name][..., 0]), name


def test_lora_strength_zero_leaves_only_the_experts(tmp_path):
    transformer = fill_flux()
    sd = icedit_state_dict(transformer)
    experts_only = {k: v for k, v in sd.items() if ".expert_" in k or "lora_route" in k}
    inputs = fill_inputs(batch=1)
    with im.attach(transformer, convert_icedit(sd), lora_strength=0.0):
        got = run(transformer, inputs)
    with im.attach(transformer, convert_icedit(experts_only)):
        want = run(transformer, inputs)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)


def test_every_key_is_used_and_the_file_round_trips(tmp_path):
    transformer = fill_flux()
    path = tmp_path / "icedit.safetensors"
    sd = write_icedit(path, transformer)
    adapter = im.load_adapter(path)
    assert is_icedit(sd)
    # Every expert, route and plain tensor lands in the adapter, unchanged.
    for name in adapter.config.layer_names:
        layer = adapter.model.layer(name)
        for j in range(N):
            assert torch.equal(layer.A[j], sd[f"transformer.{name}.lora_A.expert_{j}.weight"].t())
            assert torch.equal(layer.B[j], sd[f"transformer.{name}.lora_B.expert_{j}.weight"].t())
        assert torch.equal(layer.gate.weight, sd[f"transformer.{name}.lora_route.weight"])
    plain = {k for k in sd if ".expert_" not in k and "lora_route" not in k}
    assert set(adapter.lora) == plain
    assert all(p.scale == 1.0 for p in adapter.lora_parts())
    assert len(adapter.config.layers) * (2 * N + 1) + len(plain) == len(sd)

    ours = tmp_path / "ours.safetensors"
    adapter.save(ours)
    back = im.load_adapter(ours)
    assert back.config == adapter.config and back.adapter_id == adapter.adapter_id
    assert back.metadata.get("converted_from") == "icedit"
    for key, value in adapter.tensors().items():
        assert torch.equal(back.tensors()[key], value)
    other = convert_icedit(icedit_state_dict(transformer, seed=1))
    assert other.adapter_id != adapter.adapter_id  # token-only adapters still get distinct ids
    with pytest.raises(im.AdapterError, match="no instruction council"):
        adapter.route(torch.zeros(1, 4, 1), torch.zeros(1, 1))


def test_kontext_shaped_model_is_refused(tmp_path):
    adapter = convert_icedit(icedit_state_dict(fill_flux(), plain=False))
    with pytest.raises(im.AttachError, match=r"64 image input channels.*FLUX.1 Fill \[dev\] \(384\)"):
        im.attach(tiny_flux(seed=0), adapter)
    path = tmp_path / "icedit.safetensors"
    write_icedit(path, fill_flux())
    with pytest.raises(im.AdapterError, match=r"ICEdit MoE-LoRA, made for 'flux\.1-fill-dev'"):
        im.load_adapter(path, expect_base="flux.1-kontext-dev")


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text and isinstance(err.value, im.InstructMoLEError)
    return text


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda sd: sd.update({"transformer.x_embedder.lokr_w1": torch.zeros(2)}), "'transformer.x_embedder.lokr_w1'"),
        (
            lambda sd: sd.update({"unet.foo.weight": torch.zeros(2), "zzz": torch.zeros(1)}),
            "'unet.foo.weight' \\(and 1 more\\) is not part of an ICEdit MoE-LoRA",
        ),
        (lambda sd: sd.pop("transformer.transformer_blocks.0.ff.net.2.lora_route.weight"), "have no 'transformer"),
        (lambda sd: sd.pop("transformer.transformer_blocks.1.ff.net.2.lora_B.expert_2.weight"), "no matching"),
        (
            lambda sd: [sd.pop(f"transformer.transformer_blocks.0.ff.net.2.lora_{x}.expert_1.weight") for x in "AB"],
            "lacks expert 1",
        ),
        (
            lambda sd: sd.update(
                {"transformer.transformer_blocks.0.ff.net.2.lora_route.weight": torch.zeros(N + 1, 128)}
            ),
            r"must be \[4, 128\]",
        ),
        (
            lambda sd: sd.update({"transformer.transformer_blocks.0.ff.net.2.lora_A.expert_0.weight": torch.zeros(5)}),
            "lora_A must be",
        ),
        (
            lambda sd: sd.update(
                {"transformer.transformer_blocks.0.ff.net.2.lora_A.expert_0.weight": torch.zeros(3, 7)}
            ),
            "differ in shape",
        ),
        (
            lambda sd: sd.update(
                {"transformer.transformer_blocks.0.ff.net.2.lora_B.expert_0.weight": torch.nan * torch.ones(32, 3)}
            ),
            "holds NaN",
        ),
    ],
)
def test_bad_files_give_one_clear_sentence(tmp_path, edit, message):
    sd = icedit_state_dict(fill_flux())
    edit(sd)
    with pytest.raises(im.AdapterError) as err:
        convert_icedit(sd, source="bad.safetensors")
    assert _one_line(err).startswith("bad.safetensors: ")
    assert re.search(message, str(err.value)), str(err.value)
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(im.AdapterError, match=message):
        im.load_adapter(path)


def test_top_k_and_token_weights_are_checked():
    sd = icedit_state_dict(fill_flux(), plain=False)
    for k in (0, N + 1, "1", True):
        with pytest.raises(im.AdapterError, match="top_k="):
            convert_icedit(sd, top_k=k)
    cfg = convert_icedit(sd).config
    with pytest.raises(im.ConfigError, match="token_weights='softmax' must be one of"):
        im.MoLEConfig.from_dict({**cfg.to_dict(), "token_weights": "softmax"})
    data = cfg.to_dict()
    assert json.loads(cfg.to_json())["token_weights"] == "renormalised"
    del data["token_weights"]  # files written before the option: the reference's weights
    assert im.MoLEConfig.from_dict(data).token_weights == "probs"


def test_token_route_renormalised_weights():
    g = torch.Generator().manual_seed(0)
    x, gate = torch.randn(2, 5, 8, generator=g), torch.randn(4, 8, generator=g)
    probs, idx, w = token_route(x, gate, 2)
    probs_r, idx_r, w_r = token_route(x, gate, 2, renormalise=True)
    assert torch.equal(idx, idx_r) and torch.equal(probs, probs_r)
    torch.testing.assert_close(w_r, w / w.sum(-1, keepdim=True))
    torch.testing.assert_close(w_r, torch.gather(x @ gate.t(), -1, idx).softmax(-1))
    assert torch.equal(token_route(x, gate, 1, renormalise=True)[2], torch.ones(2, 5, 1))


def test_training_path_uses_the_same_weights():
    transformer = fill_flux()
    sd = icedit_state_dict(transformer, plain=False)
    adapter = convert_icedit(sd, top_k=2)
    inputs = fill_inputs(batch=1)
    with im.attach(transformer, adapter):
        want = run(transformer, inputs)
    adapter.model.train()
    with im.attach(transformer, adapter, training=True) as handle:
        got = transformer(**inputs)[0]
        losses = handle.runtime.aux_losses()
    torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)
    got.sum().backward()
    assert adapter.model.layer(adapter.config.layer_names[0]).gate.weight.grad is not None
    assert torch.isfinite(losses.load_balance_token) and float(losses.load_balance) == 0.0


def test_cli_inspect_and_convert(tmp_path, capsys):
    path = tmp_path / "icedit.safetensors"
    write_icedit(path, fill_flux())
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["base_model"] == ICEDIT_BASE and info["config"]["token_weights"] == "renormalised"
    assert {layer["routing"] for layer in info["layers"]} == {"token"}
    out = tmp_path / "converted.safetensors"
    assert main(["convert", str(path), str(out), "--top-k", "2"]) == 0
    assert "token-routed layers" in capsys.readouterr().out
    converted = im.load_adapter(out)
    assert (
        converted.config.top_k == 2
        and converted.config == convert_icedit(icedit_state_dict(fill_flux()), top_k=2).config
    )
    assert main(["convert", str(path), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(path), str(tmp_path / "o.safetensors"), "--alpha", "2"]) == 2
    assert "--alpha does not apply" in capsys.readouterr().err
    assert main(["convert", str(out), str(tmp_path / "again.safetensors")]) == 2
    assert "already an InstructMoLE adapter" in capsys.readouterr().err
    assert main(["convert", str(path), str(path), "--overwrite"]) == 2
    assert "the ICEdit file the conversion reads" in capsys.readouterr().err


def test_benchmark_quick_agrees():
    from benchmarks import icedit

    result = icedit.main(["--quick"])
    assert all(r["max_abs_diff"] < 1e-4 for r in result["results"].values())
