"""``python -m training``: train an InstructMoLE adapter from a YAML config.

    python -m training --config training/configs/kontext.yaml data.manifest=edits.jsonl train.lr=5e-5
    accelerate launch -m training --config my.yaml            # several GPUs
    torchrun --nproc_per_node 2 -m training --config my.yaml  # the same with torchrun
    python -m training --config my.yaml --resume latest       # continue where a run stopped
    python -m training --config my.yaml --check               # every check that needs no GPU, then stop
    python -m training --config my.yaml --overwrite           # delete the folder's earlier run, start again
    python -m training ablate                                 # the ablation at the demo's scale (training/ablate.py)
    python -m training --plan my.yaml --gpu-memory 24         # peak GPU memory, and options that fit a 24 GiB card

Several processes on CPUs only: ``accelerate launch --multi_gpu --num_processes 2 -m training ...``
(without ``--multi_gpu``, and with ``--cpu``, accelerate starts one process; that is refused here).

A user's mistake (config, data, model files, checkpoint, an output folder that cannot be written)
ends with one line on stderr and exit code 2; Ctrl-C with exit code 130.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from instructmole.errors import InstructMoLEError

from .errors import ConfigError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m training",
        description="Train an InstructMoLE adapter for FLUX.1 Kontext [dev].",
        epilog=(
            "Overrides are section.key=value pairs, e.g. train.lr=5e-5 data.resolution=1024. "
            "python -m training ablate --help: the ablation (routing vs per-token, a plain LoRA, no orthogonality)."
        ),
    )
    parser.add_argument("--config", help="the YAML config (see training/configs/)")
    parser.add_argument("--resume", metavar="latest|PATH", help="resume from the newest checkpoint or a step-N folder")
    parser.add_argument(
        "--check", action="store_true", help="run every check that needs no GPU (config, data, folders, space); stop"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="delete an earlier run's files in train.output_dir, then start afresh"
    )
    parser.add_argument(
        "--plan",
        nargs="?",
        const="",
        metavar="CONFIG",
        help="estimate the peak GPU memory of a config (this one, or --config's) without loading a model; stop",
    )
    parser.add_argument(
        "--gpu-memory", type=float, metavar="GiB", help="with --plan: the card's memory, to suggest options that fit it"
    )
    parser.add_argument("--processes", type=int, default=1, metavar="N", help="with --plan: processes sharing a batch")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``error:`` line and exit code 2, like every other mistake."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {message}; see {self.prog} --help\n")


def one_process_of_several() -> str | None:
    """Why this process runs alone although several were asked for, or None.

    ``accelerate launch --num_processes N`` without ``--multi_gpu`` (always, with ``--cpu``) starts one
    plain process: it sets MASTER_ADDR (only when N > 1) but no WORLD_SIZE, and no MPI launcher is involved.
    Training on would silently give one process the whole batch."""
    env = os.environ
    launched_by_accelerate = "ACCELERATE_USE_CPU" in env and "MASTER_ADDR" in env
    group = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
    if not launched_by_accelerate or any(k in env for k in group):
        return None
    return (
        "accelerate launch started one process although several were asked for (without --multi_gpu, or with "
        "--cpu, it runs just one); use accelerate launch --multi_gpu --num_processes N -m training ... (on a "
        "machine without CUDA the processes train on the CPU together), or torchrun --nproc_per_node N"
    )


def quiet_libraries() -> None:
    """transformers/diffusers progress bars and notices would bury ours (errors still show)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()  # before diffusers imports its pipelines
    transformers.utils.logging.disable_progress_bar()
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["ablate"]:  # a subcommand; an override always holds '=', so it is never one
        from .ablate import main as ablate

        return ablate(argv[1:])
    # Intermixed: overrides may stand on both sides of a flag (--config X a=1 --check b=2).
    args = _parser().parse_intermixed_args(argv)
    try:
        alone = one_process_of_several()
        if alone:
            raise ConfigError(alone)
        quiet_libraries()
        if args.plan is not None or args.gpu_memory is not None:
            return _plan(args)
        from .config import load_config

        config = load_config(args.config, args.overrides)
        if args.check:
            from .preflight import run_checks

            for line in run_checks(config, resume=args.resume, overwrite=args.overwrite):
                print(line)
            return 0
        from .loop import train

        result = train(config, resume=args.resume, overwrite=args.overwrite)
        print(f"adapter: {result.adapter} ({result.steps} steps)")
        return 0
    except InstructMoLEError as err:  # a TrainingError, a ConfigError, or the core refusing an input
        print(f"error: {_one_line(str(err))}", file=sys.stderr)
        return 2
    except OSError as err:  # the file system refused something mid-run: a full disk, a folder gone read-only
        where = f"'{err.filename}'" if err.filename else "a file"
        print(
            f"error: could not use {where} ({err.strerror or err}); free space or fix the folder's permissions, "
            "then continue with --resume latest",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _plan(args: argparse.Namespace) -> int:
    """``--plan``: the memory estimate and, with ``--gpu-memory``, the cheapest options that fit."""
    from .plan import Planner, load_for_plan, references_of

    path = args.plan or args.config
    if not path:
        raise ConfigError("--plan needs a config: python -m training --plan my.yaml --gpu-memory 24")
    if args.gpu_memory is not None and args.gpu_memory <= 0:
        raise ConfigError(f"--gpu-memory {args.gpu_memory:g} must be a card's memory in GiB, e.g. --gpu-memory 24")
    if args.processes < 1:
        raise ConfigError(f"--processes {args.processes} must be 1 or more")
    config = load_for_plan(path, args.overrides)
    print(Planner(config, references=references_of(config), processes=args.processes).report(args.gpu_memory))
    return 0


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
