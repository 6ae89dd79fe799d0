#!/usr/bin/env bash
# Set up .venv if needed, then run ruff and the whole test suite.
# With COMFYUI_PATH pointing at a ComfyUI checkout, the ComfyUI integration tests (tests/comfyui)
# run too, in .venv-comfy-<hash of the checkout's requirements.txt> (ComfyUI's own requirements, one
# venv per checkout; see scripts/env.sh) or the interpreter named by COMFYUI_PYTHON.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
ensure_venv

echo "== ruff" >&2
.venv/bin/ruff check .

echo "== pytest (core)" >&2
env -u COMFYUI_PATH .venv/bin/python -m pytest tests "$@"

if [ -n "${COMFYUI_PATH:-}" ]; then
  ensure_comfy_venv
  echo "== pytest (ComfyUI at $COMFYUI_PATH, commit $(git -C "$COMFYUI_PATH" rev-parse --short HEAD 2>/dev/null || echo '?'), python $COMFYUI_PYTHON)" >&2
  "$COMFYUI_PYTHON" -m pytest tests/comfyui "$@"
else
  echo "COMFYUI_PATH is not set: the ComfyUI integration tests were skipped (see README, 'Tests')." >&2
fi
