#!/usr/bin/env bash
# Create .venv and install megallama with its test extras (idempotent, offline-safe).
# torch is installed first and pinned: on CPU machines `torch==2.13.0` is a local CPU
# wheel, while a bare `pip install torch` would pull several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.megallama-installed
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==${TORCH_VERSION}"
  .venv/bin/python -m pip install -q -e ".[test,eval,data,scale]"
  touch "$stamp"
fi
