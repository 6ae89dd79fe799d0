"""``python -m instructmole``: inspect an adapter file, or convert a reference checkpoint folder."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from tqdm import tqdm

from .adapter import AdapterError, describe, load_adapter
from .config import ConfigError
from .reference import import_reference


def _inspect(args: argparse.Namespace) -> int:
    info = describe(load_adapter(args.file))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    p = info["parameters"]
    routing = {}
    for layer in info["layers"]:
        routing[layer["routing"]] = routing.get(layer["routing"], 0) + 1
    print(f"adapter      {args.file}")
    print(f"base model   {info['base_model']}   id {info['adapter_id']}")
    print(f"experts      N={info['num_experts']} k={info['top_k']} rank={info['rank']} alpha={info['alpha']:g}")
    print(f"layers       {len(info['layers'])} ({', '.join(f'{v} {k}-routed' for k, v in routing.items())})")
    for layer in info["layers"]:
        print(f"  {layer['name']:<45} {layer['in']:>6} -> {layer['out']:<6} {layer['routing']}")
    print(f"plain LoRA   {len(info['lora_modules'])} modules")
    print(f"parameters   experts {p['experts']:,}  gates {p['gates']:,}  router {p['router']:,}  lora {p['lora']:,}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    with tqdm(desc="importing layers", unit="layer", disable=args.quiet) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        adapter = import_reference(args.folder, progress=progress)
    path = adapter.save(args.out)
    n = len(adapter.config.layers)
    print(f"wrote {path} ({n} MoLE layers, {len(adapter.lora_parts())} LoRA modules, id {adapter.adapter_id})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m instructmole", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="show an adapter's config, layers and parameter counts")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print the full description as JSON")
    p.set_defaults(run=_inspect)
    p = sub.add_parser("convert", help="convert a reference checkpoint folder into one adapter file")
    p.add_argument("folder")
    p.add_argument("out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_convert)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (AdapterError, ConfigError) as err:  # a user's mistake: one sentence, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
