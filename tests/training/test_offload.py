"""Block swap (training/offload.py) on the CPU, on the tiny Flux with experts and a peft LoRA attached
as the trainer attaches them: the same loss and gradients as without it (bit for bit: the same bytes
go through the same kernels in the same order), the swapped weights resident only while their
block runs (forward, backward, checkpointed recompute), trainable parameters untouched, ``remove``
restoring the model, and two processes (gloo DDP) swapping their own copies."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from instructmole import InstructMoLE
from instructmole.layers import REFERENCE_LORA_TARGETS
from instructmole.tiny import kontext_inputs, tiny_flux, tiny_mole_config
from tests.training.conftest import ROOT
from training.errors import ConfigError
from training.modules import TrainingModel
from training.offload import BlockSwap, BlockSwapError, transformer_blocks

BLOCKS = 4  # the tiny Flux: 2 double + 2 single blocks


# How the blocks are checkpointed: not at all; diffusers' default (non-reentrant, recompute stopped as
# soon as the backward has what it needs, so the recompute's post-hook never runs); non-reentrant with
# the whole block recomputed (its post-hook runs inside the backward). The reentrant variant is tested
# without experts: the trainer cannot use it (the routing, computed once per forward, would be
# backpropagated through once per recomputed block).
CHECKPOINTING = {
    "plain": None,
    "checkpointing": "default",
    "full-recompute": functools.partial(checkpoint, use_reentrant=False, early_stop=False),
}


def training_model(checkpointing: str = "plain") -> TrainingModel:
    """The tiny transformer frozen, with a rank-2 peft LoRA (fp32 masters) and the experts attached
    (``training=True``), as ``training.modules.setup_transformer`` and ``TrainingModel`` do;
    ``checkpointing``: a key of ``CHECKPOINTING``."""
    from peft import LoraConfig

    transformer = tiny_flux(0).requires_grad_(False)
    mole = tiny_mole_config(transformer, text_length=32)
    names = [
        n
        for n, m in transformer.named_modules()
        if isinstance(m, nn.Linear) and n not in mole.layer_names and n.endswith(REFERENCE_LORA_TARGETS)
    ]
    torch.manual_seed(0)
    transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=names))
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
    how = CHECKPOINTING[checkpointing]
    if how == "default":
        transformer.enable_gradient_checkpointing()
    elif how is not None:
        transformer.enable_gradient_checkpointing(lambda module, *args: how(module.__call__, *args))
    model = TrainingModel(transformer, InstructMoLE(mole), names, 2.0).train()
    with torch.no_grad():  # nonzero B and LoRA-B, so that every trainable tensor gets a gradient
        g = torch.Generator().manual_seed(2)
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def loss_of(model: nn.Module, seed: int = 3, device: str = "cpu") -> Tensor:
    """Flow loss plus the auxiliary losses of one training forward (every trainable path)."""
    g = torch.Generator().manual_seed(seed)
    hidden, target = torch.randn(2, 8, 64, generator=g), torch.randn(2, 4, 64, generator=g)
    text, pooled = torch.randn(2, 32, 64, generator=g), torch.randn(2, 32, generator=g)
    out = model(
        hidden.to(device),
        text.to(device),
        pooled.to(device),
        sigma=torch.tensor([0.3, 0.8], device=device),
        img_ids=torch.zeros(8, 3, device=device),
        txt_ids=torch.zeros(32, 3, device=device),
        guidance=torch.ones(2, device=device),
        target=target.to(device),
        seeds=torch.tensor([seed, seed + 1]),
    )
    return out["flow"].mean() + out["load_balance"] + out["orthogonality"]


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def swapped_frozen(model: TrainingModel, swap: BlockSwap) -> dict[str, nn.Parameter]:
    """The frozen parameters of the swapped blocks, by name (what block swap moves)."""
    out = {}
    for block in swap.blocks:
        for name, p in model.transformer.get_submodule(block).named_parameters():
            if not p.requires_grad:
                out[f"{block}.{name}"] = p
    return out


def train_steps(
    model: TrainingModel, steps: int = 2, device: str = "cpu"
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """``steps`` AdamW steps; the losses and every step's gradients."""
    optimizer = torch.optim.AdamW(list(trainable(model).values()), lr=1e-2)
    losses, grads = [], []
    for step in range(steps):
        optimizer.zero_grad()
        loss = loss_of(model, seed=3 + step, device=device)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in trainable(model).items()})
        optimizer.step()
    return losses, grads


# ---- exactness ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "checkpointing"),
    [(c, m) for m in ("plain", "checkpointing") for c in (1, 3, BLOCKS)] + [(BLOCKS, "full-recompute")],
)
def test_block_swap_gives_the_same_loss_gradients_and_updates(count, checkpointing):
    reference = training_model(checkpointing)
    want_losses, want_grads = train_steps(reference)

    model = training_model(checkpointing)
    params = trainable(model)
    swap = BlockSwap(model.transformer, count, "cpu")
    assert swap.blocks == [name for name, _ in transformer_blocks(model.transformer)][BLOCKS - count :]
    model.to("cpu", torch.float32)  # what accelerate.prepare does next: a swapped tensor is left alone
    assert all(p.untyped_storage().nbytes() == 0 for p in swapped_frozen(model, swap).values())
    losses, grads = train_steps(model)
    assert swap.resident() == []

    for got, want in zip(losses, want_losses, strict=True):
        assert torch.equal(got, want), (got, want)
    for got, want in zip(grads, want_grads, strict=True):
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), name
            assert want[name].abs().sum() > 0, name  # every trainable tensor really gets a gradient
    # The optimizer updated the very parameters the model computes with, as without block swap.
    after = trainable(model)
    assert after.keys() == params.keys() and all(after[n] is p for n, p in params.items())
    for name, p in trainable(reference).items():
        assert torch.equal(params[name], p), name
    swap.remove()


def test_reentrant_checkpointing_gives_the_same_gradients():
    """A bare frozen transformer with a peft LoRA: the recompute releases, the nested backward loads again."""
    from peft import LoraConfig

    def lora_transformer() -> nn.Module:
        transformer = tiny_flux(0).requires_grad_(False)
        torch.manual_seed(0)
        transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=["to_q"]))
        with torch.no_grad():
            for name, p in transformer.named_parameters():
                if "lora_" in name:
                    p.requires_grad_(True).add_(0.05)
        reentrant = functools.partial(checkpoint, use_reentrant=True)
        transformer.enable_gradient_checkpointing(lambda module, *args: reentrant(module.__call__, *args))
        return transformer

    grads = []
    for count in (0, BLOCKS):
        transformer = lora_transformer()
        swap = BlockSwap(transformer, count, "cpu")
        inputs = kontext_inputs(torch.randn(2, 32, 64, generator=torch.Generator().manual_seed(1)), torch.ones(2, 32))
        inputs["hidden_states"].requires_grad_(True)  # reentrant checkpointing needs an input with a gradient
        transformer(**inputs)[0].square().mean().backward()
        assert swap.resident() == []
        grads.append({n: p.grad for n, p in transformer.named_parameters() if p.requires_grad})
        swap.remove()
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("checkpointing", ["plain", "checkpointing"])
def test_on_cuda_the_side_stream_copies_give_the_same_gradients_and_free_the_memory(checkpointing):
    """The CUDA path (pinned masters, side stream, events) as the trainer would use it: block swap on
    the CPU-loaded model, then ``.to(device)`` (accelerate.prepare)."""
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    reference = training_model(checkpointing).cuda()
    full = torch.cuda.memory_allocated() - start
    want = train_steps(reference, device="cuda")
    del reference
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    model = training_model(checkpointing)
    swap = BlockSwap(model.transformer, BLOCKS, "cuda")
    model.cuda()
    assert full - (torch.cuda.memory_allocated() - start) >= 0.9 * swap.swapped_bytes
    assert all(s.master.is_pinned() for b in swap._blocks.values() for s in b.storages)
    got = train_steps(model, device="cuda")
    torch.cuda.synchronize()
    assert swap.resident() == []
    # The same kernels on the same bytes; cuBLAS is deterministic for one shape on one stream, but
    # allow float rounding in case it picks another algorithm for another address.
    for a, b in zip(got[0], want[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for g, w in zip(got[1], want[1], strict=True):
        for n in w:
            torch.testing.assert_close(g[n], w[n], rtol=1e-5, atol=1e-7, msg=n)
    swap.remove()
    assert all(p.is_cuda and p.untyped_storage().nbytes() for p in model.parameters())


# ---- residency ------------------------------------------------------------------------------------


def _spy(swap: BlockSwap) -> list[tuple[str, list[str]]]:
    """Record the resident blocks after every load block swap makes."""
    events: list[tuple[str, list[str]]] = []
    load = swap._load

    def logged(block, wait):
        load(block, wait)
        events.append((block.name, swap.resident()))

    swap._load = logged
    return events


@pytest.mark.parametrize("checkpointing", list(CHECKPOINTING))
@pytest.mark.parametrize("prefetch", [False, True], ids=["on-demand", "prefetch"])
def test_swapped_weights_are_resident_only_while_their_block_runs(checkpointing, prefetch):
    model = training_model(checkpointing)
    original = {n: p.detach().clone() for n, p in model.transformer.named_parameters()}
    swap = BlockSwap(model.transformer, BLOCKS, "cpu", prefetch=prefetch)
    frozen = swapped_frozen(model, swap)
    assert frozen and not any("lora_" in n for n in frozen)
    assert swap.swapped_bytes == sum(original[n].numel() * original[n].element_size() for n in frozen)
    names = swap.blocks
    order = {name: i for i, name in enumerate(names)}
    events = _spy(swap)
    seen: list[tuple[str, bool]] = []  # (block, inside a backward)

    def running(name: str):
        def hook(module, _args):
            seen.append((name, torch._C._current_graph_task_id() != -1))
            mine = {n: p for n, p in frozen.items() if n.startswith(name + ".")}
            for n, p in mine.items():  # loaded: the real bytes, in a storage of its own
                assert p.untyped_storage().nbytes() > 0, n
                assert torch.equal(p, original[n]), n
            others = [n for n, p in frozen.items() if n not in mine and p.untyped_storage().nbytes()]
            allowed = {name} | ({names[order[name] + 1]} if prefetch and order[name] + 1 < len(names) else set())
            allowed |= {names[order[name] - 1]} if prefetch and order[name] > 0 else set()
            assert {_block_of(n, names) for n in others} <= allowed, others

        return hook

    extra = [model.transformer.get_submodule(n).register_forward_pre_hook(running(n)) for n in names]
    # Between uses nothing is resident: the parameters keep their shape, dtype and device, with an
    # empty storage behind them.
    assert all(p.untyped_storage().nbytes() == 0 and p.shape == original[n].shape for n, p in frozen.items())

    loss = loss_of(model)
    forward_events = len(events)
    # After the forward, autograd still holds the weights (or views of them) for the backward, yet
    # they take no memory: the storage it references was resized to 0 bytes.
    assert swap.resident() == [] and all(p.untyped_storage().nbytes() == 0 for p in frozen.values())
    loss.backward()
    assert swap.resident() == [] and all(p.untyped_storage().nbytes() == 0 for p in frozen.values())

    # The forward ran every block once; with checkpointing the backward ran each again, in reverse.
    forward = [(n, False) for n in names]
    assert seen == forward + ([(n, True) for n in reversed(names)] if checkpointing != "plain" else [])
    # Never more than the running block (and, prefetching, its neighbour in the direction of travel).
    for name, resident in events:
        assert name in resident
        assert len(resident) <= (2 if prefetch else 1), events
        if len(resident) == 2:
            assert abs(order[resident[0]] - order[resident[1]]) == 1, events
    backward_loads = [name for name, _ in events[forward_events:]]
    assert backward_loads and backward_loads[0] == names[-1]  # the backward starts with the last block
    for h in extra:
        h.remove()
    swap.remove()


def _block_of(param: str, blocks: list[str]) -> str:
    return next(b for b in blocks if param.startswith(b + "."))


def test_a_no_grad_forward_loads_and_releases_each_block():
    model, reference = training_model(), training_model()
    swap = BlockSwap(model.transformer, 2, "cpu")
    events = _spy(swap)
    with torch.no_grad():
        got, want = loss_of(model), loss_of(reference)
    assert torch.equal(got, want)
    first, second = swap.blocks
    # the block before prefetches the first; each block waits for its own and prefetches the next
    assert [name for name, _ in events] == [first, first, second, second]
    assert swap.resident() == []
    swap.remove()


def test_the_master_copy_and_the_compute_copy_are_separate_storages():
    model = training_model()
    swap = BlockSwap(model.transformer, 1, "cpu", prefetch=False)
    block = next(iter(swap._blocks.values()))
    swap._load(block, wait=True)
    for s in block.storages:
        assert s.compute.nbytes() == s.nbytes == s.master.numel()
        assert s.compute.data_ptr() != s.master.data_ptr()
        assert torch.equal(torch.empty(0, dtype=torch.uint8).set_(s.compute), s.master)
    swap._release(block)
    assert all(s.compute.nbytes() == 0 and s.master.numel() == s.nbytes for s in block.storages)
    swap.remove()


# ---- trainable parameters and remove -------------------------------------------------------------


def test_trainable_parameters_are_never_moved_or_replaced():
    model = training_model()
    params = trainable(model)
    pointers = {n: p.data_ptr() for n, p in params.items()}
    optimizer = torch.optim.AdamW(list(params.values()), lr=1e-2)
    swap = BlockSwap(model.transformer, BLOCKS, "cpu")
    lora_in_swapped = [n for n in params if n.startswith("transformer.") and "lora_" in n]
    assert lora_in_swapped  # the peft LoRA lives inside the swapped Linears
    moved: list[str] = []

    def check(*_):
        for n, p in params.items():
            if p.untyped_storage().nbytes() == 0 or p.data_ptr() != pointers[n]:
                moved.append(n)

    hooks = [b.register_forward_pre_hook(check) for _, b in transformer_blocks(model.transformer)]
    hooks += [b.register_forward_hook(check) for _, b in transformer_blocks(model.transformer)]
    loss_of(model).backward()
    optimizer.step()
    check()
    assert moved == []
    assert all(a is b for a, b in zip(optimizer.param_groups[0]["params"], trainable(model).values(), strict=True))
    for h in hooks:
        h.remove()
    swap.remove()


def _hook_counts(module: nn.Module) -> list[tuple[str, int, int, int]]:
    return [
        (n, len(m._forward_pre_hooks), len(m._forward_hooks), len(m._backward_hooks)) for n, m in module.named_modules()
    ]


@pytest.mark.parametrize("checkpointing", ["plain", "checkpointing"])
def test_remove_restores_the_model_exactly(checkpointing):
    model = training_model(checkpointing)
    before = {n: (p, p.detach().clone(), p.stride(), p.device, p.requires_grad) for n, p in model.named_parameters()}
    hooks = _hook_counts(model)
    with torch.no_grad():
        want = loss_of(model)
    with BlockSwap(model.transformer, 3, "cpu") as swap:
        loss_of(model).backward()
        assert swap.resident() == []
    model.zero_grad(set_to_none=True)
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for n, (p, value, stride, device, grad) in before.items():
        assert after[n] is p, n
        assert torch.equal(p, value) and p.dtype == value.dtype, n
        assert (p.stride(), p.device, p.requires_grad) == (stride, device, grad), n
        assert p.untyped_storage().nbytes() >= p.numel() * p.element_size(), n
    assert _hook_counts(model) == hooks
    with torch.no_grad():
        assert torch.equal(loss_of(model), want)
    swap.remove()  # twice is harmless


# ---- with a quantized base -----------------------------------------------------------------------


def test_block_swap_moves_a_quantized_bases_buffers_and_stays_exact():
    quantize = pytest.importorskip("training.quantize")
    models = []
    for _ in range(2):
        model = training_model()
        quantize.quantize_base(model.transformer, "int8")
        models.append(model)
    want = train_steps(models[0])
    swap = BlockSwap(models[1].transformer, BLOCKS, "cpu")
    buffers = [b for _, blk in transformer_blocks(models[1].transformer) for b in blk.buffers()]
    assert buffers and all(b.untyped_storage().nbytes() == 0 for b in buffers)  # the int8 data moved too
    got = train_steps(models[1])
    assert all(torch.equal(a, b) for a, b in zip(got[0], want[0], strict=True))
    for g, w in zip(got[1], want[1], strict=True):
        assert all(torch.equal(g[n], w[n]) for n in w)
    swap.remove()


# ---- refusals -------------------------------------------------------------------------------------


def test_counts_outside_the_blocks_are_config_errors():
    model = training_model()
    with pytest.raises(ConfigError, match=r"model\.block_swap=5 is too large: it must be an integer from 0 to 4"):
        BlockSwap(model.transformer, 5, "cpu")
    with pytest.raises(ConfigError, match=r"model\.block_swap=-1 is too small"):
        BlockSwap(model.transformer, -1, "cpu")
    with pytest.raises(ConfigError, match="must be an integer"):
        BlockSwap(model.transformer, 1.0, "cpu")
    with pytest.raises(BlockSwapError, match="offloads to the CPU"):
        BlockSwap(model.transformer, 1, "cpu", "meta")
    with pytest.raises(BlockSwapError, match="diffusers Flux transformer"):
        BlockSwap(nn.Linear(2, 2), 1, "cpu")
    hooks = _hook_counts(model)
    none = BlockSwap(model.transformer, 0, "cpu")
    assert none.blocks == [] and none.swapped_bytes == 0 and _hook_counts(model) == hooks


def test_shared_memory_and_diffusers_weight_hooks_are_refused():
    model = training_model()
    block = model.transformer.single_transformer_blocks[1]
    block.register_buffer("tied", model.transformer.x_embedder.weight.data[:1])  # memory of a kept layer
    with pytest.raises(BlockSwapError, match="shares its memory"):
        BlockSwap(model.transformer, 1, "cpu")
    assert block.tied.untyped_storage().nbytes() > 0
    plain = tiny_flux(0).requires_grad_(False)
    plain.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    with pytest.raises(BlockSwapError, match="enable_layerwise_casting"):
        BlockSwap(plain, 1, "cpu")


# ---- two processes --------------------------------------------------------------------------------


RANK_SCRIPT = """
import sys
from tests.training.test_offload import rank_main

rank_main(sys.argv[1])
"""


def rank_main(out: str) -> None:
    """One DDP process (gloo, started by torchrun): the trainer's DDP set-up (frozen parameters
    ignored), checkpointing on, block swap of every block on its own copy, or none; its gradients
    after two backward passes to ``out``."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        for count in (0, BLOCKS):
            model = training_model("checkpointing")
            frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
            swap = BlockSwap(model.transformer, count, "cpu")
            ddp = nn.parallel.DistributedDataParallel(model)
            for step in range(2):
                model.zero_grad(set_to_none=True)
                loss_of(ddp, seed=10 * rank + step).backward()
            assert swap.resident() == []
            grads = {n: p.grad for n, p in trainable(model).items()}
            torch.save(grads, f"{out}/rank{rank}-swap{count}.pt")
            swap.remove()
    finally:
        dist.destroy_process_group()


def test_two_processes_each_swap_their_own_copy(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*launcher, str(script), str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    grads = {(r, c): torch.load(tmp_path / f"rank{r}-swap{c}.pt") for r in (0, 1) for c in (0, BLOCKS)}
    for key in grads[0, 0]:
        assert torch.equal(grads[0, BLOCKS][key], grads[0, 0][key]), key  # block swap changes nothing
        assert torch.equal(grads[1, BLOCKS][key], grads[0, BLOCKS][key]), key  # DDP averaged them
