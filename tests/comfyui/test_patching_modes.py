"""Every way ComfyUI patches and runs a MODEL keeps both the adapter's term and a stacked LoRA's.

The reference is independent of ComfyUI's patching machinery: a second tiny Flux whose weights
already hold the LoRA (W0 + ΔW written into the twin before it is built). On it, the adapter alone
gives ``ref_both`` and the bare model ``ref_lora``; on the plain base, the adapter alone gives
``ref_adapter``. Each mode below stacks the LoRA through ComfyUI (a weight patch before or after our
loader, a hook LoRA on the conditioning in both hook modes, and the non-dynamic delegate that
v0.33's sampler swaps in for a hooked conditioning under dynamic VRAM) and must give, after a real
KSampler run:

* the adapter's effect, ``both - lora_only``, equal to ``ref_both - ref_lora``;
* the LoRA's effect, ``both - adapter_only``, equal to ``ref_both - ref_adapter``;

to fp32 rounding, and must leave the base MODEL bit for bit as it was.
"""

from __future__ import annotations

import copy
import types
from typing import Any

import pytest
import torch

from .comfy_tiny import comfy_flux_from_diffusers
from .test_patched_model import load

# The LoRA targets two of the adapter's own layers (where an adapter that bypasses the weights the
# sampler really runs would drop it) and one layer the adapter does not touch.
LORA_LAYERS = (
    "transformer_blocks.0.ff.net.2",
    "single_transformer_blocks.0.proj_out",
    "transformer_blocks.1.attn.to_q",
)
RANK, ALPHA = 2, 4.0
ATOL = 2e-5


def lora_state_dict(transformer: Any, seed: int = 21) -> dict[str, torch.Tensor]:
    """A diffusers-format LoRA on ``LORA_LAYERS`` (the keys ComfyUI's LoRA loader reads)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in LORA_LAYERS:
        mod = transformer.get_submodule(name)
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(RANK, mod.in_features, generator=g) * 0.3
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(mod.out_features, RANK, generator=g) * 0.3
        sd[f"transformer.{name}.alpha"] = torch.tensor(ALPHA)
    return sd


def merged_twin(transformer: Any, lora: dict[str, torch.Tensor]) -> Any:
    """The diffusers twin with the LoRA written into its weights."""
    merged = copy.deepcopy(transformer)
    with torch.no_grad():
        for name in LORA_LAYERS:
            up, down = lora[f"transformer.{name}.lora_B.weight"], lora[f"transformer.{name}.lora_A.weight"]
            merged.get_submodule(name).weight += (up @ down) * (ALPHA / RANK)
    return merged


def cond(seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 16, 64, generator=g), {"pooled_output": torch.randn(1, 32, generator=g), "guidance": 3.5}]]


def sample(model: Any, positive: list) -> torch.Tensor:
    """Two Euler steps of KSampler at cfg 1 (only the positive runs), seeded."""
    import nodes as comfy_nodes

    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    return comfy_nodes.common_ksampler(model, 7, 2, 1.0, "euler", "simple", positive, cond(99), latent)[0]["samples"]


def with_lora(model: Any, lora: dict[str, torch.Tensor]) -> Any:
    """The LoRA as core LoraLoaderModelOnly applies it: ComfyUI weight patches on a clone."""
    import comfy.sd

    return comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)[0]


def hooked(positive: list, lora: dict[str, torch.Tensor]) -> list:
    """The LoRA as Create Hook LoRA + Set Model Hooks on Cond put it on a conditioning."""
    import comfy.hooks

    return comfy.hooks.set_hooks_for_conditioning(positive, comfy.hooks.create_hook_lora(lora, 1.0, 0.0))


def as_dynamic_vram(model: Any, monkeypatch: pytest.MonkeyPatch) -> list:
    """Make ``model`` answer as ``ModelPatcherDynamic`` does, so the sampler swaps in its non-dynamic
    delegate for a hooked conditioning (``CFGGuider.inner_set_conds``) exactly as on NVIDIA: the
    delegate comes from ``clone(disable_dynamic=True)``, a fresh model built by the base's
    ``cached_patcher_init`` with the patches, wrappers and attachments copied over. Returns the
    delegates made."""
    import comfy.model_patcher

    made: list = []
    delegate = comfy.model_patcher.ModelPatcherDynamic.get_non_dynamic_delegate

    def get_non_dynamic_delegate(self: Any) -> Any:
        made.append(delegate(self))
        return made[-1]

    monkeypatch.setattr(model, "is_dynamic", lambda: True)
    model.non_dynamic_delegate_model = None
    model.get_non_dynamic_delegate = types.MethodType(get_non_dynamic_delegate, model)
    return made


MODES = ["lora_before", "lora_after", "hook_max_speed", "hook_min_vram", "hook_dynamic_delegate"]


@pytest.fixture(scope="module")
def lora_setup(setup: dict[str, Any]) -> dict[str, Any]:
    lora = lora_state_dict(setup["transformer"])
    twin = comfy_flux_from_diffusers(merged_twin(setup["transformer"], lora))
    nodes = setup["nodes"]
    positive = cond(5)
    ref_adapter = sample(load(setup, lora=0.0)[0], positive)
    ref_lora = sample(twin, positive)
    ref_both = sample(nodes.loaders.LoadAdapter.execute(twin, "tiny.safetensors", 0.0, 1.0).result[0], positive)
    return {"lora": lora, "positive": positive, "ref_adapter": ref_adapter, "ref_lora": ref_lora, "ref_both": ref_both}


@pytest.mark.parametrize("mode", MODES)
def test_adapter_and_stacked_lora_each_keep_their_effect(setup, lora_setup, mode, monkeypatch):
    import comfy.hooks
    import comfy.model_patcher

    base, lora, positive = setup["base"], lora_setup["lora"], lora_setup["positive"]
    base_before = sample(base, positive)
    if mode == "hook_dynamic_delegate":
        if not hasattr(comfy.model_patcher, "ModelPatcherDynamic"):
            pytest.skip("this ComfyUI has no dynamic VRAM (ModelPatcherDynamic came in 2026)")
        base = base.clone()
        base.cached_patcher_init = (lambda disable_dynamic=False: comfy_flux_from_diffusers(setup["transformer"]), ())

    def adapter_on(model: Any) -> Any:
        return setup["nodes"].loaders.LoadAdapter.execute(model, "tiny.safetensors", 0.0, 1.0).result[0]

    delegates: list = []
    if mode == "lora_before":
        both, lora_only, adapter_only = adapter_on(with_lora(base, lora)), with_lora(base, lora), adapter_on(base)
        hooked_positive = positive
    elif mode == "lora_after":
        both, lora_only, adapter_only = with_lora(adapter_on(base), lora), with_lora(base, lora), adapter_on(base)
        hooked_positive = positive
    else:
        both, lora_only, adapter_only = adapter_on(base), base.clone(), adapter_on(base)
        hooked_positive = hooked(positive, lora)
        hook_mode = comfy.hooks.EnumHookMode.MinVram if mode == "hook_min_vram" else comfy.hooks.EnumHookMode.MaxSpeed
        for m in (both, lora_only):
            m.set_hook_mode(hook_mode)
        if mode == "hook_dynamic_delegate":
            delegates = as_dynamic_vram(both, monkeypatch)
            as_dynamic_vram(lora_only, monkeypatch)
    runtime = both.get_attachment("instructmole")
    ran_on: list = []
    install = runtime._install_forwards
    monkeypatch.setattr(runtime, "_install_forwards", lambda dm, done: ran_on.append(dm) or install(dm, done))

    out_both = sample(both, hooked_positive)
    out_lora = sample(lora_only, hooked_positive)
    out_adapter = sample(adapter_only, positive)

    adapter_effect, want_adapter = out_both - out_lora, lora_setup["ref_both"] - lora_setup["ref_lora"]
    lora_effect, want_lora = out_both - out_adapter, lora_setup["ref_both"] - lora_setup["ref_adapter"]
    assert want_adapter.abs().max() > 1e-3 and want_lora.abs().max() > 1e-3  # both really act
    torch.testing.assert_close(adapter_effect, want_adapter, atol=ATOL, rtol=0)
    torch.testing.assert_close(lora_effect, want_lora, atol=ATOL, rtol=0)
    if mode == "hook_dynamic_delegate":
        assert len(delegates) == 1  # the sampler really sampled on a delegate ...
        assert ran_on and all(dm is delegates[0].model.diffusion_model for dm in ran_on)  # ... and our term ran there
        assert delegates[0].model is not both.model
    else:
        assert ran_on and all(dm is both.model.diffusion_model for dm in ran_on)
    # Nothing of ours is left on any module, and the base MODEL is bit for bit what it was.
    for model in [both, *[d for d in delegates]]:
        assert not [n for n, mod in model.model.named_modules() if "forward" in mod.__dict__]
    assert torch.equal(sample(setup["base"], positive), base_before)
