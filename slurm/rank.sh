#!/bin/bash
# One rank under the deepspeed launcher (slurm/train_deepspeed.sbatch): run "$@" with its output
# appended to $MEGALLAMA_LOG_DIR/rank-$RANK.log, so a requeued job continues the same file
# (the launcher's own --enable_each_rank_log starts a new, time-stamped file on every start).
exec "$@" >> "$MEGALLAMA_LOG_DIR/rank-$RANK.log" 2>&1
