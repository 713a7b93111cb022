#!/usr/bin/env bash
# Install the system packages the launch tests need (Debian/Ubuntu), then mpi4py into the venv.
#   Open MPI (mpirun, headers for mpi4py), SLURM (slurmctld, slurmd, sbatch, srun) and munge.
# Idempotent and fast when everything is present: apt-get runs only for missing commands.
# Without root or apt-get it says what is missing and exits 0; the tests then skip saying why.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV_PY=${VENV_PY:-.venv/bin/python}

missing=()
command -v mpirun    >/dev/null 2>&1 || missing+=(openmpi-bin)
command -v mpicc     >/dev/null 2>&1 || missing+=(libopenmpi-dev)
[ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/slurmd ] && command -v sbatch >/dev/null 2>&1 || missing+=(slurm-wlm)
[ -x /usr/sbin/munged ]  || missing+=(munge)

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "install-system-deps: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "install-system-deps: missing ${missing[*]} (need root and apt-get); the SLURM/MPI tests will skip" >&2
  fi
fi

if [ -x "$VENV_PY" ] && command -v mpicc >/dev/null 2>&1 && ! "$VENV_PY" -c "import mpi4py" 2>/dev/null; then
  "$VENV_PY" -m pip install -q mpi4py
fi
