#!/usr/bin/env bash
# Set up .venv if needed, then run ruff and the whole test suite.
# With COMFYUI_PATH pointing at a ComfyUI checkout (or several, separated by ':'), the ComfyUI
# integration tests (tests/comfyui) run too, against each one, in .venv-comfy-<hash of the checkout's
# requirements.txt> (ComfyUI's own requirements, one venv per checkout; see scripts/env.sh) or the
# interpreter named by COMFYUI_PYTHON.
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
  # Several checkouts, separated by ':', run one after the other (each in its own venv).
  IFS=: read -ra comfy_paths <<< "$COMFYUI_PATH"
  given_python=${COMFYUI_PYTHON:-}
  if [ ${#comfy_paths[@]} -gt 1 ] && [ -n "$given_python" ]; then
    echo "COMFYUI_PYTHON names one interpreter but COMFYUI_PATH names ${#comfy_paths[@]} checkouts: unset COMFYUI_PYTHON" >&2
    exit 2
  fi
  for COMFYUI_PATH in "${comfy_paths[@]}"; do
    export COMFYUI_PATH
    COMFYUI_PYTHON=$given_python
    ensure_comfy_venv
    echo "== pytest (ComfyUI at $COMFYUI_PATH, commit $(git -C "$COMFYUI_PATH" rev-parse --short HEAD 2>/dev/null || echo '?'), python $COMFYUI_PYTHON)" >&2
    "$COMFYUI_PYTHON" -m pytest tests/comfyui "$@"
  done
else
  echo "COMFYUI_PATH is not set: the ComfyUI integration tests were skipped (see README, 'Tests')." >&2
fi
