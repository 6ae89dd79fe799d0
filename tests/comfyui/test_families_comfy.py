"""Qwen-Image-Edit-2511 and FLUX.2 [klein] in ComfyUI compute what the diffusers host computes.

For each family, a tiny diffusers transformer (``instructmole.tiny_families``) and its ComfyUI twin
(``comfy_tiny_families.py``: ComfyUI's own model class, the same weights) first agree without an
adapter, a reference image included; then, with a random adapter of that family (experts, router
from the text alone, a plain-LoRA part on fused and unfused layers):

* a fixed council: the diffusers ``attach`` == ComfyUI ``apply_council`` fixed == merged (fp32
  rounding: 1e-4 on outputs of about 1; merged folds the council into the weights, a sum in
  another order), strengths included;
* auto routing from the model's own features (Qwen-Image: its text and attention mask; FLUX.2: its
  text) equals the diffusers ``attach``'s auto routing from the same features and mask (its
  ``encoder_hidden_states_mask``): councils to 1e-5, outputs to 1e-4;
* the exact signal a conditioning carries (text features + ``MASK_KEY``, no pooled vector) is used
  when present and equals the diffusers ``handle.set_signal``, also inside a real KSampler run
  (where ComfyUI pads FLUX.2's text with zero tokens); a conditioning edited after it was encoded
  falls back to its own features, row by row;
* a Kontext adapter on these models, and their adapters on FLUX.1 or on each other, are one
  sentence, and the model is left untouched;
* two patched clones in one graph never share routing, and the base model stays bit for bit.

Skipped with the reason where the installed ComfyUI lacks the family (``family_missing``: v0.3.64
has no FLUX.2 and no Qwen-Image-Edit-2511), and for Qwen-Image where its model ignores the text
attention mask (v0.8.0), so that nothing would compare.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

import instructmole as im

from .comfy_tiny_families import (
    comfy_flux2_from_diffusers,
    comfy_qwen_from_diffusers,
    family_missing,
    qwen_reads_text_mask,
    run_comfy_family,
    run_diffusers_flux2,
    run_diffusers_qwen,
)

ATOL = 1e-4
FAMILY_KEYS = ("qwen_image", "flux2")
# The plain-LoRA part of each family's test adapter: a fused slice, a fused Linear, an unfused one.
LORA_LAYERS = {
    "qwen_image": ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.img_mlp.net.2", "img_in"),
    "flux2": (
        "transformer_blocks.0.attn.to_k",
        "single_transformer_blocks.1.attn.to_qkv_mlp_proj",
        "transformer_blocks.1.ff.linear_in",
        "x_embedder",
    ),
}
TITLES = {"qwen_image": "Qwen-Image", "flux2": "FLUX.2"}


@dataclasses.dataclass
class Case:
    """One family: its diffusers model and ComfyUI twin, two adapter files, and the forward of each side.

    The ComfyUI side loads the files through the pack (InstructMoLE Load Adapter), the diffusers side
    through the core (``instructmole.load_adapter``): the same file, each host's own objects.
    """

    key: str
    nodes: Any
    transformer: Any
    base: Any  # the ComfyUI ModelPatcher
    files: tuple[str, str]  # the adapter (with a plain-LoRA part) and a second one, in models/instructmole
    adapters: tuple[im.Adapter, im.Adapter]  # the same files loaded by the core, for the diffusers side
    text_dim: int
    make_inputs: Callable[[int, int], dict[str, Any]]

    def inputs(self, batch: int, seed: int = 1) -> dict[str, Any]:
        return self.make_inputs(batch, seed)

    def load(self, which: int = 0, lora: float = 1.0, experts: float = 1.0, model: Any = None) -> tuple[Any, Any]:
        """``(patched MODEL, the pack's adapter)`` from InstructMoLE Load Adapter."""
        out = self.nodes.loaders.LoadAdapter.execute(model or self.base, self.files[which], lora, experts)
        return out.result

    def comfy(self, model: Any, x: dict[str, Any], extra: dict | None = None) -> torch.Tensor:
        return run_comfy_family(model, **x, extra=extra)

    def diffusers(self, x: dict[str, Any]) -> torch.Tensor:
        if self.key == "qwen_image":
            return run_diffusers_qwen(self.transformer, **x)
        return run_diffusers_flux2(self.transformer, **{k: v for k, v in x.items() if k != "mask"})

    def diffusers_with(
        self, x: dict[str, Any], council: Any = None, signal: tuple | None = None, which: int = 0, **attach: Any
    ) -> tuple[torch.Tensor, im.Council | None]:
        """The diffusers forward under the core's ``attach``: auto (routed from the forward's own text
        and mask), from ``signal`` (``handle.set_signal(text, None, mask)``), or serving ``council`` (a
        council of either host); with the councils it routed."""
        council = None if council is None else im.Council.from_dict(council.to_dict())
        with im.attach(self.transformer, self.adapters[which], council=council, **attach) as handle:
            if signal is not None:
                handle.set_signal(*signal)
            return self.diffusers(x), handle.last_council


def route(adapter: Any, text: torch.Tensor, mask: torch.Tensor | None) -> Any:
    """``adapter``'s councils for these text features and instruction tokens (no pooled vector)."""
    return adapter.route(text.float(), None, mask=None if mask is None else mask.bool())


def first_row(x: dict[str, Any], key: str, rows: slice) -> torch.Tensor | None:
    return None if x[key] is None else x[key][rows]


def assert_same_councils(got: Any, want: Any) -> None:
    """The same experts, with the same weights to fp32 rounding (one batch routed against another)."""
    assert torch.equal(got.weights > 0, want.weights > 0)
    torch.testing.assert_close(got.weights, want.weights, atol=1e-5, rtol=0)


def _qwen_inputs(batch: int, seed: int) -> dict[str, Any]:
    """Qwen-Image: 5-D latents, Qwen2.5-VL-like text [B, 10, 48] with row 0 padded after 7 tokens."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, 10, dtype=torch.long)
    mask[0, 7:] = 0
    return {
        "latents": torch.randn(batch, 16, 1, 8, 12, generator=g),
        "sigma": torch.linspace(0.9, 0.3, batch),
        "text": torch.randn(batch, 10, 48, generator=g),
        "mask": mask,
        "ref_latent": torch.randn(batch, 16, 1, 8, 8, generator=g),
    }


def _flux2_inputs(batch: int, seed: int) -> dict[str, Any]:
    """FLUX.2: [B, 128, H, W] latents (patch 1), stacked-LLM-like text [B, 10, 96], no mask."""
    g = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(batch, 128, 4, 6, generator=g),
        "sigma": torch.linspace(0.9, 0.3, batch),
        "text": torch.randn(batch, 10, 96, generator=g),
        "mask": None,
        "ref_latent": torch.randn(batch, 128, 4, 4, generator=g),
    }


def _adapter(transformer: Any, seed: int, lora: tuple[str, ...] = ()) -> im.Adapter:
    from instructmole.tiny_families import tiny_family_config
    from tests.helpers import randomize

    torch.manual_seed(seed)
    adapter = randomize(im.Adapter(im.InstructMoLE(tiny_family_config(transformer), init="lora")), seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    for name in lora:
        mod = transformer.get_submodule(name)
        adapter.lora[f"transformer.{name}.lora_A.weight"] = torch.randn(2, mod.in_features, generator=g) * 0.2
        adapter.lora[f"transformer.{name}.lora_B.weight"] = torch.randn(mod.out_features, 2, generator=g) * 0.2
        adapter.lora[f"transformer.{name}.alpha"] = torch.tensor(4.0)
    return adapter


@pytest.fixture(scope="module", params=FAMILY_KEYS)
def case(request: pytest.FixtureRequest, instructmole_pack: Any) -> Case:
    import folder_paths

    why = family_missing(request.param)
    if why is not None:
        pytest.skip(why)
    from instructmole.tiny_families import tiny_flux2, tiny_qwen_image

    nodes = instructmole_pack.nodes
    nodes.common.register_folder()
    folder = folder_paths.get_folder_paths("instructmole")[0]
    os.makedirs(folder, exist_ok=True)
    if request.param == "qwen_image":
        transformer, make, twin, text_dim = tiny_qwen_image(0), _qwen_inputs, comfy_qwen_from_diffusers, 48
    else:  # ComfyUI's Flux embeds the timestep in 256 channels (as the released FLUX.2 does)
        transformer = tiny_flux2(0)
        make, twin, text_dim = _flux2_inputs, comfy_flux2_from_diffusers, 96
    base = twin(transformer)
    if request.param == "qwen_image" and not qwen_reads_text_mask(base):
        pytest.skip("this ComfyUI's Qwen-Image ignores the text attention mask (diffusers masks the padding)")
    files = (f"{request.param}.safetensors", f"{request.param}_second.safetensors")
    paths = [
        _adapter(transformer, 3, LORA_LAYERS[request.param]).save(os.path.join(folder, files[0])),
        _adapter(transformer, 11).save(os.path.join(folder, files[1])),
    ]
    return Case(
        key=request.param,
        nodes=nodes,
        transformer=transformer,
        base=base,
        files=files,
        adapters=(im.load_adapter(paths[0]), im.load_adapter(paths[1])),
        text_dim=text_dim,
        make_inputs=make,
    )


def _signal(case: Case, contexts: torch.Tensor, texts: torch.Tensor, masks: torch.Tensor) -> list[dict]:
    """Each row's conditioning as InstructMoLE Text Encode leaves it: ComfyUI's own features with the
    exact signal (text features + instruction mask, no pooled vector) attached by ``attach_signal``."""
    return [
        case.nodes.signal.attach_signal([[contexts[i : i + 1], {}]], texts[i : i + 1], None, masks[i : i + 1])[0]
        for i in range(contexts.shape[0])
    ]


def _as_model_kwargs(conditionings: list) -> dict[str, torch.Tensor]:
    """The rows' ``model_conds`` as the model receives them after ComfyUI's ``cond_cat``."""
    keys = conditionings[0][1]["model_conds"].keys()
    return {k: torch.cat([c[1]["model_conds"][k].cond for c in conditionings]) for k in keys}


def _exact_signal(case: Case, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An exact signal of 24 tokens: a chat template's 3 tokens and the padding after the instruction masked."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, 24, case.text_dim, generator=g)
    mask = torch.zeros(batch, 24, dtype=torch.bool)
    for row in range(batch):
        mask[row, 3 : 12 + 4 * row] = True
    return text, mask


# ---- the base model -----------------------------------------------------------------------------


def test_twin_matches_diffusers_with_a_reference_image(case: Case) -> None:
    x = case.inputs(2)
    ours, theirs = case.comfy(case.base, x), case.diffusers(x)
    assert ours.shape == theirs.shape == x["latents"].shape
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    assert (ours[0] - ours[1]).abs().max() > 1e-2  # per-row conditioning, not row 0 broadcast
    no_ref = dict(x, ref_latent=None)
    without = case.comfy(case.base, no_ref)
    assert (ours - without).abs().max() > 1e-4  # the reference tokens take part
    torch.testing.assert_close(without, case.diffusers(no_ref), atol=ATOL, rtol=0)


# ---- fixed, merged, auto ------------------------------------------------------------------------


def test_fixed_council_equals_diffusers_and_merged(case: Case) -> None:
    runtime = case.nodes.runtime
    x = case.inputs(2, seed=5)
    auto, adapter = case.load()
    council = route(adapter, x["text"][1:], first_row(x, "mask", slice(1, 2)))
    fixed = runtime.apply_council(auto, council, "fixed")
    merged = runtime.apply_council(auto, council, "merged")
    got_fixed, got_merged = case.comfy(fixed, x), case.comfy(merged, x)
    torch.testing.assert_close(got_fixed, case.diffusers_with(x, council)[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(got_merged, got_fixed, atol=ATOL, rtol=0)
    torch.testing.assert_close(got_merged, case.diffusers_with(x, council, mode="merged")[0], atol=ATOL, rtol=0)
    assert (got_fixed - case.comfy(case.base, x)).abs().max() > 1e-3  # the adapter really acts
    assert merged.get_attachment("instructmole").dynamic_placements == []  # folded: no term per forward
    # The plain-LoRA part went through ComfyUI's LoRA loader, one weight patch per layer it names.
    assert len({k if isinstance(k, str) else k[0] for k in auto.patches}) == len(LORA_LAYERS[case.key])


def test_auto_routes_each_row_from_the_models_own_features(case: Case) -> None:
    """Without a carried signal both hosts route from what the model reads: Qwen-Image's text and
    attention mask (the diffusers ``encoder_hidden_states_mask``), FLUX.2's text."""
    x = case.inputs(2, seed=6)
    model, adapter = case.load()
    got = case.comfy(model, x)
    runtime = model.get_attachment("instructmole")
    want, want_council = case.diffusers_with(x)  # the diffusers attach, auto
    assert runtime.last_exact is False and runtime.last_council.batch_size == 2
    assert_same_councils(runtime.last_council, want_council)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    routed = route(adapter, x["text"], x["mask"])  # the pack's Route path: one batch, one routing function
    assert torch.equal(runtime.last_council.weights, routed.weights)
    assert not torch.equal(routed.weights[0] > 0, routed.weights[1] > 0)  # the rows chose differently
    patch = 2 if case.key == "qwen_image" else 1
    assert runtime.last_layout.grid == (x["latents"].shape[-2] // patch, x["latents"].shape[-1] // patch)
    if case.key == "qwen_image":  # the attention mask is read: row 0 routes otherwise without it
        assert not torch.allclose(route(adapter, x["text"], None).weights[0], routed.weights[0])


def test_zero_padding_in_front_is_not_read(case: Case) -> None:
    """ComfyUI pads FLUX.2's text to 512 tokens with zeros in front: routing from the model's own
    features leaves those out, so a padded prompt routes as the unpadded one."""
    x = case.inputs(1, seed=14)
    model, _ = case.load()
    case.comfy(model, x)
    plain = model.get_attachment("instructmole").last_council
    pad = torch.zeros(1, 7, x["text"].shape[-1])
    padded = dict(x, text=torch.cat([pad, x["text"]], dim=1))
    if x.get("mask") is not None:
        padded["mask"] = torch.cat([torch.ones(1, 7, dtype=x["mask"].dtype), x["mask"]], dim=1)
    case.comfy(model, padded)
    assert_same_councils(model.get_attachment("instructmole").last_council, plain)


def test_strengths(case: Case) -> None:
    x = case.inputs(2, seed=7)
    model, adapter = case.load(lora=0.5, experts=2.0)
    council = route(adapter, x["text"][:1], first_row(x, "mask", slice(0, 1)))
    fixed = case.nodes.runtime.apply_council(model, council, "fixed")
    want, _ = case.diffusers_with(x, council, expert_strength=2.0, lora_strength=0.5)
    torch.testing.assert_close(case.comfy(fixed, x), want, atol=ATOL, rtol=0)
    off, _ = case.load(lora=0.0, experts=0.0)
    torch.testing.assert_close(case.comfy(off, x), case.comfy(case.base, x), atol=ATOL, rtol=0)


# ---- the carried exact signal -------------------------------------------------------------------


def test_the_carried_exact_signal_is_used(case: Case) -> None:
    signal = case.nodes.signal
    x = case.inputs(2, seed=8)
    text, mask = _exact_signal(case, 2, seed=9)
    kwargs = _as_model_kwargs(_signal(case, x["text"], text, mask))
    assert signal.MASK_KEY in kwargs and signal.CHECK_KEY in kwargs and signal.POOLED_KEY not in kwargs
    model, adapter = case.load()
    got = case.comfy(model, x, extra=kwargs)
    runtime = model.get_attachment("instructmole")
    assert runtime.last_exact is True and runtime.last_exact_rows == (True, True)
    want, want_council = case.diffusers_with(x, signal=(text, None, mask))  # diffusers: handle.set_signal
    assert_same_councils(runtime.last_council, want_council)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    routed = route(adapter, text, mask)
    assert torch.equal(runtime.last_council.weights, routed.weights)
    # The mask is part of the signal: without it the same features route otherwise.
    assert not torch.allclose(route(adapter, text, None).weights, routed.weights)


def test_a_conditioning_edited_after_encode_falls_back_row_by_row(case: Case) -> None:
    """Row 0's conditioning went through ConditioningZeroOut after Text Encode (its model_conds, the
    signal with them, are copied unchanged); row 1's was not: row 0 routes from its own (zero)
    features, row 1 from its exact signal, in one forward."""
    import nodes as comfy_nodes

    x = case.inputs(2, seed=10)
    text, mask = _exact_signal(case, 2, seed=11)
    rows = _signal(case, x["text"], text, mask)
    rows[0] = comfy_nodes.ConditioningZeroOut().zero_out([rows[0]])[0][0]
    x = dict(x, text=torch.cat([rows[0][0], rows[1][0]]))
    model, adapter = case.load()
    got = case.comfy(model, x, extra=_as_model_kwargs(rows))
    runtime = model.get_attachment("instructmole")
    assert runtime.last_exact_rows == (False, True) and runtime.last_exact is False
    # Its own features are all zero: no token is read (ComfyUI's zero padding is left out the same way).
    given = first_row(x, "mask", slice(0, 1))
    real = x["text"][:1].abs().amax(dim=-1) > 0
    own = route(adapter, x["text"][:1], real if given is None else given.bool() & real)
    exact = route(adapter, text[1:], mask[1:])
    assert_same_councils(runtime.last_council.row(0), own)
    assert_same_councils(runtime.last_council.row(1), exact)
    torch.testing.assert_close(got, case.diffusers_with(x, runtime.last_council)[0], atol=ATOL, rtol=0)


def test_sampling_uses_the_exact_signal(case: Case) -> None:
    """A real KSampler run under CFG: ComfyUI builds the model's conds itself (FLUX.2 pads the text to
    512 tokens with zeros in front, Qwen-Image hands on the conditioning's attention mask), and each
    row still routes from its own conditioning's exact signal."""
    import nodes as comfy_nodes

    model, adapter = case.load()
    runtime = model.get_attachment("instructmole")
    g = torch.Generator().manual_seed(12)
    text, mask = _exact_signal(case, 2, seed=13)
    conds = []
    for row in range(2):
        extras: dict[str, Any] = {"pooled_output": None}  # as ComfyUI's text encoders give it: no pooled vector
        if case.key == "qwen_image":
            extras["attention_mask"] = torch.ones(1, 6, dtype=torch.long)
        cond = [[torch.randn(1, 6, case.text_dim, generator=g), extras]]
        conds.append(case.nodes.signal.attach_signal(cond, text[row : row + 1], None, mask[row : row + 1]))
    seen = []
    begin = runtime.begin

    def spy(x, context, fourth, options, kwargs):
        begin(x, context, fourth, options, kwargs)
        cond_or_uncond = tuple(options.get("cond_or_uncond") or ())
        seen.append((cond_or_uncond, context.shape[1], runtime.last_exact_rows, runtime.last_council))

    runtime.begin = spy
    try:
        latent = {"samples": torch.zeros(1, 16 if case.key == "qwen_image" else 128, 8, 8)}
        comfy_nodes.common_ksampler(model, 1, 2, 2.0, "euler", "simple", conds[0], conds[1], latent)
    finally:
        del runtime.begin
    assert len(seen) == 2  # two steps, the positive and the negative row in one forward each
    want = {0: route(adapter, text[:1], mask[:1]), 1: route(adapter, text[1:], mask[1:])}
    for cond_or_uncond, tokens, exact_rows, council in seen:
        assert exact_rows == (True, True) and sorted(cond_or_uncond) == [0, 1]
        assert tokens == (512 if case.key == "flux2" else 6)  # FLUX.2: padded, and still matching
        for row, which in enumerate(cond_or_uncond):
            assert_same_councils(council.row(row), want[which])


# ---- refusals and isolation ---------------------------------------------------------------------


def _untouched(model: Any) -> tuple:
    """What patching would change on a MODEL: its attachment, weight patches and wrappers."""
    wrappers = {kind: {key: list(fns) for key, fns in by_key.items()} for kind, by_key in model.wrappers.items()}
    return model.get_attachment("instructmole"), dict(model.patches), wrappers


def test_adapters_of_another_family_are_refused_in_one_sentence(case: Case) -> None:
    """Through InstructMoLE Load Adapter: the node names its input, then one sentence naming the model
    to load; the MODEL given is left as it was (no attachment, weight patch or wrapper; same output)."""
    import folder_paths

    from instructmole.tiny import tiny_flux
    from instructmole.tiny_families import tiny_flux2, tiny_qwen_image
    from tests.helpers import random_adapter

    from .comfy_tiny import comfy_flux_from_diffusers

    error = case.nodes.common.NodeInputError
    prefix = "InstructMoLE Load Adapter, input 'model': "
    kontext = "kontext_refused.safetensors"
    random_adapter(tiny_flux(0), seed=2).save(os.path.join(folder_paths.get_folder_paths("instructmole")[0], kontext))
    x = case.inputs(1, seed=14)
    before, state = case.comfy(case.base, x), _untouched(case.base)
    with pytest.raises(error) as err:
        case.nodes.loaders.LoadAdapter.execute(case.base, kontext, 1.0, 1.0)
    assert str(err.value) == (
        f"{prefix}this is a {TITLES[case.key]} model, but the adapter was made for FLUX.1 Kontext [dev]; "
        "load FLUX.1 Kontext [dev]"
    )
    assert _untouched(case.base) == state and torch.equal(case.comfy(case.base, x), before)

    title = case.adapters[0].config.base_model
    title = im.families.FAMILIES[title].title
    others = {"flux1": (comfy_flux_from_diffusers(tiny_flux(0)), "FLUX.1")}
    other_key = "flux2" if case.key == "qwen_image" else "qwen_image"
    if family_missing(other_key) is None:
        twin = (
            comfy_flux2_from_diffusers(tiny_flux2(0))
            if other_key == "flux2"
            else comfy_qwen_from_diffusers(tiny_qwen_image(0))
        )
        others[other_key] = (twin, TITLES[other_key])
    for model, arch_title in others.values():
        state = _untouched(model)
        with pytest.raises(error) as err:
            case.load(model=model)
        assert (
            str(err.value)
            == f"{prefix}this is a {arch_title} model, but the adapter was made for {title}; load {title}"
        )
        assert _untouched(model) == state


def test_two_patched_clones_never_share_routing(case: Case) -> None:
    x = case.inputs(2, seed=15)
    before = case.comfy(case.base, x)
    first, _ = case.load(0)
    second, second_adapter = case.load(1)
    solo_first, solo_second = case.comfy(first, x), case.comfy(second, x)
    assert (solo_first - solo_second).abs().max() > 1e-3
    torch.testing.assert_close(case.comfy(first, x), solo_first, atol=0, rtol=0)
    torch.testing.assert_close(case.comfy(second, x), solo_second, atol=0, rtol=0)
    runtimes = first.get_attachment("instructmole"), second.get_attachment("instructmole")
    assert runtimes[0] is not runtimes[1] and runtimes[0].core is not runtimes[1].core
    assert runtimes[0].last_council.adapter_id != runtimes[1].last_council.adapter_id
    want = route(second_adapter, x["text"], x["mask"])
    assert torch.equal(runtimes[1].last_council.weights, want.weights)
    torch.testing.assert_close(solo_second, case.diffusers_with(x, which=1)[0], atol=ATOL, rtol=0)
    assert torch.equal(case.comfy(case.base, x), before)  # the base MODEL, bit for bit
