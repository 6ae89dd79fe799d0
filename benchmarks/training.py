"""Cost of one InstructMoLE training step against a plain LoRA and the reference implementation's way.

Why: the design claims that the trainer's exact training path (the council output and the
Gram-form orthogonality loss both fed by ``P = X [A_1..A_N]``, never the ``N × tokens × out``
stack) makes a MoLE step cost about what a plain LoRA step of the same active rank costs, and
clearly less time and no more memory than the reference code, which materialises every expert's
output for every token. This script measures one training step (forward, backward, grad-norm clip,
AdamW step; batch 1, a target plus a same-size Kontext reference appended after it, gradient
checkpointing on) of three variants on one frozen random-weight Flux transformer, in one process,
interleaved round by round:

* ``ours``            exactly what ``training/`` runs: ``training.modules.setup_transformer`` (peft
                      LoRA on the reference's LoRA targets, checkpointing) and a
                      ``training.modules.TrainingModel`` (the core runtime in training mode: gate
                      noise, router dropout, council path, Gram-form orthogonality, load balancing);
                      trainable weights fp32 (bf16 autocast on CUDA); loss = flow MSE on the target
                      tokens + 0.1 · load balance + 0.01 · orthogonality (layers summed);
* ``plain LoRA``      the same peft LoRA, and on the MoLE layers a plain LoRA of rank ``k·r`` (the
                      active rank of a council) instead of the experts; no router; flow loss only;
* ``reference way``   the paper's code, rebuilt with forward hooks: the same router (an
                      ``InstructMoLE`` routed through ``MoLERuntime.route``), then every expert
                      computed for every token (the ``N × tokens × out`` stack, as ``dense_delta``),
                      the council weights applied densely, and each layer's orthogonality loss taken
                      from the materialised expert outputs (the formula of
                      ``orthogonality_loss_reference``, on the same stack); plus its own peft LoRA;
                      trainable weights in the base dtype (bf16 on CUDA), as the reference trains.

With ``--fp8-base`` a fourth measurement follows on a fresh transformer: ``ours`` with
``model.fp8_base`` (diffusers layerwise casting: frozen base Linears stored in float8, upcast per
layer). It needs its own transformer, so it runs after the others (not interleaved with them).

Memory. CUDA: ``torch.cuda.max_memory_allocated`` over each step (a variant's first, which creates
its AdamW state, excepted), with every other variant's trainable weights and optimizer state parked
on the CPU, so the peak is the variant's own (frozen base + its weights and AdamW state + inputs +
the step's activations and gradients). CPU: one untimed step per variant and size before any
timing, with glibc set from the start to return freed memory (mmap for every block ≥ 128 KiB,
heap trimmed before the step): the process's peak RSS during it (``VmHWM`` reset through
``/proc/self/clear_refs``) minus the RSS just before it is what the step itself allocates; the
"peak" column adds the frozen base's and the variant's own state bytes (counted from the tensors).
Timings use interleaved rounds and medians (``benchmarks/common.py``); on CPU the timed steps run
with glibc keeping freed memory (``common.keep_freed_memory``): fresh pages are slow to fault in on
these VMs, and by default how many a step takes depends on heap history, not on the variant. (The
memory steps come first because RSS measured after keep-freed mode is inflated by refaulting freed
heap chunks.)

Sizes: ``full`` is FLUX.1 Kontext (19 + 38 blocks, hidden 3072, T5 4096-d × 512 tokens) at 512²
and 1024² targets, built directly in bf16 (the CUDA default); ``scaled`` (the CPU default) is the
design's CPU stand-in of ``benchmarks/inference.py`` (4 + 8 blocks, hidden 1024, T5 4096-d × 256
tokens, plain-LoRA rank scaled with the hidden size) at 256 + 256 and 576 + 576 image tokens;
``tiny`` is ``instructmole.tiny``'s Flux, for the smoke test.

    PYTHONPATH=. .venv/bin/python -m benchmarks.training --device cpu --fp8-base
    PYTHONPATH=. python -m benchmarks.training --device cuda --fp8-base
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import math
import os
import shlex
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from instructmole import InstructMoLE, MoLEConfig
from instructmole.losses import balance_statistics, load_balancing_from_statistics
from instructmole.runtime import MoLERuntime
from instructmole.tiny import TINY_FLUX
from training.config import TrainConfig, load_config
from training.modules import TrainingModel, build_mole_config, setup_transformer

from .common import (
    environment,
    keep_freed_memory,
    log,
    markdown_table,
    median,
    random_flux,
    sync,
    timed,
    write_json,
)

__all__ = ["SIZES", "VARIANTS", "TrainShape", "TrainingBench", "main"]

VARIANTS = ("ours", "plain LoRA", "reference way")
FP8_NAME = "ours, fp8 base"
FULL_HIDDEN = 3072
REFERENCE_LORA_RANK = 256

# The trainer's recipe values this benchmark uses (training/config.py defaults).
LOAD_BALANCE, ORTHOGONALITY = 0.1, 0.01

# What the design asks of the trainer, and what it measured for the reference (DESIGN.md §4).
TARGETS = {
    "ours / reference way time": "<= 0.8 (H100, full size), with no more peak memory",
    "ours / plain LoRA time": "<= 1.10",
    "ours, fp8 base peak at 1024² + reference": "<= 24 GB (CUDA)",
}
ANCHORS = {
    "reference step, H100, 1024² + reference": (
        "2955 ms, 30.7 GB (LoRA r256 + MoLE, bf16 trainables, checkpointing, fwd+bwd, no optimizer)"
    ),
    "reference step, H100, 512² + reference": "932 ms, 26.9 GB",
}


@dataclass(frozen=True)
class TrainShape:
    """Transformer shape, token counts and adapter sizes of one benchmark setting."""

    name: str
    num_double: int
    num_single: int
    heads: int
    head_dim: int
    axes_dims_rope: tuple[int, int, int]
    text_dim: int  # T5 width (joint_attention_dim); also the router's text width
    pooled_dim: int  # CLIP pooled width; also the router's width
    text_tokens: int
    sides: tuple[int, ...]  # packed latent tokens per side of the target (and of the reference)
    in_channels: int = 64
    num_experts: int = 8
    top_k: int = 4
    rank: int = 32
    alpha: float = 32.0
    router_heads: int = 12
    router_head_dim: int = 64
    lora_rank: int = REFERENCE_LORA_RANK

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim


SIZES: dict[str, TrainShape] = {
    # FLUX.1 Kontext [dev]; 512² and 1024² targets are 32² and 64² packed tokens, each doubled by
    # the reference; T5 at the training length 512.
    "full": TrainShape(
        "full", 19, 38, 24, 128, (16, 56, 56), text_dim=4096, pooled_dim=768, text_tokens=512, sides=(32, 64)
    ),
    # benchmarks/inference.py's "scaled": 4 + 8 blocks, hidden 1024 (8 × 128), T5 4096 × 256, the
    # LoRA rank keeping the reference's rank / hidden (256 / 3072); experts and router as full.
    "scaled": TrainShape(
        "scaled",
        4,
        8,
        8,
        128,
        (16, 56, 56),
        text_dim=4096,
        pooled_dim=768,
        text_tokens=256,
        sides=(16, 24),
        lora_rank=max(4, round(REFERENCE_LORA_RANK * 1024 / FULL_HIDDEN)),
    ),
    # instructmole.tiny's Flux (2 + 2 blocks, hidden 32) with a tiny adapter: the smoke test.
    "tiny": TrainShape(
        "tiny",
        TINY_FLUX["num_layers"],
        TINY_FLUX["num_single_layers"],
        TINY_FLUX["num_attention_heads"],
        TINY_FLUX["attention_head_dim"],
        tuple(TINY_FLUX["axes_dims_rope"]),
        text_dim=TINY_FLUX["joint_attention_dim"],
        pooled_dim=TINY_FLUX["pooled_projection_dim"],
        text_tokens=8,
        sides=(4,),
        num_experts=4,
        top_k=2,
        rank=4,
        alpha=8.0,
        router_heads=2,
        router_head_dim=8,
        lora_rank=8,
    ),
}


def size_label(side: int) -> str:
    """``"1024² + ref (4096+4096 tok)"``: a packed token is 16 × 16 pixels (VAE 8×, 2×2 packing)."""
    return f"{side * 16}² + ref ({side * side}+{side * side} tok)"


# ---- the shared model and inputs ----------------------------------------------------------------


def build_transformer(shape: TrainShape, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """A random Kontext-shaped diffusers Flux transformer, built directly on ``device`` in ``dtype``."""
    return random_flux(shape, device, dtype, seed)


@contextlib.contextmanager
def _dummy_paths() -> Iterator[tuple[Path, Path]]:
    """A manifest file and a model folder that exist, for the config's path checks (nothing is read)."""
    with tempfile.TemporaryDirectory(prefix="instructmole-bench-") as tmp:
        manifest, folder = Path(tmp) / "manifest.jsonl", Path(tmp) / "model"
        manifest.write_text("")
        folder.mkdir()
        yield manifest, folder


def trainer_config(shape: TrainShape, dtype: torch.dtype, fp8_base: bool) -> TrainConfig:
    """The trainer's own config (``training.config.load_config``) for this shape."""
    name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    with _dummy_paths() as (manifest, folder):
        return load_config(
            None,
            [
                f"data.manifest={manifest}",
                f"model.pretrained={folder}",
                f"model.dtype={name}",
                f"model.fp8_base={'true' if fp8_base else 'false'}",
                "model.gradient_checkpointing=true",
                "adapter.targets=[reference]",
                f"adapter.num_experts={shape.num_experts}",
                f"adapter.top_k={shape.top_k}",
                f"adapter.rank={shape.rank}",
                f"adapter.alpha={shape.alpha}",
                f"adapter.router_heads={shape.router_heads}",
                f"adapter.router_head_dim={shape.router_head_dim}",
                f"adapter.text_length={shape.text_tokens}",
                f"adapter.lora.rank={shape.lora_rank}",
                f"adapter.lora.alpha={shape.lora_rank}",
            ],
        )


@dataclass
class StepInputs:
    """One micro-batch as ``TrainingModel.forward`` takes it (a fixed draw: timings do not depend on it)."""

    hidden_states: Tensor  # [b, 2n, 64]: noisy target tokens, then the reference's
    text: Tensor
    pooled: Tensor
    sigma: Tensor
    img_ids: Tensor
    txt_ids: Tensor
    guidance: Tensor
    target: Tensor  # [b, n, 64]: eps - x0 on the target tokens
    seeds: Tensor

    def as_kwargs(self) -> dict[str, Tensor]:
        return dict(vars(self))


def make_inputs(shape: TrainShape, side: int, device: torch.device, dtype: torch.dtype, seed: int) -> StepInputs:
    """Flow-matching inputs of one Kontext sample: x_t = (1 − σ)·x0 + σ·ε at σ = 0.5, target ε − x0."""
    g = torch.Generator().manual_seed(seed)
    n = side * side
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    ids = torch.stack([torch.zeros(n), rows.flatten().float(), cols.flatten().float()], -1)
    ref_ids = ids.clone()
    ref_ids[:, 0] = 1  # Kontext: the reference's first position coordinate is its index

    def rand(*s: int) -> Tensor:
        return torch.randn(*s, generator=g)

    x0, eps, reference = rand(1, n, shape.in_channels), rand(1, n, shape.in_channels), rand(1, n, shape.in_channels)
    sigma = 0.5
    return StepInputs(
        hidden_states=torch.cat([(1 - sigma) * x0 + sigma * eps, reference], 1).to(device, dtype),
        text=rand(1, shape.text_tokens, shape.text_dim).to(device, dtype),
        pooled=rand(1, shape.pooled_dim).to(device, dtype),
        sigma=torch.full((1,), sigma, device=device, dtype=dtype),
        img_ids=torch.cat([ids, ref_ids]).to(device),
        txt_ids=torch.zeros(shape.text_tokens, 3, device=device),
        guidance=torch.full((1,), 1.0, device=device, dtype=dtype),  # the recipe trains at guidance 1
        target=(eps - x0).to(device),
        seeds=torch.tensor([seed]),
    )


def flow_loss(transformer: nn.Module, x: StepInputs) -> Tensor:
    """Per-sample flow MSE on the target tokens, exactly as ``TrainingModel.forward`` computes it."""
    out = transformer(
        hidden_states=x.hidden_states,
        encoder_hidden_states=x.text,
        pooled_projections=x.pooled,
        timestep=x.sigma,
        img_ids=x.img_ids,
        txt_ids=x.txt_ids,
        guidance=x.guidance,
        return_dict=False,
    )[0]
    pred = out[:, : x.target.shape[1]].float()
    return (pred - x.target.float()).pow(2).mean(dim=(1, 2))


def _bytes(tensors: Iterator[Tensor] | Sequence[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ---- the variants -------------------------------------------------------------------------------


class TrainVariant:
    """One way of training on the shared transformer: ``install``, ``losses``, the optimizer, ``uninstall``.

    ``params`` are the variant's own trainable tensors (its peft adapter and its MoLE or LoRA
    parts); ``optimizer`` an AdamW over them with the trainer's settings.
    """

    name: str
    params: list[Tensor]
    optimizer: torch.optim.Optimizer

    def install(self) -> None:
        raise NotImplementedError

    def uninstall(self) -> None:
        raise NotImplementedError

    def losses(self, x: StepInputs) -> dict[str, Tensor]:
        """``{"loss": scalar to backpropagate, "flow": [b], ...}`` of one forward."""
        raise NotImplementedError

    def state_bytes(self) -> int:
        """The variant's own persistent memory: trainable weights and optimizer state."""
        state = [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        return _bytes(self.params) + _bytes(state)

    @torch.no_grad()
    def move_state(self, device: torch.device) -> None:
        """Park (or bring back) the trainable weights and optimizer state, so that CUDA peaks are per variant."""
        for p in self.params:
            if p.device != device:
                p.data = p.data.to(device)
        for s in self.optimizer.state.values():
            for k, v in s.items():
                if torch.is_tensor(v) and v.ndim > 0 and v.device != device:  # AdamW's "step" stays put
                    s[k] = v.to(device)


def _adamw(groups: list[dict[str, Any]], t: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, betas=tuple(t.betas), weight_decay=t.weight_decay)


def _add_peft_adapter(transformer: nn.Module, name: str, modules: list[str], rank: int, dtype: torch.dtype) -> list:
    """Another peft LoRA beside the trainer's ``default`` one (same targets, rank and init), in ``dtype``."""
    from peft import LoraConfig

    with warnings.catch_warnings():  # peft warns that the model now holds several adapters: it is meant to
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        transformer.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=modules),
            adapter_name=name,
        )
    params = []
    for pname, p in transformer.named_parameters():
        if f".{name}." in pname and "lora_" in pname:
            p.data = p.data.to(dtype)
            params.append(p)
    return params


class Ours(TrainVariant):
    """The trainer's ``TrainingModel`` on the peft adapter ``setup_transformer`` added (``default``)."""

    def __init__(self, bench: TrainingBench, name: str = "ours") -> None:
        self.name, self.bench = name, bench
        t = bench.config.train
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(bench.seed + 10)
            self.mole = InstructMoLE(bench.mole_config).to(bench.device)  # fp32 masters, as the trainer
        bench.transformer.set_adapter("default")
        self.model: TrainingModel | None = self._model()
        groups = self.model.parameter_groups(t.lr, t.gate_lr, t.weight_decay)
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = _adamw(groups, t)
        self.uninstall()

    def _model(self) -> TrainingModel:
        lora = self.bench.config.adapter.lora
        model = TrainingModel(self.bench.transformer, self.mole, self.bench.lora_modules, lora.alpha or lora.rank)
        return model.train()

    def install(self) -> None:
        self.bench.transformer.set_adapter("default")
        self.model = self._model()  # attach(..., training=True): the runtime's hooks

    def uninstall(self) -> None:
        # Drop the runtime with the model: what it recorded of the last forward (see the report's
        # note on retained memory) must not stay allocated while another variant is measured.
        self.model.handle.detach()
        self.model = None

    def losses(self, x: StepInputs) -> dict[str, Tensor]:
        out = self.model(**x.as_kwargs(), aux_reduction="sum")
        t = self.bench.config.train
        aux = (
            t.load_balance * out["load_balance"]
            + t.load_balance_token * out["load_balance_token"]
            + t.orthogonality * out["orthogonality"]
        )
        return {"loss": out["flow"].mean() + aux, **out}


class PlainLoRA(TrainVariant):
    """The same peft LoRA (adapter ``plain``) plus a rank-``k·r`` LoRA on the MoLE layers (hooks)."""

    def __init__(self, bench: TrainingBench) -> None:
        self.name, self.bench = "plain LoRA", bench
        cfg, t = bench.mole_config, bench.config.train
        self.rank = cfg.top_k * cfg.rank
        peft_params = _add_peft_adapter(
            bench.transformer, "plain", bench.lora_modules, bench.shape.lora_rank, torch.float32
        )
        g = torch.Generator().manual_seed(bench.seed + 20)
        self.layers: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
        for spec in cfg.layers:
            bound = 1.0 / math.sqrt(spec.in_features)  # peft's kaiming-uniform(a=√5) A, zero B
            down = (torch.rand(self.rank, spec.in_features, generator=g) * 2 - 1) * bound
            up = torch.zeros(spec.out_features, self.rank)
            self.layers[spec.name] = (nn.Parameter(down.to(bench.device)), nn.Parameter(up.to(bench.device)))
        own = [p for pair in self.layers.values() for p in pair]
        self.params = peft_params + own
        self.optimizer = _adamw([{"params": self.params, "lr": t.lr, "weight_decay": t.weight_decay}], t)
        self._hooks: list = []

    def install(self) -> None:
        self.bench.transformer.set_adapter("plain")
        for name, (down, up) in self.layers.items():

            def hook(_m: nn.Module, inputs: tuple, output: Tensor, down=down, up=up) -> Tensor:
                x = inputs[0]
                return output + (x @ down.t().to(x.dtype) @ up.t().to(x.dtype)).to(output.dtype)  # scale 1

            self._hooks.append(self.bench.transformer.get_submodule(name).register_forward_hook(hook))

    def uninstall(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def losses(self, x: StepInputs) -> dict[str, Tensor]:
        flow = flow_loss(self.bench.transformer, x)
        return {"loss": flow.mean(), "flow": flow}


def dense_expert_forward(x: Tensor, A: Tensor, B: Tensor, weights: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """The reference's MoLE layer: every expert on every token, mixed densely; and its orthogonality loss.

    ``weights [b, n]`` (zero outside the council). Returns ``(delta [.., o], ortho)``; ``ortho`` is
    ``orthogonality_loss_reference``'s formula (cosines of the flattened expert outputs) taken
    from the same materialised ``[b, n, t, o]`` stack that produces the output.
    """
    shape, n = x.shape, A.shape[0]
    xf = x.reshape(shape[0], -1, shape[-1])
    stack = torch.einsum("bti,nir,nro->bnto", xf, A.to(xf.dtype), B.to(xf.dtype))  # the N × tokens × out stack
    out = torch.einsum("bnto,bn->bto", stack, (weights * scale).to(stack.dtype))
    vec = stack.transpose(0, 1).reshape(n, -1)  # expert i's output over all tokens of the batch
    gram = (vec @ vec.t()).float()
    norms = gram.diagonal().clamp_min(1e-24).sqrt()  # the norm, clamped as F.normalize's eps=1e-12
    cos = gram / (norms[:, None] * norms[None, :])
    ortho = (cos.pow(2).sum() - cos.diagonal().pow(2).sum()) / (n * (n - 1))
    return out.reshape(*shape[:-1], B.shape[-1]), ortho


class ReferenceWay(TrainVariant):
    """The reference implementation's training step, as forward hooks (a baseline, not product code)."""

    def __init__(self, bench: TrainingBench) -> None:
        self.name, self.bench = "reference way", bench
        cfg, t = bench.mole_config, bench.config.train
        if any(s.routing != "instruction" for s in cfg.layers):
            raise ValueError("the reference-way baseline implements instruction-routed layers only")
        dtype = bench.dtype  # the reference trains its adapter in the base dtype (no fp32 masters)
        rank = bench.shape.lora_rank
        peft_params = _add_peft_adapter(bench.transformer, "reference", bench.lora_modules, rank, dtype)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(bench.seed + 10)  # the same initial weights as ``ours``
            self.mole = InstructMoLE(cfg).to(bench.device, dtype).train()
        self.runtime = MoLERuntime(self.mole, training=True)  # only its ``route``: the same router code
        gates = [p for n, p in self.mole.named_parameters() if n.startswith("experts.") and n.endswith(".gate.weight")]
        gate_ids = {id(p) for p in gates}
        rest = peft_params + [p for p in self.mole.parameters() if id(p) not in gate_ids]
        self.params = rest + gates
        self.optimizer = _adamw(
            [
                {"params": rest, "lr": t.lr, "weight_decay": t.weight_decay},
                {"params": gates, "lr": t.gate_lr, "weight_decay": t.weight_decay},
            ],
            t,
        )
        self._hooks: list = []
        self._seeds: Tensor | None = None
        self._weights: Tensor | None = None  # [b, L, n], zero outside each council
        self._routing: tuple[Tensor, Tensor] | None = None
        self._ortho: dict[str, Tensor] = {}

    def install(self) -> None:
        tr, cfg = self.bench.transformer, self.mole.config
        tr.set_adapter("reference")
        self._hooks.append(tr.register_forward_pre_hook(self._route, with_kwargs=True))
        for row, name in enumerate(cfg.instruction_layers):
            self._hooks.append(tr.get_submodule(name).register_forward_hook(self._layer_hook(row, name)))

    def uninstall(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._weights = self._routing = None
        self._ortho = {}

    def _route(self, _module: nn.Module, _args: tuple, kwargs: dict) -> None:
        probs, indices, weights = self.runtime.route(
            kwargs["encoder_hidden_states"], kwargs["pooled_projections"], self._seeds
        )
        self._routing = (probs, indices)
        self._weights = torch.zeros_like(probs).scatter(-1, indices, weights)

    def _layer_hook(self, row: int, name: str) -> Callable[..., Tensor]:
        layer, scale = self.mole.layer(name), self.mole.config.scale

        def hook(_m: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
            assert self._weights is not None, "MoLE layer called outside a transformer forward"
            delta, ortho = dense_expert_forward(inputs[0], layer.A, layer.B, self._weights[:, row], scale)
            # Keep the first forward's loss: the value the checkpointed recomputation in backward
            # gives again is equal, and storing it would keep that recomputed graph alive.
            self._ortho.setdefault(name, ortho)
            return output + delta.to(output.dtype)

        return hook

    def losses(self, x: StepInputs) -> dict[str, Tensor]:
        self._seeds, self._ortho = x.seeds, {}
        flow = flow_loss(self.bench.transformer, x)
        prob_sum, counts, units = balance_statistics(*self._routing)
        load_balance = load_balancing_from_statistics(prob_sum, counts, units).sum()
        ortho = torch.stack(list(self._ortho.values())).sum()
        loss = flow.mean() + LOAD_BALANCE * load_balance + ORTHOGONALITY * ortho
        return {"loss": loss, "flow": flow, "load_balance": load_balance, "orthogonality": ortho}


# ---- the bench ----------------------------------------------------------------------------------


class TrainingBench:
    """One frozen transformer set up by the trainer's code, and the variants that train on it."""

    def __init__(
        self,
        shape: TrainShape,
        device: torch.device,
        *,
        fp8_base: bool = False,
        seed: int = 0,
        variants: Sequence[str] = VARIANTS,
    ) -> None:
        self.shape, self.device, self.seed = shape, device, seed
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.autocast = device.type == "cuda"  # bf16 autocast on CUDA (the trainer's mixed_precision=bf16)
        self.config = trainer_config(shape, self.dtype, fp8_base)
        self.transformer = build_transformer(shape, device, self.dtype, seed)
        self.mole_config: MoLEConfig = build_mole_config(self.config, self.transformer)
        self.lora_modules = setup_transformer(self.transformer, self.config, self.mole_config)
        self.transformer.train()
        self.variants: list[TrainVariant] = []
        for name in variants:
            if name == "ours":
                self.variants.append(Ours(self, FP8_NAME if fp8_base else "ours"))
            elif name == "plain LoRA":
                self.variants.append(PlainLoRA(self))
            elif name == "reference way":
                self.variants.append(ReferenceWay(self))
            else:
                raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")
        self._installed: TrainVariant | None = None
        if device.type == "cuda":
            for v in self.variants:
                v.move_state(torch.device("cpu"))

    def variant(self, name: str) -> TrainVariant:
        return next(v for v in self.variants if v.name == name)

    def frozen_bytes(self) -> int:
        """The frozen base (every transformer weight and buffer that is no adapter's)."""
        params = [p for n, p in self.transformer.named_parameters() if "lora_" not in n]
        return _bytes(params) + _bytes(list(self.transformer.buffers()))

    def inputs(self, side: int) -> StepInputs:
        # With autocast the trainer feeds fp32 inputs (training/loop.py: input_dtype).
        dtype = torch.float32 if self.autocast else self.dtype
        return make_inputs(self.shape, side, self.device, dtype, self.seed + 1)

    @contextlib.contextmanager
    def installed(self, variant: TrainVariant) -> Iterator[TrainVariant]:
        if self.device.type == "cuda":
            variant.move_state(self.device)
        variant.install()
        self._installed = variant
        try:
            yield variant
        finally:
            variant.uninstall()
            self._installed = None
            if self.device.type == "cuda":
                variant.move_state(torch.device("cpu"))

    def forward_losses(self, variant: TrainVariant, x: StepInputs) -> dict[str, Tensor]:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return variant.losses(x)

    def step(self, variant: TrainVariant, x: StepInputs) -> dict[str, float]:
        """One training step as the trainer's loop takes it: forward, backward, clip, AdamW, zero grads."""
        out = self.forward_losses(variant, x)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(variant.params, self.config.train.max_grad_norm)
        variant.optimizer.step()
        variant.optimizer.zero_grad(set_to_none=True)
        return {k: float(v.detach().float().mean()) for k, v in out.items()}


# ---- memory -------------------------------------------------------------------------------------

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4


def _glibc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim  # noqa: B018  (not glibc: AttributeError)
    except (OSError, AttributeError):
        return None
    return libc


def return_freed_memory() -> bool:
    """glibc: serve every allocation ≥ 128 KiB by mmap and trim the heap, so RSS tracks live memory.

    The opposite of ``common.keep_freed_memory``, and deterministic where glibc's default is not
    (its mmap threshold moves with the allocation history): every step pays the same page zeroing
    for what it allocates. Returns False where it does not apply (not Linux glibc).
    """
    libc = _glibc()
    if libc is None:
        return False
    settings = ((_M_MMAP_THRESHOLD, 128 * 1024), (_M_MMAP_MAX, 65536), (_M_TRIM_THRESHOLD, 128 * 1024))
    ok = all(libc.mallopt(k, v) for k, v in settings)
    libc.malloc_trim(0)
    return ok


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class RssPeak:
    """Peak resident memory a call adds (Linux: ``VmHWM`` reset through ``/proc/self/clear_refs``)."""

    def __init__(self) -> None:
        self.libc = _glibc()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            _status_kib("VmHWM")
            self.ok = self.libc is not None
        except (OSError, KeyError):
            self.ok = False
        self._before = 0

    def start(self) -> None:
        if self.ok:
            self.libc.malloc_trim(0)
            self._before = _status_kib("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS (Linux ≥ 4.0)

    def stop(self) -> int | None:
        return (_status_kib("VmHWM") - self._before) * 1024 if self.ok else None


# ---- measurement --------------------------------------------------------------------------------


@dataclass
class Record:
    """What one variant gave at one size."""

    name: str
    samples: list[float]  # step seconds, one per round
    first: dict[str, float] | None = None  # losses of the first (warm-up) step
    peak: int | None = None  # CUDA: max_memory_allocated (alone); CPU: frozen + state + step peak RSS
    step_peak: int | None = None  # what a step adds on top of the weights and optimizer state (max)
    state: int = 0  # the variant's trainable weights + AdamW state
    frozen: int = 0


def _new_records(bench: TrainingBench) -> dict[str, Record]:
    return {v.name: Record(v.name, [], frozen=bench.frozen_bytes()) for v in bench.variants}


def _step(bench: TrainingBench, v: TrainVariant, x: StepInputs, rec: Record) -> tuple[float, dict[str, float]]:
    """One timed step; CUDA: also a memory sample unless it is the variant's first (it creates the AdamW state)."""
    device = bench.device
    memory = device.type == "cuda" and bool(v.optimizer.state)
    if memory:
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    seconds, losses = timed(lambda: bench.step(v, x), device)
    if memory:
        peak = torch.cuda.max_memory_allocated(device)
        rec.peak = max(rec.peak or 0, peak)
        rec.step_peak = max(rec.step_peak or 0, peak - before)
    if rec.first is None:
        rec.first = losses
    return seconds, losses


def measure_time(bench: TrainingBench, side: int, records: dict[str, Record], *, rounds: int, warmup: int) -> None:
    """Warm every variant up at this size, then time ``rounds`` interleaved rounds (rotating who goes first)."""
    x = bench.inputs(side)
    for v in bench.variants:
        with bench.installed(v):
            for _ in range(max(warmup, 1)):
                seconds, losses = _step(bench, v, x, records[v.name])
                log(f"  warmup {v.name}: {seconds * 1e3:.0f} ms, loss {losses['loss']:.5g}")
    count = len(bench.variants)
    for r in range(rounds):
        line = []
        for i in range(count):
            v = bench.variants[(r + i) % count]
            with bench.installed(v):
                seconds, _ = _step(bench, v, x, records[v.name])
            records[v.name].samples.append(seconds)
            line.append(f"{v.name} {seconds * 1e3:.0f}")
        log(f"  round {r + 1}/{rounds}: " + ", ".join(line) + " (ms)")
    for v in bench.variants:
        rec = records[v.name]
        rec.state = v.state_bytes()
        if rec.peak is not None:
            log(f"  memory {v.name}: peak {_gib(rec.peak)} GiB, step adds {_gib(rec.step_peak)} GiB")


def measure_cpu_memory(bench: TrainingBench, side: int, records: dict[str, Record], rss: RssPeak) -> None:
    """CPU: one step per variant whose peak RSS growth is recorded (after a first step that creates
    the AdamW state, where there was none). Run it while glibc returns freed memory, before any
    timing in keep-freed mode: after that mode the heap's freed chunks refault and inflate RSS."""
    x = bench.inputs(side)
    for v in bench.variants:
        rec = records[v.name]
        if not v.optimizer.state:
            with bench.installed(v):
                _step(bench, v, x, rec)
        with bench.installed(v):  # installed afresh: nothing of an earlier forward is left allocated
            rss.start()
            _step(bench, v, x, rec)
            rec.step_peak = rss.stop()
        rec.state = v.state_bytes()
        if rec.step_peak is not None:
            rec.peak = rec.frozen + rec.state + rec.step_peak
        log(f"  memory {v.name}: peak {_gib(rec.peak)} GiB, step adds {_gib(rec.step_peak)} GiB")


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f}"


# ---- command line -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", choices=sorted(SIZES), help="default: full on CUDA, scaled on CPU")
    p.add_argument("--sides", type=int, nargs="+", help="packed latent tokens per target side (default: the size's)")
    p.add_argument("--rounds", type=int, help="interleaved timed rounds (default: 8 CUDA, 3 CPU)")
    p.add_argument("--warmup", type=int, help="untimed steps per variant and size first (default: 2 CUDA, 1 CPU)")
    p.add_argument("--fp8-base", action="store_true", help="also measure ours with model.fp8_base (own transformer)")
    p.add_argument("--lora-rank", type=int, help="plain-LoRA rank (default: 256 full, scaled with the hidden size)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (CPU runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--system-malloc",
        action="store_true",
        help="CPU: time with glibc's default allocator (default: keep freed memory, see common.keep_freed_memory)",
    )
    p.add_argument("--out", help="JSON path (default: benchmarks/results/training-<device>[-<size>].json)")
    return p.parse_args(argv)


def _meta(bench: TrainingBench) -> dict[str, Any]:
    return {
        "mole_layers": len(bench.mole_config.layer_names),
        "lora_modules": len(bench.lora_modules),
        "plain_lora_rank_on_mole_layers": bench.shape.top_k * bench.shape.rank,
        "dtype": str(bench.dtype).removeprefix("torch."),
        "autocast": "bf16" if bench.autocast else None,
    }


def _free() -> None:
    """Release a dropped bench (its variants and the transformer reference each other: a cycle)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print a markdown table to stdout, write JSON, return the results."""
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    if cuda:
        torch.backends.cuda.enable_cudnn_sdp(False)  # its SDPA backward failed on our H100s (as the trainer)
    else:
        torch.set_num_threads(args.threads)
    default_size = "full" if cuda else "scaled"
    size = args.size or default_size
    shape = SIZES[size]
    if args.lora_rank:
        shape = replace(shape, lora_rank=args.lora_rank)
    if args.sides:
        shape = replace(shape, sides=tuple(args.sides))
    rounds = args.rounds if args.rounds is not None else (8 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (2 if cuda else 1)
    rss = RssPeak() if not cuda else None
    rss = rss if rss is not None and rss.ok else None
    tiny = size == "tiny"  # the smoke test: leave the test process's allocator alone
    malloc = "system" if (cuda or tiny or args.system_malloc) else "keep-freed"
    suffix = "" if size == default_size else f"-{size}"
    out_path = args.out or f"benchmarks/results/training-{device.type}{suffix}.json"
    command = "PYTHONPATH=. python -m benchmarks.training " + shlex.join(sys.argv[1:] if argv is None else argv)

    log(
        f"size {size}: {shape.num_double}+{shape.num_single} blocks, hidden {shape.hidden}, "
        f"{shape.text_tokens} text tokens, sides {shape.sides}, on {device}; MoLE N={shape.num_experts} "
        f"k={shape.top_k} r={shape.rank}, LoRA r={shape.lora_rank}; {warmup} warmup, {rounds} rounds"
    )
    load_before = os.getloadavg()
    if rss is not None and not tiny:
        return_freed_memory()  # from the start: RSS then tracks live memory (measure_cpu_memory)
    labels = [size_label(side) for side in shape.sides]
    results: dict[str, dict[str, Record]] = {label: {} for label in labels}

    def build(fp8: bool) -> TrainingBench:
        variants = ("ours",) if fp8 else VARIANTS
        seconds, bench = timed(
            lambda: TrainingBench(shape, device, fp8_base=fp8, seed=args.seed, variants=variants), device
        )
        log(f"built{' (fp8 base)' if fp8 else ''} in {seconds:.1f} s")
        return bench

    phases = [False, True] if args.fp8_base else [False]
    meta: dict[str, Any] = {}
    if cuda:  # one transformer at a time on the device: each peak is its own
        for fp8 in phases:
            bench = build(fp8)
            meta = meta or _meta(bench)
            for side, label in zip(shape.sides, labels, strict=True):
                log(f"{label}{', fp8 base' if fp8 else ''}")
                records = _new_records(bench)
                measure_time(bench, side, records, rounds=rounds, warmup=warmup)
                results[label].update(records)
            bench = None
            _free()
    else:  # memory first (allocator returning freed memory), then timing (keeping it)
        benches = [build(fp8) for fp8 in phases]
        meta = _meta(benches[0])
        per = [{label: _new_records(b) for label in labels} for b in benches]
        if rss is not None:
            for bench, records in zip(benches, per, strict=True):
                for side, label in zip(shape.sides, labels, strict=True):
                    log(f"{label}{', fp8 base' if bench is not benches[0] else ''}: memory")
                    measure_cpu_memory(bench, side, records[label], rss)
        if malloc == "keep-freed":
            keep_freed_memory()
        for bench, records in zip(benches, per, strict=True):
            for side, label in zip(shape.sides, labels, strict=True):
                log(f"{label}{', fp8 base' if bench is not benches[0] else ''}: time")
                measure_time(bench, side, records[label], rounds=rounds, warmup=warmup)
                results[label].update(records[label])
        benches = per = None
        _free()
    load_after = os.getloadavg()

    data: dict[str, Any] = {
        "benchmark": "training",
        "command": command,
        "config": {
            **asdict(shape),
            "hidden": shape.hidden,
            "mlp": 4 * shape.hidden,
            "batch": 1,
            **meta,
            "gradient_checkpointing": True,
            "rounds": rounds,
            "warmup": warmup,
            "malloc": {
                "keep-freed": "timed steps: glibc keeps freed memory (common.keep_freed_memory)",
                "system": "glibc defaults",
            }[malloc],
            "memory": (
                "torch.cuda.max_memory_allocated per step, other variants' state parked on the CPU"
                if cuda
                else "one untimed step per variant and size, before any timing, glibc returning freed memory (mmap "
                "for >= 128 KiB, trimmed heap): its peak RSS (VmHWM, reset via /proc/self/clear_refs) minus the RSS "
                "before it, plus the frozen base and the variant's weights + AdamW state counted from the tensors"
            ),
        },
        "environment": {**environment(device), "load_average_before": load_before, "load_average_after": load_after},
        "targets": TARGETS,
        "anchors": ANCHORS,
        "sizes": {label: _summarise(recs) for label, recs in results.items()},
    }
    write_json(out_path, data)
    print(report(data))
    log(f"wrote {out_path}")
    return data


def _paired(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over rounds of a / b in the same round: cancels drift that spans a round."""
    return median([x / y for x, y in zip(a, b, strict=False)])


def _summarise(records: dict[str, Record]) -> dict[str, Any]:
    ours = records.get("ours")
    variants = {}
    for name, rec in records.items():
        entry: dict[str, Any] = {
            "median_ms": median(rec.samples) * 1e3,
            "min_ms": min(rec.samples) * 1e3 if rec.samples else float("nan"),
            "samples_ms": [s * 1e3 for s in rec.samples],
            "peak_gib": None if rec.peak is None else rec.peak / 2**30,
            "step_peak_gib": None if rec.step_peak is None else rec.step_peak / 2**30,
            "state_gib": rec.state / 2**30,
            "frozen_gib": rec.frozen / 2**30,
            "first_step_losses": rec.first,
        }
        if ours is not None and ours.samples:
            entry["vs_ours"] = median(rec.samples) / median(ours.samples)
            if name != FP8_NAME:  # measured in another phase: no rounds to pair with
                entry["vs_ours_paired"] = _paired(rec.samples, ours.samples)
        variants[name] = entry
    ratios: dict[str, Any] = {}
    if ours is not None:
        for other in ("reference way", "plain LoRA"):
            if other in records and records[other].samples:
                rec = records[other]
                ratios[f"ours / {other} time"] = median(ours.samples) / median(rec.samples)
                ratios[f"ours / {other} time, paired"] = _paired(ours.samples, rec.samples)
                if ours.peak and rec.peak:
                    ratios[f"ours / {other} peak memory"] = ours.peak / rec.peak
    return {"variants": variants, "ratios": ratios}


def report(data: dict[str, Any]) -> str:
    """The markdown summary printed to stdout."""
    cfg, env = data["config"], data["environment"]
    cuda = env["device"].startswith("cuda")
    where = env.get("gpu") or f"{env['cpu']}, {env['torch_threads']} threads"
    head = [
        f"`{data['command']}`",
        "",
        f"InstructMoLE training step, size {cfg['name']} ({cfg['num_double']}+{cfg['num_single']} blocks, hidden "
        f"{cfg['hidden']}, {cfg['text_tokens']} text tokens; batch 1, target + same-size reference, gradient "
        f"checkpointing, fwd + bwd + clip + AdamW; base {cfg['dtype']}"
        f"{', bf16 autocast' if cfg['autocast'] else ''}; MoLE N={cfg['num_experts']} k={cfg['top_k']} "
        f"r={cfg['rank']} on {cfg['mole_layers']} layers, peft LoRA r={cfg['lora_rank']} on "
        f"{cfg['lora_modules']} Linears) on {where}; torch {env['torch']}, diffusers {env['diffusers']}; "
        f"medians of {cfg['rounds']} interleaved rounds after {cfg['warmup']} warm-up step(s).",
    ]
    mem = "peak GiB (max allocated, alone)" if cuda else "peak GiB (frozen + state + step RSS)"
    header = ("size", "variant", "median ms", "× ours", "× ours, paired", "min ms", mem, "state GiB", "step GiB")
    rows = []
    for label, s in data["sizes"].items():
        for name, v in s["variants"].items():
            rows.append(
                (
                    label,
                    name,
                    f"{v['median_ms']:.0f}",
                    f"{v['vs_ours']:.3f}" if "vs_ours" in v else "",
                    f"{v['vs_ours_paired']:.3f}" if "vs_ours_paired" in v else "",
                    f"{v['min_ms']:.0f}",
                    _f2(v["peak_gib"]),
                    f"{v['state_gib']:.2f}",
                    _f2(v["step_peak_gib"]),
                )
            )
    parts = [*head, "", markdown_table(header, rows)]
    checks = []
    for label, s in data["sizes"].items():
        for name, value in s["ratios"].items():
            checks.append((label, name, f"{value:.3f}", _target_of(name)))
        fp8 = s["variants"].get(FP8_NAME)
        if fp8 is not None and fp8["peak_gib"] is not None:
            gb = fp8["peak_gib"] * 2**30 / 1e9
            target = TARGETS[f"{FP8_NAME} peak at 1024² + reference"]
            checks.append((label, f"{FP8_NAME}: peak GB (10⁹ bytes)", f"{gb:.2f}", target))
    if checks:
        parts += ["", markdown_table(("size", "check", "value", "target"), checks)]
    notes = [
        f"Memory: {cfg['memory']}.",
        "'× ours' of the fp8-base row compares across phases (it runs on its own transformer after the "
        "others), so it is not paired.",
        "Anchors (DESIGN.md §4, reference code on an H100, bf16 trainables, fwd+bwd without optimizer): "
        + "; ".join(f"{k}: {v}" for k, v in ANCHORS.items())
        + ".",
        "Targets: " + "; ".join(f"{k} {v}" for k, v in TARGETS.items()) + ".",
    ]
    busy = max(env["load_average_before"][0], env["load_average_after"][0])
    if not cuda and busy > env["torch_threads"] + 0.5:
        notes.append(
            f"The machine was shared (1-minute load average up to {busy:.1f}, {env['torch_threads']} benchmark "
            f"threads on {env['cpu_count']} cores): other processes inflate some samples; the paired ratios and "
            "the min column are the cleaner comparisons."
        )
    parts += ["", *[f"- {n}" for n in notes]]
    return "\n".join(parts)


def _target_of(ratio: str) -> str:
    if ratio.endswith("peak memory"):
        return "<= 1.0 (no more memory)" if "reference" in ratio else ""
    return TARGETS.get(ratio.removesuffix(", paired"), "")


def _f2(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


if __name__ == "__main__":
    main()
