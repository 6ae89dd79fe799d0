"""The embedded default: a tiny synthetic Kontext model routed by a handful of instructions.

Runs in seconds on a CPU with no downloads: builds a tiny random Kontext-shaped transformer and
tiny text encoders, writes and reloads a random adapter, routes instructions, prints the
councils, checks that the dynamic, fixed and merged paths agree, and writes a heat map PNG.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from . import Adapter, InstructMoLE, apply_rules, attach, load_adapter
from .tiny import kontext_inputs, tiny_flux, tiny_mole_config, tiny_text_encoders
from .viz import council_heatmap

INSTRUCTIONS = [
    "make the sky a stormy purple",
    "turn the cat into a watercolor painting",
    "extract the canny edges",
    "render the pose skeleton",
]


def run(out_dir: Path, rules: str = "single force 0; double ban 1") -> dict:
    torch.manual_seed(0)
    transformer = tiny_flux(seed=0)
    config = tiny_mole_config(transformer)
    model = InstructMoLE(config)
    with torch.no_grad():  # a trained adapter has non-zero experts and decisive gates
        for _, layer in model.named_layers():
            layer.B.normal_(std=0.05)
            layer.gate.weight.normal_(std=0.15)
    path = Adapter(model, metadata={"source": "instructmole demo (random weights)"}).save(out_dir / "demo.safetensors")
    adapter = load_adapter(path)
    print(f"adapter  {path}  ({len(config.layers)} MoLE layers, N={config.num_experts}, k={config.top_k})")

    encoders = tiny_text_encoders(config.text_dim, config.router_dim, config.text_length)
    text, pooled = encoders.encode(INSTRUCTIONS)
    council = adapter.route(text, pooled, labels=INSTRUCTIONS)
    for b, instruction in enumerate(INSTRUCTIONS):
        print(f"\n{instruction!r}")
        for row, name in enumerate(council.layers):
            members = ", ".join(f"{e}:{w:.2f}" for e, w in council.members(b, row))
            print(f"  {name:<40} {members}")

    inputs = kontext_inputs(text, pooled)
    with torch.no_grad():
        base = transformer(**inputs)[0]
        with attach(transformer, adapter):
            auto = transformer(**inputs)[0]
        with attach(transformer, adapter, council=council.row(0)):
            fixed = transformer(**inputs)[0]
        with attach(transformer, adapter, mode="merged", council=council.row(0)):
            merged = transformer(**inputs)[0]
        restored = transformer(**inputs)[0]
    checks = {
        "adapter changes the output": float((auto - base).abs().max()),
        "fixed(row 0) - auto(row 0)": float((fixed[0] - auto[0]).abs().max()),
        "merged - fixed": float((merged - fixed).abs().max()),
        "detached - base": float((restored - base).abs().max()),
    }
    print()
    for what, value in checks.items():
        print(f"{what:<28} max |diff| = {value:.2e}")

    overridden = apply_rules(council, rules)
    council_heatmap(council, title="routed councils (frame = member, label = weight)").save(out_dir / "councils.png")
    council_heatmap(overridden, title=f"after: {rules}").save(out_dir / "councils-overridden.png")
    print(f"\nheat maps  {out_dir / 'councils.png'}  {out_dir / 'councils-overridden.png'}")
    return checks


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="where to write the adapter and PNGs")
    parser.add_argument("--rules", default="single force 0; double ban 1", help="override rules to preview")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    checks = run(args.out, args.rules)
    ok = checks["adapter changes the output"] > 1e-4 and all(
        v < 1e-4 for k, v in checks.items() if k != "adapter changes the output"
    )
    print("demo OK" if ok else "demo FAILED: paths disagree")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
