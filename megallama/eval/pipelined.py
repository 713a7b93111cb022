"""Benchmark tasks on a pipeline-parallel model during training: the last stage computes.

Every stage holds only its own layers, so the whole forward runs down the pipeline: the last stage
runs the harness (scoring, generation, metrics) as the driver, and each of its model calls is
broadcast as a small command over the pipeline group; stage 0 embeds the tokens, every stage runs
its blocks (with its own slice of the KV cache) and sends the hidden states on, and the last stage
applies the head.  At the end the last stage sends "stop" and broadcasts the results, so every rank
returns the same figures (rank 0, on stage 0, logs them).  Under tensor parallelism every rank of a
stage does the same, in its own pipeline group; data-parallel replicas each evaluate in full.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from megallama.eval.lm import LanguageModel

_STOP, _LOGITS, _NEW_CACHE, _CACHED, _REPEAT = range(5)


class _StageCache:
    """Keys and values of this stage's blocks only (``update`` takes the model's layer ids)."""

    def __init__(self, layer_ids: list[int], k: torch.Tensor, v: torch.Tensor):
        self.index = {layer: i for i, layer in enumerate(layer_ids)}
        self.layer_ids, self.k, self.v = layer_ids, k, v

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        i, end = self.index[layer], start + k.shape[2]
        self.k[i, :, :, start:end] = k
        self.v[i, :, :, start:end] = v
        return self.k[i, :, :, :end], self.v[i, :, :, :end]

    def repeat_batch(self, n: int) -> "_StageCache":
        return _StageCache(self.layer_ids, self.k.repeat(1, n, 1, 1, 1), self.v.repeat(1, n, 1, 1, 1))


class _Handle:
    """What the driver's ``new_cache`` returns: the stages hold the tensors, one cache at a time."""

    def __init__(self, serial: int):
        self.serial = serial


class PipelineStage:
    """This rank's part of a pipeline-parallel megallama model (a ``PipelineStages`` module)."""

    def __init__(self, module, model_cfg, ctx):
        from megallama.model import EmbeddingStage, HeadStage, TransformerBlock

        self.cfg, self.ctx = model_cfg, ctx
        layers = list(module.forward_funcs)  # this stage's layers, in order (DeepSpeed's PipelineModule)
        self.embedding = next((m for m in layers if isinstance(m, EmbeddingStage)), None)
        self.blocks = [m for m in layers if isinstance(m, TransformerBlock)]
        self.head = next((m for m in layers if isinstance(m, HeadStage)), None)
        first = next(module.parameters())
        self.device, self.dtype = first.device, first.dtype
        ranks = ctx.topology.pp_groups()
        self.group_ranks = next(r for r in ranks if ctx.rank in r)
        self.prev = self.group_ranks[ctx.pp_rank - 1] if ctx.pp_rank > 0 else None
        self.next = self.group_ranks[ctx.pp_rank + 1] if ctx.pp_rank < ctx.pp_size - 1 else None
        self.last = self.group_ranks[-1]
        self.cache: Optional[_StageCache] = None

    # -- communication ---------------------------------------------------------------------------
    def _bcast(self, t: torch.Tensor) -> torch.Tensor:
        dist.broadcast(t, src=self.last, group=self.ctx.pp_group)
        return t

    def command(self, op: int, a: int = 0, b: int = 0, c: int = 0) -> tuple[int, int, int, int]:
        head = self._bcast(torch.tensor([op, a, b, c], dtype=torch.long, device=self.device))
        return tuple(int(x) for x in head.tolist())  # type: ignore[return-value]

    def _send_hidden(self, x: torch.Tensor) -> None:
        x = x.contiguous()
        dist.send(torch.tensor(list(x.shape), dtype=torch.long, device=self.device), self.next)
        dist.send(x, self.next)

    def _recv_hidden(self) -> torch.Tensor:
        shape = torch.zeros(3, dtype=torch.long, device=self.device)
        dist.recv(shape, self.prev)
        x = torch.empty(*shape.tolist(), dtype=self.dtype, device=self.device)
        dist.recv(x, self.prev)
        return x

    # -- one forward down the pipeline -----------------------------------------------------------
    @torch.no_grad()
    def forward(self, tokens: Optional[torch.Tensor], start_pos: int, cached: bool) -> Optional[torch.Tensor]:
        """Stage 0 embeds ``tokens`` ``[b, s]``; the last stage returns logits ``[b, s, V]``."""
        from megallama.model import embed
        from parallel.comm import gather_from_tp

        x = embed(self.embedding.tok_embeddings, tokens.to(self.device)) if self.embedding else self._recv_hidden()
        for block in self.blocks:
            x = block(x, start_pos, self.cache if cached else None)
        if self.head is None:
            self._send_hidden(x)
            return None
        logits = gather_from_tp(self.head.output(self.head.norm(x)), self.ctx.tp_group).transpose(0, 1)
        return logits.float()[..., : self.cfg.vocab_size]

    def new_cache(self, batch: int, max_len: int) -> None:
        cfg, tp = self.cfg, self.ctx.tp_size
        ids = [blk.layer_id for blk in self.blocks]
        shape = (len(ids), batch, cfg.kv_heads // tp, max_len, cfg.head_dim)
        self.cache = _StageCache(ids, torch.zeros(shape, dtype=self.dtype, device=self.device),
                                 torch.zeros(shape, dtype=self.dtype, device=self.device))

    def serve(self) -> None:
        """A stage other than the last: follow the driver's commands until it says stop."""
        while True:
            op, a, b, c = self.command(0)
            if op == _STOP:
                return
            if op == _NEW_CACHE:
                self.new_cache(a, b)
            elif op == _REPEAT:
                self.cache = self.cache.repeat_batch(a)
            else:
                tokens = self._bcast(torch.zeros(a, b, dtype=torch.long, device=self.device))
                self.forward(tokens, c, op == _CACHED)


class PipelineDriver(LanguageModel):
    """The last stage's :class:`~megallama.eval.lm.LanguageModel`: each call drives the pipeline."""

    def __init__(self, stage: PipelineStage, tokenizer):
        self.stage, self.tokenizer = stage, tokenizer
        self.vocab_size = int(stage.cfg.vocab_size)
        self.max_seq_len = int(stage.cfg.max_seq_len)
        self.width = int(stage.cfg.dim)
        self.device = stage.device
        self._serial = 0

    def _run(self, op: int, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        b, s = tokens.shape
        self.stage.command(op, b, s, start_pos)
        self.stage._bcast(tokens.to(self.device, torch.long).contiguous())
        return self.stage.forward(tokens, start_pos, op == _CACHED)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._run(_LOGITS, tokens, 0)

    def new_cache(self, batch_size: int, max_len: int) -> Any:
        self.stage.command(_NEW_CACHE, batch_size, max_len)
        self.stage.new_cache(batch_size, max_len)
        self._serial += 1
        return _Handle(self._serial)

    def _check(self, cache: _Handle) -> None:
        if cache.serial != self._serial:
            raise RuntimeError("the pipeline stages hold one KV cache at a time; this one was replaced")

    def logits_cached(self, tokens: torch.Tensor, start_pos: int, cache: Any) -> torch.Tensor:
        self._check(cache)
        return self._run(_CACHED, tokens, start_pos)

    def repeat_cache(self, cache: Any, n: int) -> Any:
        self._check(cache)
        self.stage.command(_REPEAT, n)
        self.stage.cache = self.stage.cache.repeat_batch(n)
        return cache

    def stop(self) -> None:
        self.stage.command(_STOP)


def evaluate_pipelined(module, model_cfg, tokenizer, tasks, opts, ctx) -> list:
    """Every rank of the pipeline group calls this; all return the last stage's results."""
    from megallama.eval.harness import evaluate

    stage = PipelineStage(module, model_cfg, ctx)
    outcome: tuple = ("ok", None)
    error: Optional[BaseException] = None
    if stage.next is None:
        driver = PipelineDriver(stage, tokenizer)
        try:
            outcome = ("ok", evaluate(driver, tasks, opts))
        except Exception as exc:  # the other stages learn of it instead of waiting for ever
            error, outcome = exc, ("error", f"{type(exc).__name__}: {exc}")
        driver.stop()
    else:
        stage.serve()
    box = [outcome]
    dist.broadcast_object_list(box, src=stage.last, group=ctx.pp_group)
    if error is not None:
        raise error
    if box[0][0] == "error":
        raise RuntimeError(f"task evaluation failed on the last pipeline stage: {box[0][1]}")
    return box[0][1]
