"""``python -m megallama.launch``: torchrun, with the ranks' exit status instead of 1 and a traceback.

torchrun (``torch.distributed.run``) reports any non-zero exit of a rank as its own status 1 with a
``ChildFailedError`` traceback.  A megallama rank's status means something: 75 when it checkpointed
on a preemption signal ("run the same command again": SLURM scripts requeue on it), 2 for a bad
input, 3 when training halted on non-finite steps.  This runs torchrun unchanged (same arguments:
``python -m megallama.launch --nproc_per_node 8 -m megallama train ...``) and, when ranks failed,
prints one line and exits with the status of the first rank that failed (75 when that rank
checkpointed and the others either did too or were stopped by torchrun after it).
"""

from __future__ import annotations

import sys
from typing import Optional

PREEMPTED = 75


def exit_status(failures: dict) -> tuple[int, str]:
    """The job's status and a one-line account, from torchrun's ``{rank: ProcessFailure}``."""
    ordered = sorted(failures.items(), key=lambda kv: (kv[1].timestamp, kv[0]))
    rank, first = ordered[0]
    codes = sorted({f.exitcode for f in failures.values()})
    stopped = all(f.exitcode == PREEMPTED or f.exitcode < 0 for f in failures.values())  # < 0: a signal
    if first.exitcode == PREEMPTED and stopped:
        return PREEMPTED, (f"{len(failures)} rank(s) checkpointed and stopped (status 75, first: rank {rank}); "
                           "run the same command to resume")
    status = first.exitcode if 0 < first.exitcode < 256 else 128 + (-first.exitcode if first.exitcode < 0 else 1)
    how = f"exit status {first.exitcode}" if first.exitcode >= 0 else f"signal {-first.exitcode}"
    return status, (f"rank {rank} failed first ({how}); statuses of the failed ranks: "
                    f"{', '.join(map(str, codes))}; its log above says why")


def main(argv: Optional[list[str]] = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except ChildFailedError as exc:
        status, line = exit_status(exc.failures)
        print(f"megallama.launch: {line}", file=sys.stderr, flush=True)
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
