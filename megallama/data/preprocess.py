"""Tokenize text inputs into an indexed dataset (PREFIX.bin/.idx), in parallel worker processes.

Documents stream from :mod:`megallama.data.sources` in batches; a pool encodes
the batches and ``imap`` hands them back *in input order*, so the output of N
workers is byte-identical to the output of one.  EOS is appended to every
document; empty documents (an empty file, ``{"text": ""}``) are left out.
Files appear only when complete (see :class:`IndexedDatasetWriter`).
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
from collections import deque
from dataclasses import dataclass
from itertools import islice
from typing import Iterable, Iterator, List, Optional, Sequence

import numpy as np

from megallama.data.indexed import IndexedDatasetWriter, dtype_for_vocab, pack_documents
from megallama.data.sources import TEXT_SUFFIXES, ReadStats, iter_documents
from megallama.data.tokenizer import Tokenizer
from megallama.errors import DataError

BATCH_DOCS = 64


@dataclass
class PreprocessReport:
    documents: int
    tokens: int
    text_bytes: int
    skipped: int
    seconds: float
    empty: int = 0  # documents with no text, left out (an EOS-only document teaches nothing)

    def line(self) -> str:
        s = max(self.seconds, 1e-9)
        return (f"{self.documents:,} documents, {self.tokens:,} tokens, {self.text_bytes / 1e6:.1f} MB in {s:.1f}s "
                f"({self.documents / s:,.0f} docs/s, {self.tokens / s:,.0f} tokens/s, {self.text_bytes / 1e6 / s:.2f} MB/s)"
                + (f"; skipped {self.skipped} malformed lines" if self.skipped else "")
                + (f"; left out {self.empty} empty documents" if self.empty else ""))


class Progress:
    """A one-line progress display on stderr (documents/s, tokens/s), redrawn at most every 0.5 s."""

    def __init__(self, enabled: bool, stream=sys.stderr):
        self.enabled, self.stream = enabled, stream
        self.start = self.last = time.perf_counter()

    def update(self, docs: int, tokens: int, nbytes: int, final: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not final and now - self.last < 0.5):
            return
        self.last = now
        s = max(now - self.start, 1e-9)
        self.stream.write(f"\r  {docs:>12,} docs {docs / s:>9,.0f} docs/s | {tokens:>14,} tokens "
                          f"{tokens / s:>11,.0f} tokens/s | {nbytes / 1e6:>9.1f} MB" + ("\n" if final else ""))
        self.stream.flush()


# Each worker process loads the tokenizer once (pool initializer); this module-level
# slot is the standard multiprocessing idiom, set only inside worker processes.
_WORKER_TOKENIZER: Optional[Tokenizer] = None


def _init_worker(model_path: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = Tokenizer(model_path)


def encode_batch(tok: Tokenizer, texts: Sequence[str], threads: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Encode texts, append EOS to each, return (flat tokens, lengths)."""
    docs = [ids + [tok.eos_id] for ids in tok.encode_batch(texts, threads)]
    return pack_documents(docs, dtype_for_vocab(tok.vocab_size))


def _encode_texts(tok: Tokenizer, texts: List[str], threads: int = -1) -> tuple[np.ndarray, np.ndarray, int]:
    flat, lengths = encode_batch(tok, texts, threads)
    return flat, lengths, sum(len(t.encode("utf-8")) for t in texts)


def _worker_encode(texts: List[str]) -> tuple[np.ndarray, np.ndarray, int]:
    return _encode_texts(_WORKER_TOKENIZER, texts, threads=1)  # one thread per worker process


def _batches(texts: Iterable[str], size: int) -> Iterator[List[str]]:
    it = iter(texts)
    while batch := list(islice(it, size)):
        yield batch


def _bounded_imap(pool, fn, items: Iterable, window: int) -> Iterator:
    """Ordered ``pool.imap`` that keeps at most ``window`` tasks in flight.

    ``Pool.imap`` drains its input eagerly, which would queue a whole corpus in
    memory; this reads the next batch only when the oldest result is taken.
    """
    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def preprocess(inputs: Sequence[str], tokenizer_path: str, output_prefix: str, workers: int = 1,
               text_key: str = "text", on_error: str = "fail", force: bool = False,
               progress: bool = False, suffixes: Sequence[str] = TEXT_SUFFIXES) -> PreprocessReport:
    """Stream ``inputs`` through the tokenizer into ``output_prefix``.bin/.idx."""
    if workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    tok = Tokenizer(tokenizer_path)
    stats = ReadStats()
    empty = 0

    def nonempty(docs):
        nonlocal empty
        for d in docs:
            if d.text:
                yield d.text
            else:
                empty += 1

    texts = nonempty(iter_documents(inputs, text_key, on_error, stats, suffixes))
    writer = IndexedDatasetWriter(output_prefix, tok.vocab_size, tok.fingerprint, force=force)
    bar = Progress(progress)
    start = time.perf_counter()
    nbytes = 0
    pool = None
    try:
        if workers == 1:
            results = (_encode_texts(tok, b, threads=1) for b in _batches(texts, BATCH_DOCS))
        else:
            pool = mp.get_context("spawn" if sys.platform == "darwin" else "fork").Pool(
                workers, initializer=_init_worker, initargs=(tokenizer_path,))
            results = _bounded_imap(pool, _worker_encode, _batches(texts, BATCH_DOCS), 4 * workers)
        for flat, lengths, b in results:
            writer.add_packed(flat, lengths)
            nbytes += b
            bar.update(writer.num_docs, writer.num_tokens, nbytes)
        if writer.num_docs == 0:
            raise DataError(f"the inputs {', '.join(map(str, inputs))} hold no documents; "
                            "pass non-empty files (and the right --text-key for .jsonl)")
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
    bar.update(writer.num_docs, writer.num_tokens, nbytes, final=True)
    return PreprocessReport(writer.num_docs, writer.num_tokens, nbytes, stats.skipped,
                            time.perf_counter() - start, empty)
