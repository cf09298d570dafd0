#!/usr/bin/env bash
# Installs nanogpt-hf (editable) with its test extras into the current Python.
# A torch that is already installed is kept. Without one, a machine with no NVIDIA GPU gets PyTorch's CPU build:
# a bare `pip install torch` would pull a multi-GB CUDA build it cannot use.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install torch
  else
    # the CPU wheel where the configured indexes have it (offline mirrors, find-links), else PyTorch's CPU index
    "$PY" -m pip install "torch==2.13.0+cpu" 2>/dev/null \
      || "$PY" -m pip install torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"$PY" -m pip install -e ".[test]"
