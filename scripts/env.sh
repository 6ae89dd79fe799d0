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

# .venv-comfy-<key>: ComfyUI's own requirements plus this project, for the tests that import a real
# ComfyUI from $COMFYUI_PATH. One venv per ComfyUI requirements file: <key> is a short hash of the
# checkout's requirements.txt, so switching COMFYUI_PATH between checkouts reuses each one's venv
# (checkouts with identical requirements share one). Each venv holds a `.gitignore` of `*`, so git
# and ruff skip it whatever the top-level .gitignore says.
# torch 2.14.1 / torchvision 0.29.1 go first (ComfyUI's torchvision wants torch 2.14.1) and stay pinned
# by a constraints file for every later install, so no requirement can pull another torch build.
# torchaudio 2.11.1 goes in with --no-deps (its own pin would pull another torch; it imports fine with
# 2.14.1): the v0.33 server does not start without it. `requests` is added when the requirements do not list it (ComfyUI's
# app/frontend_management.py imports it).
# COMFYUI_PYTHON may name an interpreter that already has ComfyUI's requirements instead.
COMFY_TORCH="torch==2.14.1"
COMFY_TORCHVISION="torchvision==0.29.1"
COMFY_TORCHAUDIO="torchaudio==2.11.1"

# The venv directory for $COMFYUI_PATH (relative to the repo root); prints it.
comfy_venv_dir() {
  local req="$COMFYUI_PATH/requirements.txt"
  [ -f "$req" ] || { echo "COMFYUI_PATH=$COMFYUI_PATH has no requirements.txt: point it at a ComfyUI checkout" >&2; return 1; }
  printf '.venv-comfy-%s\n' "$(sha256sum < "$req" | cut -c1-10)"
}

ensure_comfy_venv() {
  if [ -n "${COMFYUI_PYTHON:-}" ]; then return 0; fi
  local req="$COMFYUI_PATH/requirements.txt" venv want
  venv=$(comfy_venv_dir) || return 1
  want=$(_stamp "$req")
  COMFYUI_PYTHON=$PWD/$venv/bin/python
  if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.stamp" 2>/dev/null)" = "$want" ]; then return 0; fi
  echo "setting up $venv for the ComfyUI at $COMFYUI_PATH ..." >&2
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
  echo '*' > "$venv/.gitignore"
  rm -f "$venv/.stamp"
  printf '%s\n' "$COMFY_TORCH" "$COMFY_TORCHVISION" > "$venv/constraints.txt"
  grep -vE '^[[:space:]]*(torch|torchvision|torchaudio)([^A-Za-z0-9_.-]|$)' "$req" > "$venv/requirements.txt"
  grep -qiE '^[[:space:]]*requests([^A-Za-z0-9_.-]|$)' "$venv/requirements.txt" || echo requests >> "$venv/requirements.txt"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q "$COMFY_TORCH" "$COMFY_TORCHVISION"
  "$venv/bin/python" -m pip install -q --no-deps "$COMFY_TORCHAUDIO"
  "$venv/bin/python" -m pip install -q -c "$venv/constraints.txt" -r "$venv/requirements.txt"
  "$venv/bin/python" -m pip install -q -c "$venv/constraints.txt" -e ".[dev]"
  echo "$want" > "$venv/.stamp"
}
