"""ICEdit-style per-token routed experts: our token path vs the dense all-experts way, per layer.

One routed Linear of FLUX at scaled shapes (default 1/4 of FLUX.1's widths and token counts):
single-block ``proj_out`` (15360 -> 3072 at full size, text + image tokens) and double-block
``ff.net.2`` (12288 -> 3072, image tokens), experts of rank 32: ICEdit's N = 4 with k = 1 (as it
runs) and k = 2, and N = 8 with k = 2.

* ``token`` — ours (``token_route`` with renormalised weights + ``token_delta``): with k ≤ N/4
  the tokens are grouped by expert and each group meets only its own expert (one grouped GEMM
  for the down- and one for the up-projection); above that, every expert's down-projection in one
  matmul of width N·r, masked to each token's choice, then one matmul with the stacked B.
* ``dense`` — every expert's full output ``[t, N, o]`` materialised, then mixed (the plain way).
* ``base`` — the frozen Linear ``W0 x`` alone, for scale.

The variants run interleaved round by round and report medians; their outputs are compared.
Run: ``python -m benchmarks.icedit [--quick] [--device cpu] [--dtype float32]
[--out benchmarks/results/icedit-cpu.json]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch

from benchmarks.common import environment, log, markdown_table, median, sync, write_json
from instructmole.experts import token_delta, token_route

FULL = {"single.proj_out": (15360, 3072, 4096 + 512), "double.ff.net.2": (12288, 3072, 4096)}


def dense(x, A, B, gate, k):
    logits = x @ gate.t()
    top, idx = logits.topk(k, dim=-1)
    mix = torch.zeros_like(logits).scatter(-1, idx, top.softmax(-1))
    every = torch.einsum("bti,nir,nro->btno", x, A, B)
    return torch.einsum("btno,btn->bto", every, mix)


def ours(x, A, B, gate, k):
    _, idx, w = token_route(x, gate, k, renormalise=True)
    return token_delta(x, A, B, idx, w.to(x.dtype), 1.0)


CASES = ((4, 1), (4, 2), (8, 2))  # (experts, k)


def measure(scale: float, rank: int, rounds: int, device: torch.device, dtype: torch.dtype) -> tuple[list, dict]:
    rows, data = [], {}
    g = torch.Generator().manual_seed(0)
    for layer, (fin, fout, tokens) in FULL.items():
        i, o, t = int(fin * scale), int(fout * scale), int(tokens * scale)
        x = torch.randn(1, t, i, generator=g).to(device, dtype)
        W = (torch.randn(o, i, generator=g) / i**0.5).to(device, dtype)
        for experts, k in CASES:
            A = (torch.randn(experts, i, rank, generator=g) / i**0.5).to(device, dtype)
            B = (torch.randn(experts, rank, o, generator=g) * 0.1).to(device, dtype)
            gate = torch.randn(experts, i, generator=g).to(device, dtype)
            args = (x, A, B, gate, k)
            fns = {
                "base": lambda x=x, W=W: x @ W.t(),
                "token": lambda a=args: ours(*a),
                "dense": lambda a=args: dense(*a),
            }
            samples: dict[str, list[float]] = {n: [] for n in fns}
            with torch.no_grad():
                outs = {n: f() for n, f in fns.items()}  # warm-up, and the outputs to compare
                for r in range(rounds):
                    names = list(fns)
                    names = names[r % len(names) :] + names[: r % len(names)]
                    for n in names:
                        sync(device)
                        start = time.perf_counter()
                        fns[n]()
                        sync(device)
                        samples[n].append(time.perf_counter() - start)
            diff = float((outs["token"].float() - outs["dense"].float()).abs().max())
            ms = {n: median(s) * 1e3 for n, s in samples.items()}
            key = f"{layer} N={experts} k={k}"
            data[key] = {
                "shape": [t, i, o],
                "ms": ms,
                "max_abs_diff": diff,
                "dense_over_token": ms["dense"] / ms["token"],
            }
            rows.append(
                [key, f"{t}x{i}->{o}", f"{ms['base']:.2f}", f"{ms['token']:.2f}", f"{ms['dense']:.2f}",
                 f"{ms['dense'] / ms['token']:.2f}x", f"{diff:.1e}"]
            )  # fmt: skip
            log(f"{key}: token {ms['token']:.2f} ms, dense {ms['dense']:.2f} ms")
    return rows, data


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, few rounds (smoke test)")
    p.add_argument("--scale", type=float, default=0.25, help="fraction of FLUX.1's widths and token counts")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16"), help="bfloat16: the CUDA grouped GEMM's type"
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    scale, rounds = (0.02, 2) if args.quick else (args.scale, args.rounds)
    dtype = getattr(torch, args.dtype)
    rows, data = measure(scale, 32, rounds, device, dtype)
    print(
        markdown_table(
            ["layer", "tokens x in -> out", "base W0x ms", "token (ours) ms", "dense ms", "dense/token", "max |diff|"],
            rows,
        )
    )
    result = {"scale": scale, "rank": 32, "dtype": args.dtype, "results": data, "environment": environment(device)}
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
