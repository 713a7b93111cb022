# Shared environment for megallama's SLURM scripts (sourced by every *.sbatch here).
#
# Every variable below is a default: export your own value before `sbatch` (sbatch passes
# the submitting shell's environment to the job) and it wins.  Nothing is hard-coded.

# --- what runs -----------------------------------------------------------------------------
: "${MEGALLAMA_PYTHON:=python3}"          # interpreter with megallama installed (e.g. .venv/bin/python)
: "${MEGALLAMA_LOG_DIR:=${SLURM_SUBMIT_DIR:-.}/logs/${SLURM_JOB_NAME:-megallama}-${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-local}}${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}}"
export MEGALLAMA_PYTHON MEGALLAMA_LOG_DIR

# --- rendezvous ----------------------------------------------------------------------------
# Rank 0 listens on the first node of the allocation.  The port is derived from the job id
# (the same rule as megallama.distributed.slurm_port) so two jobs on a node never collide.
if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
  : "${MASTER_ADDR:=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
  : "${MASTER_PORT:=$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"
  export MASTER_ADDR MASTER_PORT
fi

# --- ranks and CPU threads per node -----------------------------------------------------------
# Sized from the allocation, never hard-coded: ranks per node are MEGALLAMA_RANKS_PER_NODE, else
# sbatch's --ntasks-per-node (or --ntasks spread over the nodes), else the node's GPUs
# (--gpus-per-node), else 1.  Each rank gets an equal share of the CPUs the job holds on the node
# (SLURM_CPUS_ON_NODE): srun's --cpus-per-task and OMP_NUM_THREADS, the threads per rank.
megallama_refuse() { echo "megallama: $*" >&2; exit 2; }
if [ -n "${MEGALLAMA_GPUS_PER_NODE:-}" ]; then
  megallama_refuse "MEGALLAMA_GPUS_PER_NODE is now MEGALLAMA_RANKS_PER_NODE; export that instead"
fi
MEGALLAMA_NODES=${SLURM_JOB_NUM_NODES:-1}
if [ -z "${MEGALLAMA_RANKS_PER_NODE:-}" ]; then
  if [ -n "${SLURM_NTASKS_PER_NODE:-}" ]; then
    MEGALLAMA_RANKS_PER_NODE=$SLURM_NTASKS_PER_NODE
  elif [ -n "${SLURM_NTASKS:-}" ]; then
    [ $((SLURM_NTASKS % MEGALLAMA_NODES)) -eq 0 ] || megallama_refuse "--ntasks=$SLURM_NTASKS does not divide" \
      "over $MEGALLAMA_NODES nodes; submit with --ntasks-per-node=N (ranks per node) instead"
    MEGALLAMA_RANKS_PER_NODE=$((SLURM_NTASKS / MEGALLAMA_NODES))
  else
    MEGALLAMA_RANKS_PER_NODE=${SLURM_GPUS_ON_NODE:-1}
  fi
fi
[[ "$MEGALLAMA_RANKS_PER_NODE" =~ ^[1-9][0-9]*$ ]] || megallama_refuse \
  "MEGALLAMA_RANKS_PER_NODE='$MEGALLAMA_RANKS_PER_NODE' is not a positive number of ranks; fix or unset it"
MEGALLAMA_CPUS_ON_NODE=${SLURM_CPUS_ON_NODE:-$(nproc)}
if [ "$MEGALLAMA_RANKS_PER_NODE" -gt "$MEGALLAMA_CPUS_ON_NODE" ]; then
  megallama_refuse "$MEGALLAMA_RANKS_PER_NODE ranks per node but the job holds $MEGALLAMA_CPUS_ON_NODE CPUs" \
    "on the node; ask for fewer ranks (sbatch --ntasks-per-node=$MEGALLAMA_CPUS_ON_NODE or" \
    "MEGALLAMA_RANKS_PER_NODE=$MEGALLAMA_CPUS_ON_NODE) or more CPUs (--cpus-per-task, --exclusive)"
fi
MEGALLAMA_CPUS_PER_RANK=$((MEGALLAMA_CPUS_ON_NODE / MEGALLAMA_RANKS_PER_NODE))
: "${OMP_NUM_THREADS:=$MEGALLAMA_CPUS_PER_RANK}"
export MEGALLAMA_RANKS_PER_NODE MEGALLAMA_CPUS_PER_RANK OMP_NUM_THREADS

# --- NCCL and the network (GPU clusters) -----------------------------------------------------
# Only exported when set, so NCCL's own autodetection stays in charge otherwise.
#   NCCL_SOCKET_IFNAME   interface for bootstrap/socket traffic, e.g. "ib0" or "^lo,docker"
#   NCCL_IB_HCA          InfiniBand adapters to use, e.g. "mlx5_0,mlx5_1"
#   NCCL_IB_GID_INDEX    RoCE GID index (often 3 on RoCE v2 fabrics)
#   NCCL_NET_GDR_LEVEL   GPUDirect RDMA distance, e.g. "PHB"
#   NCCL_IB_TIMEOUT      InfiniBand retry timeout exponent (default 18 on recent NCCL)
#   NCCL_DEBUG           "WARN" (default here) or "INFO" to log topology and transports
#   NCCL_P2P_DISABLE     "1" on machines whose peer-to-peer path is broken
for var in NCCL_SOCKET_IFNAME NCCL_IB_HCA NCCL_IB_GID_INDEX NCCL_NET_GDR_LEVEL NCCL_IB_TIMEOUT NCCL_P2P_DISABLE; do
  if [ -n "${!var:-}" ]; then export "${var?}"; fi
done
: "${NCCL_DEBUG:=WARN}"
# A failed or hung collective raises instead of blocking forever (pairs with train.collective_timeout_s).
: "${TORCH_NCCL_ASYNC_ERROR_HANDLING:=1}"
# Tensor-parallel overlap relies on in-order kernel launch on a single hardware queue.
: "${CUDA_DEVICE_MAX_CONNECTIONS:=1}"
export NCCL_DEBUG TORCH_NCCL_ASYNC_ERROR_HANDLING CUDA_DEVICE_MAX_CONNECTIONS

mkdir -p "$MEGALLAMA_LOG_DIR"

MEGALLAMA_TASK="${MEGALLAMA_HOME:-$SLURM_SUBMIT_DIR}/slurm/task.sh"   # wraps each srun task

# --- preemption ----------------------------------------------------------------------------
# megallama train saves a checkpoint and exits with this status on SIGUSR1/SIGTERM; the
# scripts then requeue the job, and the rerun resumes from <run_dir>/checkpoints/latest.
EXIT_PREEMPTED=75

# run_preemptible CMD...: run CMD in the background, forward USR1/TERM to it (SLURM's
# --signal=B:USR1@SECONDS warning, or scancel --signal), wait, and requeue on EXIT_PREEMPTED.
run_preemptible() {
  rm -f "$MEGALLAMA_LOG_DIR/preempted"   # set by slurm/task.sh when a rank exits 75
  "$@" &
  local child=$! status=0
  trap 'echo "megallama: $(date -u +%FT%TZ) got SIGUSR1, asking ranks to checkpoint"; kill -USR1 $child' USR1
  trap 'echo "megallama: $(date -u +%FT%TZ) got SIGTERM, asking ranks to checkpoint"; kill -TERM $child' TERM
  while true; do
    wait "$child" && status=0 || status=$?
    kill -0 "$child" 2>/dev/null || break   # wait returned because of a trapped signal: keep waiting
  done
  trap - USR1 TERM
  if { [ "$status" -eq "$EXIT_PREEMPTED" ] || [ -e "$MEGALLAMA_LOG_DIR/preempted" ]; } && [ -n "${SLURM_JOB_ID:-}" ]; then
    echo "megallama: checkpoint saved; requeueing job $SLURM_JOB_ID to resume"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  return "$status"
}
