"""Load time of a full-size InstructMoLE adapter (the reference layout: 57 layers, N=8, r=32, router).

Why: the design targets loading a full-size adapter (~254 M expert parameters) in ≤ 2 s. The file is
written here with zero weights (load time does not depend on the values) in bf16, then loaded with
``load_adapter`` (parse, validate every name/shape/dtype, build the module on the meta device and
assign the tensors), and once more while reading every byte, so lazily mapped tensors are counted.
Page cache is warm: this measures the library, not the disk.

    PYTHONPATH=. .venv/bin/python -m benchmarks.load [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

import instructmole as im
from instructmole.model import InstructMoLE

from .common import median, write_json


def full_size_adapter(dtype: torch.dtype = torch.bfloat16) -> im.Adapter:
    config = im.MoLEConfig.for_flux()
    with torch.device("meta"):
        shapes = InstructMoLE(config)
    tensors = {}
    for name, layer in shapes.named_layers():
        tensors[f"mole.{name}.A"] = torch.zeros(layer.A.shape, dtype=dtype)
        tensors[f"mole.{name}.B"] = torch.zeros(layer.B.shape, dtype=dtype)
        tensors[f"mole.{name}.gate"] = torch.zeros(layer.gate.weight.shape, dtype=dtype)
    for key, value in shapes.router.state_dict().items():
        tensors[f"router.{key}"] = torch.zeros(value.shape, dtype=dtype)
    return im.Adapter.from_tensors(config, tensors)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    adapter = full_size_adapter()
    params = adapter.model.num_parameters()
    with tempfile.TemporaryDirectory(prefix="instructmole-load-") as tmp:
        path = adapter.save(Path(tmp) / "full.safetensors")
        size_mb = path.stat().st_size / 2**20
        load_s, read_s = [], []
        for _ in range(args.reps):
            start = time.perf_counter()
            im.load_adapter(path, device=device)
            sync()
            load_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            loaded = im.load_adapter(path, device=device)
            for value in loaded.tensors().values():
                value.float().sum().item()  # touch every byte
            read_s.append(time.perf_counter() - start)
    result = {
        "device": str(device),
        "expert_parameters": params["experts"],
        "file_mb": size_mb,
        "load_s": median(load_s),
        "load_and_read_all_s": median(read_s),
    }
    print("| what | value |\n|---|---|")
    print(f"| adapter | {params['experts'] / 1e6:.0f} M expert parameters, {size_mb:.0f} MiB bf16 |")
    print(f"| load_adapter to {device} | {result['load_s']:.3f} s |")
    print(f"| load_adapter + read every byte | {result['load_and_read_all_s']:.3f} s |")
    write_json(args.out or Path(f"benchmarks/results/load-{device.type}.json"), result)
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
