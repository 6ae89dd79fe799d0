"""Measure how closely two processes train what one process trains, in fp32 and under bf16 autocast.

    .venv/bin/python -m tests.training.agreement [--steps 24] [--out /tmp/agreement]

Builds the tiny Kontext pipeline and its synthetic data set, then trains the same config four times
through the user's commands: ``python -m training`` (one process) and ``accelerate launch --multi_gpu
--num_processes 2 -m training`` (two gloo processes on a machine without CUDA), each with
``train.mixed_precision=no`` and ``=bf16``. Prints, per precision, the largest absolute difference
between the two final adapters and that difference relative to the largest weight. Two processes
add their gradients in another order than one process does, so fp32 agrees to rounding; bf16 autocast
rounds every product to 8 bits of mantissa, and those rounding differences grow over the steps.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "training" / "configs" / "tiny_demo.yaml"


def _train(cmd: list[str], overrides: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*cmd, "--config", str(CONFIG), *overrides], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if proc.returncode:
        sys.exit(f"training failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--out", type=Path, default=Path("/tmp/instructmole-agreement"))
    args = parser.parse_args(argv)
    from instructmole.tiny import save_tiny_kontext
    from training.synthetic import all_phrasings, write_dataset

    out: Path = args.out
    model = out / "model"
    if not (model / "transformer").is_dir():
        save_tiny_kontext(model, seed=0, text_length=32, corpus=all_phrasings())
    manifest = write_dataset(out / "data", images=16, holdout_images=2)
    one = [sys.executable, "-m", "training"]
    two = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "training",
    ]
    print(f"{args.steps} steps, global batch 8, tiny pipeline; the final adapters of one and two processes")
    for precision in ("no", "bf16"):
        adapters = {}
        for name, cmd in (("one", one), ("two", two)):
            run = out / f"{precision}-{name}"
            overrides = [
                f"model.pretrained={model}",
                f"data.manifest={manifest}",
                f"train.output_dir={run}",
                f"train.max_steps={args.steps}",
                f"save.every={args.steps}",
                "train.batch_size=8",
                "save.report=false",
                "log.progress=false",
                f"train.mixed_precision={precision}",
            ]
            _train(cmd, [*overrides, "--overwrite"])
            adapters[name] = load_file(str(run / "instructmole.safetensors"))
        a, b = adapters["one"], adapters["two"]
        worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        scale = max(float(a[k].float().abs().max()) for k in a)
        label = "fp32" if precision == "no" else "bf16"
        print(f"  {label}: max |one - two| = {worst:.3g} (largest weight {scale:.3g}, relative {worst / scale:.3g})")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
