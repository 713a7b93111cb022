#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")"
./bootstrap.sh
./.ci/install-system-deps.sh   # Open MPI, SLURM and munge for the launcher tests; mpi4py into .venv
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
export DS_ACCELERATOR=cpu
# Two pytest workers, each taking whole test files (module fixtures such as the local SLURM start
# once): a one-rank test keeps one core busy and its parent waits, so one worker alone leaves
# half of a 2-core machine idle.  MEGALLAMA_TEST_WORKERS=0 runs everything in this process.
exec .venv/bin/python -m pytest -q -n "${MEGALLAMA_TEST_WORKERS:-2}" --dist loadfile "$@"
