# Sourced by demo.sh and test.sh: create or refresh the project's virtual environments.
# Idempotent: a stamp (hash of pyproject.toml and this file) skips the install when nothing changed.

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}

_stamp() { cat pyproject.toml scripts/env.sh "$@" 2>/dev/null | sha256sum | cut -c1-16; }

# .venv: Python 3.11, the CPU build of torch 2.13.0 (it lies on local disk on our machines), then the
# project with its dev extra. torch goes first so that no other package can pull a CUDA build.
ensure_venv() {
  local want; want=$(_stamp)
  if [ -x .venv/bin/python ] && [ "$(cat .venv/.stamp 2>/dev/null)" = "$want" ]; then return 0; fi
  echo "setting up .venv with $("$PYTHON" --version 2>&1) ..." >&2
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[dev]"
  echo "$want" > .venv/.stamp
}

# .venv-comfy: ComfyUI's own requirements (its torchvision wants torch 2.14.1; torchaudio is not
# needed) plus this project, for the tests that import a real ComfyUI from $COMFYUI_PATH.
# COMFYUI_PYTHON may name an interpreter that already has ComfyUI's requirements instead.
ensure_comfy_venv() {
  if [ -n "${COMFYUI_PYTHON:-}" ]; then return 0; fi
  local req="$COMFYUI_PATH/requirements.txt" want
  [ -f "$req" ] || { echo "COMFYUI_PATH=$COMFYUI_PATH has no requirements.txt: point it at a ComfyUI checkout" >&2; return 1; }
  want=$(_stamp "$req")
  COMFYUI_PYTHON=$PWD/.venv-comfy/bin/python
  if [ -x .venv-comfy/bin/python ] && [ "$(cat .venv-comfy/.stamp 2>/dev/null)" = "$want" ]; then return 0; fi
  echo "setting up .venv-comfy for the ComfyUI at $COMFYUI_PATH ..." >&2
  [ -x .venv-comfy/bin/python ] || "$PYTHON" -m venv .venv-comfy
  .venv-comfy/bin/python -m pip install -q --upgrade pip
  grep -vE '^(torch|torchvision|torchaudio)([^a-z_-]|$)' "$req" > .venv-comfy/requirements.txt
  .venv-comfy/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" -r .venv-comfy/requirements.txt
  .venv-comfy/bin/python -m pip install -q -e ".[dev]"
  echo "$want" > .venv-comfy/.stamp
}
