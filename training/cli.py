"""``python -m training``: train an InstructMoLE adapter from a YAML config.

    python -m training --config training/configs/kontext.yaml data.manifest=edits.jsonl train.lr=5e-5
    accelerate launch -m training --config my.yaml            # several GPUs
    torchrun --nproc_per_node 2 -m training --config my.yaml  # the same with torchrun
    python -m training --config my.yaml --resume latest       # continue where a run stopped
    python -m training --config my.yaml --check               # validate config and data, then stop

A user's mistake (config, data, model files, checkpoint) ends with one line on stderr and exit
code 2; Ctrl-C with exit code 130.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import TrainingError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Train an InstructMoLE adapter for FLUX.1 Kontext [dev].",
        epilog="Overrides are section.key=value pairs, e.g. train.lr=5e-5 data.resolution=1024.",
    )
    parser.add_argument("--config", help="the YAML config (see training/configs/)")
    parser.add_argument("--resume", metavar="latest|PATH", help="resume from the newest checkpoint or a step-N folder")
    parser.add_argument("--check", action="store_true", help="validate the config and the data, then stop")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def quiet_libraries() -> None:
    """transformers/diffusers progress bars and notices would bury ours (errors still show)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()  # before diffusers imports its pipelines
    transformers.utils.logging.disable_progress_bar()
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    quiet_libraries()
    try:
        from .config import load_config

        config = load_config(args.config, args.overrides)
        if args.check:
            from .data import check_rows, read_rows

            d = config.data
            checked = check_rows(
                read_rows(d.manifest), min_side=d.min_side, max_references=d.max_references, on_error=d.on_error
            )
            for problem in checked.problems:
                print(problem, file=sys.stderr)
            print(f"config OK; {len(checked.rows)} usable rows, {checked.skipped} skipped")
            return 0
        from .loop import train

        result = train(config, resume=args.resume)
        print(f"adapter: {result.adapter} ({result.steps} steps)")
        return 0
    except TrainingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
