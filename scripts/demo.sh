#!/usr/bin/env bash
# The main job on the embedded default, no downloads: build a tiny random Kontext-shaped pipeline and a
# synthetic six-task edit data set, train an InstructMoLE adapter on them with the bundled trainer
# (python -m training), then load the adapter as the nodes do and edit with held-out instructions.
# Sets up .venv if needed. One thread, two for the VAE stage (fastest for these tiny tensors; --threads N
# changes the one), a line per stage with its time, the same numbers on every run. Writes everything to out/demo/ (the report
# picture, the labelled edits picture).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
ensure_venv
exec .venv/bin/python -m training.demo "$@"
