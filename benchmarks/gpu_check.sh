#!/usr/bin/env bash
# The prepared GPU check (README, 'GPU check'): one command, no downloads, under 8 minutes on an H100.
#
#   bash benchmarks/gpu_check.sh                 # on the CUDA machine; writes gpu_check.json / .md to $OUT
#                                                # (else benchmarks/results) and logs to $OUT/gpu_check.log
#   bash benchmarks/gpu_check.sh --dry-run       # tiny shapes on the CPU: the same code paths (CI runs it)
#   bash benchmarks/gpu_check.sh --prepare [COMFYUI_CHECKOUT]
#                                                # here, with a package registry: fills gpu_carry/ (ignored)
#                                                # with the wheels the GPU machine lacks and a ComfyUI tree
#
# On the GPU machine the wheels in gpu_carry/wheels are installed into a private folder (no index, no
# network) and gpu_carry/comfyui is used as COMFYUI_PATH unless one is set. Other arguments go to
# `python -m benchmarks.gpu_check` (e.g. --stages core,load). PYTHON names the interpreter (default:
# .venv/bin/python for the dry run if it exists, else python3). The whole run is killed after
# GPU_CHECK_TIMEOUT seconds (default 470); the stages' own limits add up to 450 s.
set -uo pipefail
cd "$(dirname "$0")/.."

CARRY=gpu_carry
WHEELS=$CARRY/wheels  # wheels pip installs there, without an index
SITE=$CARRY/site      # packages already unpacked (trimmed to fit), put on PYTHONPATH as they are
COMFY=$CARRY/comfyui  # a ComfyUI source tree without .git
T0=$(date +%s)
say() { echo "[gpu_check.sh $(( $(date +%s) - T0 )) s] $*" >&2; }

dry=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && dry=1; done

# ---- --prepare: runs HERE, where pip can reach a package registry -------------------------------
if [ "${1:-}" = "--prepare" ]; then
  src=${2:-${COMFYUI_PATH:-}}
  pip_py=python3
  [ -x .venv/bin/python ] && pip_py=.venv/bin/python
  # What the GPU image lacks (it has torch, transformers, accelerate, peft, safetensors, einops, numpy,
  # pillow, scipy, psutil, pyyaml, tqdm, aiohttp, requests, torchaudio): diffusers for the core stage,
  # and what ComfyUI imports that is not there. Pins come from the ComfyUI checkout's requirements.
  # Two do not fit the 64 MiB a call carries: comfy-kitchen (58 MB, nearly all compiled CUDA/HIP
  # backends) is unpacked into $SITE without them, keeping its eager and Triton kernels; PyAV (35 MB,
  # video only) gets a stub at run time (benchmarks/gpu_check/comfy.py). bitsandbytes (the training
  # stage's nf4 base and 8-bit AdamW; a 43 MB wheel, 129 MB unpacked, nearly all one kernel library per
  # CUDA and ROCm version) is unpacked into $SITE with only its CUDA 13 and CPU libraries (~8 MB): the
  # GPU image's torch is 2.11+cu130 (KINDS.md), and bitsandbytes loads the library of torch's CUDA.
  # Without it the training stage's nf4 rows say "skipped: ... needs bitsandbytes".
  diffusers_version=$("$pip_py" -c 'import diffusers; print(diffusers.__version__)' 2>/dev/null || echo 0.42.1)
  pin() {  # pin NAME: the checkout's requirement line for NAME, else NAME
    local line=""
    [ -n "$src" ] && [ -f "$src/requirements.txt" ] && line=$(grep -iE "^$1([=<>~! ]|$)" "$src/requirements.txt" | head -1 | tr -d ' ')
    echo "${line:-$1}"
  }
  download() {  # download DIR SPEC...
    local dir=$1; shift
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform any -d "$dir" "$@"
  }
  rm -rf "$WHEELS" "$SITE" && mkdir -p "$WHEELS" "$SITE"
  specs=("diffusers==$diffusers_version" "$(pin comfy-aimdo)" "$(pin torchsde)" trampoline)
  say "downloading wheels into $WHEELS: ${specs[*]}"
  download "$WHEELS" "${specs[@]}" || exit 1
  kitchen=$(mktemp -d)
  say "downloading $(pin comfy-kitchen), unpacked into $SITE without its compiled backends"
  download "$kitchen" "$(pin comfy-kitchen)" || exit 1
  (cd "$SITE" && unzip -q "$kitchen"/comfy_kitchen-*.whl -x '*/_C.abi3.so') || exit 1
  rm -rf "$kitchen"
  bnb_version=$("$pip_py" -c 'from importlib.metadata import version; print(version("bitsandbytes"))' 2>/dev/null || echo 0.50.2)
  bnb=$(mktemp -d)
  say "downloading bitsandbytes==$bnb_version, unpacked into $SITE with its CUDA 13 and CPU libraries only"
  download "$bnb" "bitsandbytes==$bnb_version" || exit 1
  (cd "$SITE" && unzip -q "$bnb"/bitsandbytes-*.whl -x 'bitsandbytes/libbitsandbytes_cuda1[12]*.so' \
    'bitsandbytes/libbitsandbytes_rocm*' 'bitsandbytes/libbitsandbytes_xpu*') || exit 1
  rm -rf "$bnb"
  if [ -n "$src" ]; then
    [ -f "$src/comfy/model_patcher.py" ] || { say "$src is not a ComfyUI checkout"; exit 2; }
    rm -rf "$COMFY" && mkdir -p "$COMFY"
    # The source tree only: no .git, tests, frontend blueprints or examples.
    tar -C "$src" --exclude=.git --exclude=.github --exclude=tests --exclude=tests-unit --exclude=blueprints \
      --exclude=script_examples --exclude=__pycache__ --exclude='custom_nodes/*' -cf - . | tar -C "$COMFY" -xf - || exit 1
    say "copied ComfyUI $(grep -o '"[^"]*"' "$src/comfyui_version.py" 2>/dev/null | head -1) from $src into $COMFY"
  else
    say "no ComfyUI checkout given (argument or COMFYUI_PATH): the ComfyUI stages will skip on the GPU"
  fi
  du -sh "$CARRY" >&2
  say "working tree + carry must stay under 64 MiB; then call the device tool's run with"
  say "  command: bash benchmarks/gpu_check.sh   carry: [\"$CARRY\"]   timeout_s: 540"
  exit 0
fi

# ---- the check ---------------------------------------------------------------------------------
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ $dry = 1 ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

if [ $dry = 0 ]; then
  shopt -s nullglob
  wheels=("$WHEELS"/*.whl)
  if [ ${#wheels[@]} -gt 0 ]; then
    site=${TMPDIR:-/tmp}/gpu_check_site
    say "installing ${#wheels[@]} carried wheels into $site (no index, no network)"
    if PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}"; then
      export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    else
      say "installing the carried wheels failed; stages that need them will say so"
    fi
  else
    say "no wheels in $WHEELS: stages needing diffusers or ComfyUI's extras will skip"
  fi
  if [ -d "$SITE" ]; then
    export PYTHONPATH="$PWD/$SITE${PYTHONPATH:+:$PYTHONPATH}"
  fi
  if [ -z "${COMFYUI_PATH:-}" ] && [ -f "$COMFY/comfy/model_patcher.py" ]; then
    export COMFYUI_PATH="$PWD/$COMFY"
  fi
fi
say "python $PY, COMFYUI_PATH=${COMFYUI_PATH:-<unset>}"

run() { timeout --signal=TERM --kill-after=10 "${GPU_CHECK_TIMEOUT:-470}" "$PY" -m benchmarks.gpu_check "$@"; }
if [ -n "${OUT:-}" ]; then
  run "$@" 2>&1 | tee "$OUT/gpu_check.log"
else
  run "$@"
fi
status=$?
say "done, status $status"
exit $status
