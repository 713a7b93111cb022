#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")"
./bootstrap.sh
./.ci/install-system-deps.sh   # Open MPI, SLURM and munge for the launcher tests; mpi4py into .venv
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
export DS_ACCELERATOR=cpu
exec .venv/bin/python -m pytest -q "$@"
