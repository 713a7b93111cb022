"""Checkpoints: a consolidated, layout-independent format with atomic commits.

Layout of a run directory::

    RUN_DIR/checkpoints/latest                  text: the name of the newest complete checkpoint
    RUN_DIR/checkpoints/step_00000100/
        model_tp00_pp00_dp000.safetensors       fp32 masters: the flat ranges of TP rank 0, stage 0's
                                                parameters that DP rank 0's ZeRO partition holds
        optim_tp00_pp00_dp000.safetensors       Adam moments: "<name>/exp_avg", "<name>/exp_avg_sq"
        rng/rank00000.json                      per-rank RNG states (torch, numpy, python)
        tokenizer.model                         the run's SentencePiece model (when it has one)
        meta.json                               written last: config, layout, step, data position,
                                                tokenizer fingerprint, version, file sizes and sha256,
                                                and "parts" (file -> tensor -> [flat start, numel])

Format version 2: every data-parallel rank writes its own ZeRO partition (no gather to one rank),
so a checkpoint is still layout-independent -- any reader cuts any TP/PP/DP layout out of it with
slice reads of only the bytes it needs (:meth:`CheckpointReader.read`).  Version 1 (one unflattened
``model_tpXX_ppYY.safetensors`` per shard, written by DP rank 0) is still read.  Loading at another
layout reshards on the fly, and ``megallama reshard`` does the same offline.

The rooms: :mod:`~megallama.checkpoint.format` (file names, ``meta.json``, file records),
:mod:`~megallama.checkpoint.validate` (meta.json against the files; ``latest``),
:mod:`~megallama.checkpoint.reader` (slices of canonical tensors), :mod:`~megallama.checkpoint.save`
(training saves, asynchronous or not), :mod:`~megallama.checkpoint.load` (into a running engine) and
:mod:`~megallama.checkpoint.offline` (whole checkpoints from full tensors) and
:mod:`~megallama.checkpoint.stream` (the offline tools' tensor-by-tensor writer and reader).  Which rank
holds which piece is :mod:`megallama.sharding`; DeepSpeed's optimizer internals are reached only
from :mod:`megallama.engine`; files and directories are committed by :mod:`megallama.atomic`.

Atomicity: every rank writes into ``step_N.tmp/``, files are fsynced, all ranks
meet at a barrier, then rank 0 writes ``meta.json``, renames the directory to
``step_N`` and moves ``latest`` with an atomic ``os.replace``.  A crash at any
moment leaves the previous checkpoint loadable.  Nothing is unpickled on load
(safetensors and JSON only).
"""

from megallama.checkpoint.format import (FORMAT, IO_BYTES, META_KEYS, MOMENTS, TOKENIZER_FILE, VERSION,  # noqa: F401
                                         is_weights_only, latest_checkpoint, part_file, read_meta, resolve,
                                         shard_file, step_name, verify_file)
from megallama.checkpoint.load import check_compatible, load_checkpoint  # noqa: F401
from megallama.checkpoint.offline import write_checkpoint, write_run_checkpoint  # noqa: F401
from megallama.checkpoint.reader import CheckpointReader  # noqa: F401
from megallama.checkpoint.save import SAVE_TIMES, save_checkpoint, wait_for_save  # noqa: F401
