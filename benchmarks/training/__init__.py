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

With ``--quantize-base {fp8,int8,nf4}`` (``--fp8-base`` is its earlier name for fp8), ``--block-swap
N|all`` and ``--optimizer {adamw,adamw8bit,adafactor,prodigy}`` a fourth measurement follows on a fresh
transformer: ``ours`` with that ``model.quantize_base`` (every frozen Linear stored quantized,
dequantised per layer), ``model.block_swap`` (the last N blocks' frozen weights wait in CPU memory) and
``train.optimizer``, applied by the trainer's own code. It needs its own transformer, so it runs after
the others (not interleaved with them).

``--memory-options [LIST]`` measures ``ours`` alone, once per memory option (default: the base, fp8,
int8, nf4, nf4 + 8-bit AdamW, every block swapped, nf4 with every block swapped; ``options.py`` reads
the list), each on its own transformer in turn, with the trainer's own optimizer
(``training.optim.build_optimizer``: fused AdamW). An option whose library is missing here
(bitsandbytes for nf4 and 8-bit AdamW, prodigyopt) is a row "skipped: <the trainer's sentence>", one
that fails a row "failed: <its error>"; the run goes on. Block swap's CPU-resident weights are a column
of their own, outside the peak, as a GPU would hold them.

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
    PYTHONPATH=. .venv/bin/python -m benchmarks.training --device cpu --memory-options   # -> training-cpu-memory.json

Modules, by concern:

* ``setting``        what every variant shares: sizes, the trainer's config, the random transformer,
                     one micro-batch, the flow loss;
* ``options``        the memory options (``MemoryOption``): specs, names, the trainer's config keys;
* ``variants``       ``ours`` and ``plain LoRA``; ``reference_way`` the paper's way, the baseline;
* ``bench``          the transformer with its variants installed one at a time, and one training step;
* ``memory``         glibc's allocator mode and the peak RSS of a step (CPU);
* ``measure``        warm-up, interleaved timed rounds and the memory samples; one memory option's rows
                     (``measure_option``, also the GPU check's training stage);
* ``report``         targets, anchors, the JSON summary and the markdown report;
* ``run``            the command line (``main``).
"""

from __future__ import annotations

from .bench import TrainingBench
from .options import MemoryOption
from .run import main
from .setting import SIZES, VARIANTS, TrainShape

__all__ = ["SIZES", "VARIANTS", "MemoryOption", "TrainShape", "TrainingBench", "main"]
