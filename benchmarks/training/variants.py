"""The variants measured: the trainer's own step (``ours``) and a plain LoRA of the same active rank.

Why apart from the bench: a variant is one way of training on the shared transformer (install its
adapter, compute its losses, own its optimizer), so adding or changing one touches only its class.
The reference implementation's way, the baseline the tests prove ``ours`` equal to, is in
``reference_way.py``.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from instructmole import InstructMoLE
from training.modules import TrainingModel
from training.optim import build_optimizer

from .setting import StepInputs, flow_loss, tensor_bytes

if TYPE_CHECKING:
    from .bench import TrainingBench


class TrainVariant:
    """One way of training on the shared transformer: ``install``, ``losses``, the optimizer, ``uninstall``.

    ``params`` are the variant's own trainable tensors (its peft adapter and its MoLE or LoRA
    parts); ``optimizer`` an AdamW over them with the trainer's settings (``ours`` with a memory
    option: the option's ``train.optimizer``, built by the trainer's ``build_optimizer``).
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
        return tensor_bytes(self.params) + tensor_bytes(state)

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


def adamw(groups: list[dict[str, Any]], t: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, betas=tuple(t.betas), weight_decay=t.weight_decay)


def add_peft_adapter(transformer: nn.Module, name: str, modules: list[str], rank: int, dtype: torch.dtype) -> list:
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

    def __init__(self, bench: TrainingBench, name: str = "ours", *, keep_attached: bool = False) -> None:
        self.name, self.bench, self.keep_attached = name, bench, keep_attached
        t = bench.config.train
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(bench.seed + 10)
            self.mole = InstructMoLE(bench.mole_config).to(bench.device)  # fp32 masters, as the trainer
        bench.transformer.set_adapter("default")
        self.model: TrainingModel | None = self._model()
        groups = self.model.parameter_groups(t.lr, t.gate_lr, t.weight_decay)
        self.params = [p for g in groups for p in g["params"]]
        if bench.trainer_optimizer or t.optimizer != "adamw":  # train.optimizer, as the trainer builds it
            self.optimizer = build_optimizer(t.optimizer, groups, tuple(t.betas), t.weight_decay)
        else:  # the comparison's plain AdamW, as the other variants'
            self.optimizer = adamw(groups, t)
        if not keep_attached:
            self.uninstall()

    def _model(self) -> TrainingModel:
        lora = self.bench.config.adapter.lora
        model = TrainingModel(self.bench.transformer, self.mole, self.bench.lora_modules, lora.alpha or lora.rank)
        return model.train()

    def install(self) -> None:
        self.bench.transformer.set_adapter("default")
        if self.model is None:
            self.model = self._model()  # attach(..., training=True): the runtime's hooks

    def uninstall(self) -> None:
        # Drop the runtime with the model: what it recorded of the last forward (see the report's
        # note on retained memory) must not stay allocated while another variant is measured.
        # Alone on its bench (``keep_attached``), it stays attached from the start, as in the trainer:
        # attach reads a base weight, which block swap may have released by the next step.
        if not self.keep_attached:
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
        peft_params = add_peft_adapter(
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
        self.optimizer = adamw([{"params": self.params, "lr": t.lr, "weight_decay": t.weight_decay}], t)
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
