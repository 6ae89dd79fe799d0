"""How close is routing from ComfyUI's T5 features (padded to 256) to routing as trained (512)?

The router was trained on T5 features of the instruction padded to 512 tokens with no attention
mask; ComfyUI's own conditioning pads to 256, and without a mask the padding changes every
token's features. This measures the councils both ways for a set of instructions on the tiny
synthetic model (random T5/CLIP and a random adapter): the share of layers whose council (the
set of chosen experts) is identical, and the mean absolute difference of router probabilities.

    python benchmarks/routing_fidelity.py [--out benchmarks/results/routing-fidelity.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from instructmole import Adapter, InstructMoLE
from instructmole.tiny import _CORPUS, tiny_mole_config, tiny_text_encoders


def measure(seeds: Sequence[int] = (0, 1, 2), short: int = 256, long: int = 512) -> dict:
    same_sets, prob_diffs, weight_diffs = [], [], []
    for seed in seeds:
        torch.manual_seed(seed)
        config = tiny_mole_config(text_length=long)
        model = InstructMoLE(config)
        with torch.no_grad():
            for _, layer in model.named_layers():
                layer.gate.weight.normal_(std=0.15)  # the demo's router scale: councils neither flat nor one-hot
        adapter = Adapter(model)
        enc = tiny_text_encoders(config.text_dim, config.router_dim, long, seed=seed)
        exact = adapter.route(*enc.encode(_CORPUS))
        enc.text_length = short
        approx = adapter.route(*enc.encode(_CORPUS))
        same = ((exact.weights != 0) == (approx.weights != 0)).all(-1)
        same_sets.append(same.float().mean().item())
        prob_diffs.append((exact.probs - approx.probs).abs().mean().item())
        weight_diffs.append((exact.weights - approx.weights).abs().sum(-1).mean().item())
    return {
        "instructions": len(_CORPUS),
        "seeds": list(seeds),
        "padding": {"exact": long, "comfyui": short},
        "identical_council_share": sum(same_sets) / len(same_sets),
        "mean_abs_prob_diff": sum(prob_diffs) / len(prob_diffs),
        "mean_l1_weight_diff_per_layer": sum(weight_diffs) / len(weight_diffs),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/routing-fidelity.json"))
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    result = measure(range(args.seeds))
    print("| padding | identical councils | mean abs prob diff | mean L1 weight diff / layer |")
    print("|---|---|---|---|")
    print(
        f"| 256 vs 512 | {100 * result['identical_council_share']:.1f}% | {result['mean_abs_prob_diff']:.4f} "
        f"| {result['mean_l1_weight_diff_per_layer']:.4f} |"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
