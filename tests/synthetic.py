"""A deterministic in-memory dataset for layout tests (no tokenizer, no files), and a Meta-style tokenizer."""

from types import SimpleNamespace

import numpy as np


class RandomTokens:
    def __init__(self, n: int, seq_len: int, vocab: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        # a learnable structure: each sequence counts upward from a random start
        starts = rng.integers(0, vocab, size=n)
        noise = rng.integers(0, 3, size=(n, seq_len + 1))
        self.data = ((starts[:, None] + np.arange(seq_len + 1)[None, :] + noise) % vocab).astype(np.int64)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]


def bundle(cfg, seed: int = 0):
    t = cfg.train
    n = t.total_steps() * t.global_batch_size
    return SimpleNamespace(train=RandomTokens(n, t.seq_len, cfg.model.vocab_size, seed),
                           valid=RandomTokens(t.eval_iters * t.global_batch_size, t.seq_len,
                                              cfg.model.vocab_size, seed + 1))


def train_tiny(world: int, settings: list, run_dir: str, real_data: bool = False):
    """Train the tiny preset with ``settings`` (``section.key=value``) into ``run_dir``; the Summary.

    Synthetic tokens unless ``real_data`` (then the embedded default corpus)."""
    from megallama.config import load_config, validate
    from megallama.train import train

    cfg = validate(load_config(None, list(settings) + [f"train.run_dir={run_dir}"], preset="tiny"), world)
    return train(cfg, data=None if real_data else bundle(cfg))


def synthetic_engine(cfg, world: int):
    """``megallama train``'s engine and step for a validated ``cfg`` on ``bundle(cfg)``, in this
    process's rank of ``world``: a namespace of engine, micro-batch iterator, accumulation steps,
    ParallelContext and ``step()`` (one optimizer step, as the training loop runs it)."""
    import torch

    from megallama.config import gradient_accumulation_steps
    from megallama.data.pipeline import micro_batches
    from megallama.distributed import init_distributed
    from megallama.train import Timed, build_engine, train_step
    from parallel.topology import ParallelContext

    init_distributed()
    p, t = cfg.parallel, cfg.train
    ctx = ParallelContext.from_distributed(p.tp, p.pp)
    engine = build_engine(cfg, ctx)
    gas = gradient_accumulation_steps(cfg, world)
    batches = Timed(micro_batches(bundle(cfg).train, 0, t.global_batch_size, t.micro_batch_size,
                                  ctx.dp_rank, ctx.dp_size), torch.device("cpu"))
    return SimpleNamespace(engine=engine, batches=batches, gas=gas, ctx=ctx,
                           step=lambda: train_step(engine, batches, gas, ctx, p.pp > 1))


def meta_style_tokenizer(path) -> str:
    """A small SentencePiece BPE model trained like Meta's LLaMA tokenizer (dummy prefix, identity
    normalisation, whitespace kept) on standard-library text, written to ``path``; returns the path."""
    import io
    from pathlib import Path

    import sentencepiece as spm

    from megallama.eval.tiny import _stdlib_text

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([ln for ln in _stdlib_text(100_000).splitlines() if ln.strip()]), model_writer=model,
        vocab_size=400, model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        add_dummy_prefix=True, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", minloglevel=2)
    Path(path).write_bytes(model.getvalue())
    return str(path)
