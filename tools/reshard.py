"""`megallama reshard`: move a checkpoint to another TP/PP(/DP) layout, offline.

Our checkpoints store each (TP, PP) shard once, unpartitioned over ZeRO, with fp32 masters
and Adam moments under canonical parameter names (see :mod:`megallama.checkpoint`).  So:

- TP/PP: each output file is streamed tensor by tensor; each tensor's new TP slice is read
  (sha256-verified files, only the slice's bytes) with the training code's own shard specs and
  stage assignment; vocabulary padding is adjusted for the new TP.  Peak memory: about one tensor,
  never the model (:mod:`megallama.checkpoint.stream`).
- DP/ZeRO: nothing to transform; ``--dp`` is only validated and recorded.  Any DP size and
  ZeRO stage loads the result.
- Kept: step, consumed samples (the data position), LR-scheduler position, optimizer LRs,
  loss scale, tokenizer.  Dropped: per-rank RNG files (``rng/rankN.json`` belong to a world
  size; training at another layout reseeds from the config; LLaMA has no dropout, so losses
  do not depend on them).
- ``--weights-only`` drops the Adam moments (for inference, evaluation and conversion).

Training resumes from the output with ``megallama train --set train.run_dir=OUTPUT
--set parallel.tp=N --set parallel.pp=M ...``.  ``load_checkpoint`` also reshards on the fly,
so this tool is for storage and hand-off, not a prerequisite to change layout.
"""

from __future__ import annotations

from dataclasses import replace

from megallama.checkpoint import TOKENIZER_FILE
from megallama.checkpoint.stream import ReaderSource, StreamingReader, write_run_checkpoint_from
from megallama.config import validate
from tools.checkpoint_io import check_new_output

KEPT_META = ("lr_scheduler_last_epoch", "optimizer_lrs", "loss_scale", "tokenizer_fingerprint")


def reshard(src, dst, tp: int, pp: int, dp: int = 0, weights_only: bool = False):
    """Write ``src`` (checkpoint or run dir) at layout tp x pp (x dp) into the new run dir ``dst``."""
    check_new_output(dst)
    reader = StreamingReader(src)  # each file mapped for one read only: RSS stays one tensor
    cfg = reader.config
    cfg = replace(cfg, parallel=replace(cfg.parallel, tp=tp, pp=pp, dp=dp,
                                        zero_stage=min(cfg.parallel.zero_stage, 1) if pp > 1
                                        else cfg.parallel.zero_stage,
                                        sequence_parallel=cfg.parallel.sequence_parallel and tp > 1))
    validate(cfg, tp * pp * max(dp, 1))
    source = ReaderSource(reader, moments=not weights_only)  # tensor by tensor: one TP slice in memory
    meta = reader.meta
    extra = {k: meta.get(k) for k in KEPT_META}
    extra["layout"] = {"tp": tp, "pp": pp, "dp": max(dp, 1), "zero_stage": cfg.parallel.zero_stage,
                       "sequence_parallel": cfg.parallel.sequence_parallel}
    extra["resharded_from"] = {"path": str(reader.path), **meta["layout"]}
    if not source.moments:
        extra["lr_scheduler_last_epoch"] = None
    tok = reader.path / TOKENIZER_FILE
    return write_run_checkpoint_from(dst, cfg, source, step=meta["step"],
                                     consumed_samples=meta["consumed_samples"],
                                     tokenizer_path=str(tok) if tok.is_file() else None, extra_meta=extra)
