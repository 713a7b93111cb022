"""A masked, packed instruction finetune trains the same at every layout as in one process.

Every run starts with ``train.init_from`` from a checkpoint written at tp=2, pp=2 (so loading
reshards it), on packed rows whose examples are document-masked and whose loss covers only the
"response" tokens.  The first 10 losses and gradient norms of TP+SP, PP and DP runs match the
single-process run within 1e-4 relative (fp32, gloo), so does the masked validation loss at the
end, and the single-process first loss matches
an independent computation from the checkpoint's weights.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.distributed import run_ranks

pytestmark = pytest.mark.slow  # each case trains 10 steps on 1-4 spawned gloo ranks (10-20 s)

BASE = ["train.steps=10", "train.tensorboard=false", "train.precision=fp32", "train.global_batch_size=8",
        "train.micro_batch_size=2", "data.instruction=true", "train.eval_interval=10", "train.eval_iters=1"]


class SyntheticExamples:
    """An in-memory stand-in for :class:`~megallama.data.instruct.InstructionSet`: examples of
    4..12 tokens that count upward (learnable), the first half prompt (mask 0), the rest response."""

    prefix = "synthetic"

    def __init__(self, n: int, vocab: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.lengths = rng.integers(4, 13, size=n).astype(np.int64)
        self._examples = []
        for length in self.lengths:
            tokens = (rng.integers(3, vocab) + np.arange(length) + rng.integers(0, 2, size=length)) % vocab
            mask = (np.arange(length) >= length // 2).astype(np.int64)
            self._examples.append((tokens.astype(np.int64), mask))

    def __len__(self):
        return len(self.lengths)

    def example(self, i):
        return self._examples[i]

    def where(self, i):
        return f"synthetic:{i + 1}"


def instruction_bundle(cfg):
    from megallama.data.instruct import InstructDataset

    t = cfg.train
    examples = SyntheticExamples(200, cfg.model.vocab_size)
    ids = np.arange(len(examples))
    make = lambda n, seed: InstructDataset(examples, ids, t.seq_len, n, cfg.data.packing, (seed,), pad_id=2)
    return SimpleNamespace(train=make(t.total_steps() * t.global_batch_size, 0),
                           valid=make(t.eval_iters * t.global_batch_size, 1), tokenizer=None)


def _config(world, overrides, run_dir, init_from):
    from megallama.config import load_config, validate

    return validate(load_config(None, BASE + [f"train.run_dir={run_dir}", f"train.init_from={init_from}"] + overrides,
                                preset="tiny"), world)


def _train_case(rank, world, overrides, run_dir, init_from):
    from megallama.train import train

    cfg = _config(world, overrides, run_dir, init_from)
    s = train(cfg, data=instruction_bundle(cfg))
    return s.losses + [s.final_valid_loss], s.grad_norms  # the masked validation loss too


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory):
    """Weights unlike the seed's init (seed 99), written at tp=2, pp=2."""
    from megallama.checkpoint import write_checkpoint
    from megallama.config import load_config
    from megallama.model import build_model

    cfg = load_config(None, ["parallel.tp=2", "parallel.pp=2"], preset="tiny")
    weights = build_model(cfg.model, seed=99).state_dict()
    return str(write_checkpoint(tmp_path_factory.mktemp("init") / "ckpt", cfg, weights))


_REFERENCE = {}


def reference(tmp_path_factory, init_ckpt, packing=True):
    if packing not in _REFERENCE:
        d = tmp_path_factory.mktemp("ref")
        _REFERENCE[packing] = run_ranks(_train_case, 1, [f"data.packing={str(packing).lower()}"], str(d), init_ckpt,
                                        timeout=240)[0]
    return _REFERENCE[packing]


def _close(a, b, rel=1e-4):
    return len(a) == len(b) and all(abs(x - y) <= rel * max(abs(x), abs(y), 1e-12) for x, y in zip(a, b))


def test_first_loss_is_the_masked_loss_of_the_checkpoint_weights(tmp_path_factory, init_ckpt):
    """Independent reference: a plain model holding the checkpoint's weights, on the first global batch."""
    from megallama.checkpoint import CheckpointReader
    from megallama.data.instruct import split_instruct_batch
    from megallama.data.pipeline import micro_batches
    from megallama.model import Transformer

    losses, _ = reference(tmp_path_factory, init_ckpt)
    cfg = _config(1, [], "unused", init_ckpt)
    model = Transformer(cfg.model)
    model.load_state_dict(CheckpointReader(init_ckpt).state_dict())
    stream = micro_batches(instruction_bundle(cfg).train, 0, 8, 2, 0, 1)
    with torch.no_grad():
        per_micro = []
        for _ in range(4):
            (tokens, docs), (targets, mask) = split_instruct_batch(next(stream))
            assert 0 < mask.sum() < mask.numel() and docs.max() > 1  # masked, and really packed
            per_micro.append(model(tokens, targets, mask, doc_ids=docs).item())
    assert losses[0] == pytest.approx(sum(per_micro) / 4, rel=1e-5)


LAYOUTS = [  # (world, overrides)
    (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    (2, ["parallel.pp=2"]),
    (2, ["parallel.zero_stage=1"]),  # DP=2
    (4, ["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true"]),
]


@pytest.mark.parametrize("world,overrides", LAYOUTS, ids=lambda v: ",".join(v) if isinstance(v, list) else str(v))
def test_masked_layout_matches_one_process(world, overrides, tmp_path, tmp_path_factory, init_ckpt):
    ref_losses, ref_norms = reference(tmp_path_factory, init_ckpt)
    results = run_ranks(_train_case, world, overrides, str(tmp_path), init_ckpt, timeout=300)
    losses, norms = results[0]
    assert _close(losses, ref_losses), f"losses {losses}\n   vs {ref_losses}"
    assert _close(norms, ref_norms), f"grad norms {norms}\n   vs {ref_norms}"
    for other, _ in results[1:]:
        assert _close(other, losses)


def test_padded_rows_match_one_process_under_pipeline(tmp_path, tmp_path_factory, init_ckpt):
    """Packing off: one example per row, padding in a document of its own, never trained."""
    ref_losses, _ = reference(tmp_path_factory, init_ckpt, packing=False)
    losses, _ = run_ranks(_train_case, 2, ["parallel.pp=2", "data.packing=false"], str(tmp_path), init_ckpt,
                          timeout=300)[0]
    assert _close(losses, ref_losses), f"losses {losses}\n   vs {ref_losses}"
