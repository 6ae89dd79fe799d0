"""The reference implementation's training step, rebuilt with forward hooks: the baseline.

Why it exists: the design claims that ``ours`` computes the same council output and the same
orthogonality loss as the paper's code without its ``N × tokens × out`` stack. This variant
materialises that stack, as the reference does, on the same router and the same initial weights,
so the benchmark measures what the exact path saves and the tests
(tests/test_benchmark_training.py) check that both give the same losses and gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from instructmole import InstructMoLE
from instructmole.losses import balance_statistics, load_balancing_from_statistics
from instructmole.runtime import MoLERuntime

from .setting import StepInputs, flow_loss
from .variants import TrainVariant, adamw, add_peft_adapter

if TYPE_CHECKING:
    from .bench import TrainingBench

# The trainer's recipe values this benchmark uses (training/config.py defaults).
LOAD_BALANCE, ORTHOGONALITY = 0.1, 0.01


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
        peft_params = add_peft_adapter(bench.transformer, "reference", bench.lora_modules, rank, dtype)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(bench.seed + 10)  # the same initial weights as ``ours``
            self.mole = InstructMoLE(cfg).to(bench.device, dtype).train()
        self.runtime = MoLERuntime(self.mole, training=True)  # only its ``route``: the same router code
        gates = [p for n, p in self.mole.named_parameters() if n.startswith("experts.") and n.endswith(".gate.weight")]
        gate_ids = {id(p) for p in gates}
        rest = peft_params + [p for p in self.mole.parameters() if id(p) not in gate_ids]
        self.params = rest + gates
        self.optimizer = adamw(
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
