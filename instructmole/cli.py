"""``python -m instructmole``: inspect an adapter file, print its card (``info``), convert a reference
checkpoint folder, or export a council as a plain LoRA file (``export-lora``).

Every user mistake (a bad file, a bad argument, an output that cannot be written) ends the command
with exit status 2 and one line ``error: ...`` on stderr, never a traceback; Ctrl-C ends it with
status 130 and one line, and leaves no partial file behind (writes go through ``atomic_path``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import torch
from tqdm import tqdm

from .adapter import FORMAT, AdapterError, describe
from .card import (
    hash_path,
    is_adapter_metadata,
    preview_path,
    read_card,
    read_card_metadata,
    recorded_sha256,
    render_card,
    verify,
)
from .config import ConfigError, MoLEConfig
from .errors import InstructMoLEError
from .formats import load_adapter, read_metadata, read_tensors
from .icedit import convert_icedit, is_icedit
from .reference import import_reference, reference_inputs

ADAPTER_SUFFIX = ".safetensors"
MAX_COUNCIL_BYTES = 16 << 20  # a full-size council JSON is about 20 KB


class UsageError(InstructMoLEError):
    """A command-line argument is malformed (argparse's own complaints, reworded to one line)."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so every error is one line."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}; see '{self.prog} --help'")


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
    card = read_card(args.file)
    print(f"card         {f'{card.title}; see info' if card else 'none'}")
    return 0


def _adapter_kind(path: Path, meta: dict[str, str]) -> str:
    """What ``info`` says the file is: one line from the header (our config) or the key names
    (ICEdit), without reading a tensor; anything else is the loader's own one-sentence refusal."""
    if is_adapter_metadata(meta):
        try:
            cfg = MoLEConfig.from_json(meta.get("config", ""))
        except (ConfigError, TypeError, ValueError):
            return "InstructMoLE adapter (its config does not parse: 'inspect' says why)"
        routing: dict[str, int] = {}
        for spec in cfg.layers:
            routing[spec.routing] = routing.get(spec.routing, 0) + 1
        layers = ", ".join(f"{n} {kind}-routed" for kind, n in routing.items())
        return (
            f"InstructMoLE adapter: N={cfg.num_experts} k={cfg.top_k} rank={cfg.rank} alpha={cfg.alpha:g}, "
            f"{len(cfg.layers)} layers ({layers})"
        )
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    if is_icedit(keys):
        return "ICEdit MoE-LoRA (read by InstructMoLE, converted on load)"
    raise AdapterError(
        f"'{path.name}' is a safetensors file but not an InstructMoLE adapter (its metadata has no format "
        f"'{FORMAT}' and no ICEdit MoE-LoRA keys); 'info' prints the card of an adapter file"
    )


def _info(args: argparse.Namespace) -> int:
    """``info``: the adapter's card, what lies beside it (preview, .sha256) and, with ``--verify``,
    whether the recorded hashes still match. Reads only the header unless asked to verify."""
    path = Path(args.file)
    meta, card = read_card_metadata(path)
    kind = _adapter_kind(path, meta)
    preview = preview_path(path)
    recorded = recorded_sha256(path)
    checks = verify(path, card) if args.verify else []
    if args.json:
        print(
            json.dumps(
                {
                    "file": str(path),
                    "kind": kind,
                    "card": card.to_dict() if card else None,
                    "preview": str(preview) if preview.is_file() else None,
                    "sha256": recorded,
                    "verify": [{"what": w, "matches": ok, "actual": detail} for w, ok, detail in checks],
                },
                indent=2,
                ensure_ascii=False,
            )
        )
    else:
        print(f"adapter      {path}")
        print(f"kind         {kind}")
        print(render_card(card))
        print(f"preview      {preview.name if preview.is_file() else 'none'}")
        print(f"sha256       {recorded or f'none ({hash_path(path).name} is missing or names another file)'}")
        for what, ok, detail in checks:
            state = "not recorded" if ok is None else "matches" if ok else f"DOES NOT MATCH (the file gives {detail})"
            print(f"verify       {what}: {state}")
    return 1 if any(ok is False for _, ok, _ in checks) else 0


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same inode when both exist (hard links, symlinks,
    bind mounts), else the same resolved path."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_output(out: str, folder: str, overwrite: bool) -> Path:
    """Refuse an output path that is empty, not ``.safetensors``, a folder, one of the checkpoint's
    own files (converting must never destroy its source), or an existing file without ``overwrite``."""
    if not out.strip():
        raise AdapterError("the output path is empty; name the adapter file to write, e.g. 'adapter.safetensors'")
    path = Path(out)
    if path.is_dir():
        raise AdapterError(f"output '{path}' is a folder; name a file inside it, e.g. '{path / 'adapter.safetensors'}'")
    for source in reference_inputs(folder):
        if _same_file(path, source):
            raise AdapterError(
                f"output '{path}' is the checkpoint's own '{source.name}', which the conversion reads; write the "
                "adapter somewhere else"
            )
    if path.suffix != ADAPTER_SUFFIX:
        raise AdapterError(
            f"output '{path}' must end in {ADAPTER_SUFFIX}: adapters are safetensors files, and ComfyUI lists "
            "only those"
        )
    if path.exists() and not overwrite:
        raise AdapterError(f"output '{path}' already exists; pass --overwrite to replace it")
    return path


def _convert_icedit(args: argparse.Namespace) -> int:
    """``convert`` with an ICEdit MoE-LoRA .safetensors file as input (``icedit.py``)."""

    source = Path(args.folder)
    for flag in ("alpha", "router_heads", "router_head_dim", "lora_alpha"):
        if getattr(args, flag) is not None:
            raise UsageError(
                f"--{flag.replace('_', '-')} does not apply to an ICEdit MoE-LoRA file (its scale is 1 and it has "
                "no instruction router); only --top-k does"
            )
    if _same_file(Path(args.out), source):
        raise AdapterError(f"output '{args.out}' is the ICEdit file the conversion reads; write the adapter elsewhere")
    out = check_output(args.out, args.folder, args.overwrite)
    meta = read_metadata(source)
    if meta.get("format") == "instructmole":
        raise AdapterError(f"'{source.name}' is already an InstructMoLE adapter; there is nothing to convert")
    top_k = 1 if args.top_k is None else args.top_k
    adapter = convert_icedit(read_tensors(source, torch.device("cpu")), top_k=top_k, metadata=meta, source=source.name)
    try:
        path = adapter.save(out)
    except OSError as err:
        raise AdapterError(f"could not write '{out}': {err.strerror or err}; nothing was written") from None
    n = len(adapter.config.layers)
    print(f"wrote {path} ({n} token-routed layers, {len(adapter.lora_parts())} LoRA modules, id {adapter.adapter_id})")
    return 0


def _convert(args: argparse.Namespace) -> int:
    if Path(args.folder).is_file():
        return _convert_icedit(args)
    out = check_output(args.out, args.folder, args.overwrite)
    with tqdm(desc="importing layers", unit="layer", disable=args.quiet) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        adapter = import_reference(
            args.folder,
            progress=progress,
            top_k=args.top_k,
            alpha=args.alpha,
            router_heads=args.router_heads,
            router_head_dim=args.router_head_dim,
            lora_alpha=args.lora_alpha,
        )
    try:
        path = adapter.save(out)
    except OSError as err:  # disk full, read-only, permissions: the OS's reason, about the output
        raise AdapterError(f"could not write '{out}': {err.strerror or err}; nothing was written") from None
    n = len(adapter.config.layers)
    print(f"wrote {path} ({n} MoLE layers, {len(adapter.lora_parts())} LoRA modules, id {adapter.adapter_id})")
    if "router_heads_default" in adapter.config.extra:
        cfg = adapter.config
        print(
            f"router: {cfg.router_heads} heads of {cfg.router_head_dim}, the reference code's (the folder does not "
            "record a head count; pass --router-heads to choose another)"
        )
    return 0


def _export_lora(args: argparse.Namespace) -> int:
    """``export-lora``: a council (+ the adapter's plain LoRA) as a standard LoRA file (``export.py``)."""
    from .council import Council
    from .export import DTYPES, ExportError, export_council_lora

    council_file = Path(args.council)
    try:
        if council_file.stat().st_size > MAX_COUNCIL_BYTES:
            raise ExportError(f"'{council_file}' is over {MAX_COUNCIL_BYTES >> 20} MB; a council file is a few KB")
        data = json.loads(council_file.read_text(encoding="utf-8"))
    except OSError as err:
        raise ExportError(f"cannot read the council file '{council_file}': {err.strerror or err}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ExportError(f"'{council_file}' is not a council JSON file ({_reason(err)})") from None
    council = Council.from_dict(data)
    if args.row is not None:
        council = council.row(args.row)
    if args.dtype not in DTYPES:
        raise UsageError(f"--dtype {args.dtype!r} is not possible; choose one of: {', '.join(DTYPES)}")
    adapter = load_adapter(args.adapter)
    try:
        result = export_council_lora(
            adapter,
            council,
            args.out,
            overwrite=args.overwrite,
            rank=args.rank,
            with_lora=args.with_lora,
            lora_strength=args.strength,
            expert_strength=args.expert_strength,
            dtype=args.dtype,
        )
    except OSError as err:
        raise ExportError(f"could not write '{args.out}': {err.strerror or err}; nothing was written") from None
    print(result.report())
    print(f"wrote {args.out}")
    return 0


def _reason(err: BaseException) -> str:
    return getattr(err, "msg", None) or type(err).__name__


def _parser() -> _Parser:
    parser = _Parser(prog="python -m instructmole", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("inspect", help="show an adapter's config, layers and parameter counts")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print the full description as JSON")
    p.set_defaults(run=_inspect)
    p = sub.add_parser(
        "info",
        help="print an adapter's card: base model, tasks and example instructions, training settings, step, hashes",
        description="Reads the card the trainer writes into the file's metadata (modelspec.* and instructmole.* "
        "keys) and names the preview and .sha256 files beside it. Files made before cards print 'card none'. "
        "Exit status 1 when --verify finds a hash that does not match.",
    )
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print the card as JSON")
    p.add_argument("--verify", action="store_true", help="recompute the tensor hash and the file's sha256")
    p.set_defaults(run=_info)
    p = sub.add_parser(
        "convert",
        help="convert a reference checkpoint folder (or an ICEdit MoE-LoRA file) into one adapter file",
        description="Settings the tensors cannot tell come from the folder's train_config.json; the flags "
        "replace them (and are required where the config does not record them).",
    )
    p.add_argument("folder", help="the reference training checkpoint folder, or an ICEdit MoE-LoRA .safetensors file")
    p.add_argument("out", help=f"the adapter file to write (must end in {ADAPTER_SUFFIX})")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument(
        "--top-k", type=int, help="council size (moe_config.num_experts_per_tok); for ICEdit, experts per token (1)"
    )
    p.add_argument("--alpha", type=float, help="experts' LoRA alpha (moe_config.alpha)")
    p.add_argument(
        "--router-heads",
        type=int,
        help="router attention heads (default: train_config.json's, else the reference's 12)",
    )
    p.add_argument("--router-head-dim", type=int, help="router attention head width (reference code: 64)")
    p.add_argument("--lora-alpha", type=float, help="plain LoRA alpha (lora_config.lora_alpha)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_convert)
    p = sub.add_parser(
        "export-lora",
        help="write a council (and the adapter's plain LoRA) as a standard LoRA file any loader reads",
        description="The council's fixed update per layer as a diffusers-named LoRA (ComfyUI's LoraLoader, "
        "diffusers load_lora_weights); --rank N compresses each layer by SVD and prints its relative error.",
    )
    p.add_argument("adapter", help="the InstructMoLE adapter file the council was routed with")
    p.add_argument("council", help="the council JSON (Council Preview's 'json' output, saved as a file)")
    p.add_argument("out", help="the LoRA file to write (must end in .safetensors)")
    p.add_argument("--rank", default="exact", help="'exact' (k·r per layer, no error) or N: SVD to rank N per layer")
    p.add_argument("--with-lora", action="store_true", help="include the adapter's plain-LoRA part")
    p.add_argument("--strength", type=float, default=1.0, help="strength of the plain-LoRA part (with --with-lora)")
    p.add_argument("--expert-strength", type=float, default=1.0, help="multiplies every council weight")
    p.add_argument("--row", type=int, help="which instance of a council that holds several")
    p.add_argument("--dtype", default="fp32", help="tensor dtype of the file: fp32 (default), bf16 or fp16")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(run=_export_lora)
    return parser


def _fail(message: str, status: int) -> int:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        status = args.run(args)
        sys.stdout.flush()  # a closed pipe (``inspect FILE | head``) surfaces here, not at exit
        return status
    except BrokenPipeError:  # the reader has gone: stop quietly, as ``cat`` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush stays silent too
        return 1
    except InstructMoLEError as err:  # a user's mistake: one sentence, no traceback
        return _fail(str(err), 2)
    except OSError as err:  # the OS refused something outside the output (e.g. an unreadable input)
        where = f"'{err.filename}': " if err.filename else ""
        return _fail(f"{where}{err.strerror or err}", 2)
    except KeyboardInterrupt:
        return _fail("interrupted (Ctrl-C); nothing was written", 130)


if __name__ == "__main__":
    sys.exit(main())
