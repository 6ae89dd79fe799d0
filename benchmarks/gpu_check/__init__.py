"""A prepared GPU check: one command that answers, within a few minutes of a lent GPU, what CPU tests cannot.

Why it exists: a GPU machine is lent to a task by chance, for 15 minutes including its start, with no
network. A check that is not written, dry-run and sized in advance never happens in that window. So
``benchmarks/gpu_check.sh`` runs, on full-size random-weight FLUX.1 Kontext shapes in bf16:

* ``environment``    what runs (torch, CUDA, the GPU, which optional packages were found);
* ``load``           ``load_adapter`` of a full-size adapter (57 layers, N = 8, r = 32, router);
* ``core``           dynamic (auto), fixed and merged against the core's plain formula
                     (``benchmarks.inference.DenseReference``), speed ratios over the base forward,
                     folding a council into the 57 layers, peak memory;
* ``training``       one step of the trainer (reference recipe, 1024² + one reference) after one
                     warm-up step under each memory option (bf16, fp8, int8, nf4, nf4 + 8-bit AdamW,
                     every block swapped): ms per step and peak memory, a row per option;
* ``comfy-legacy``   inside ComfyUI with its classic ``ModelPatcher``: the adapter's effect and a
                     LoRA's effect, stacked (core LoRA loader before and after the adapter, and a
                     hook LoRA on the conditioning), each equal their effect alone;
* ``comfy-dynamic``  the same under dynamic VRAM (``ModelPatcherDynamic``, ComfyUI's default on
                     NVIDIA), where a hooked conditioning makes the sampler run a non-dynamic delegate.

Every stage runs in its own process with its own time limit (the limits add up to the budget, so
the whole check cannot outlast it), reports ``ok``, ``skipped (reason)`` or ``failed (reason)``, and
the check goes on. Results are written after every stage: ``gpu_check.json`` and ``gpu_check.md``.
``--dry-run`` runs the same code paths with tiny shapes on the CPU (the CI test does).
"""

from __future__ import annotations
