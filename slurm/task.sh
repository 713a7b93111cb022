#!/bin/bash
# One srun task of a megallama job: run "$@", forward SIGUSR1/SIGTERM to the ranks and record
# a preemption exit (status 75: checkpoint saved) in $MEGALLAMA_LOG_DIR/preempted.
#
# The marker is needed because with --kill-on-bad-exit srun reports the status of the tasks
# it killed after the first one exited, not the 75.
#
# With --launcher, "$@" is a launcher (deepspeed, torchrun) that starts the ranks itself.  It
# would die on SIGUSR1 (or kill its ranks on SIGTERM) before they can checkpoint, so it runs
# with both ignored; the ranks install their own handlers, and the signals go to the ranks:
# the launcher's topmost descendants whose environment has the LOCAL_RANK it gives each rank.
# (Not simply its leaf processes: a rank's own children, torch.compile's workers or a
# code-execution sandbox, inherit LOCAL_RANK too but would get the signal instead of it.)
launcher=0
if [ "${1:-}" = "--launcher" ]; then launcher=1; shift; fi
if [ "$launcher" = 1 ]; then
  (unset LOCAL_RANK; trap '' USR1 TERM; exec "$@") &
else
  "$@" &
fi
child=$!
is_rank() { tr '\0' '\n' < "/proc/$1/environ" 2>/dev/null | grep -q '^LOCAL_RANK='; }
ranks() {  # the first processes under $1, on every branch, that carry LOCAL_RANK
  local c
  for c in $(pgrep -P "$1"); do
    if is_rank "$c"; then echo "$c"; else ranks "$c"; fi
  done
}
leaves() {  # descendants of $1 that have no children of their own (a launcher that sets no LOCAL_RANK)
  local c found=0
  for c in $(pgrep -P "$1"); do found=1; leaves "$c"; done
  if [ "$found" = 0 ] && [ "$1" != "$child" ]; then echo "$1"; fi
}
forward() {
  if [ "$launcher" = 1 ]; then
    local targets
    targets=$(ranks "$child")
    [ -n "$targets" ] || targets=$(leaves "$child")
    kill "-$1" $targets 2>/dev/null || true
  else
    kill "-$1" "$child"
  fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
while true; do
  wait "$child" && status=0 || status=$?
  kill -0 "$child" 2>/dev/null || break   # woken by a trapped signal: keep waiting
done
if [ "$status" -eq 75 ]; then touch "$MEGALLAMA_LOG_DIR/preempted"; fi
exit "$status"
