#!/usr/bin/env bash
# The main job on the embedded default: a tiny synthetic Kontext model and a random adapter, no
# downloads. Sets up .venv if needed. Writes the adapter and council heat maps to out/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
ensure_venv
exec .venv/bin/python -m instructmole.demo "$@"
