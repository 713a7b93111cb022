"""SentencePiece BPE tokenizer with the LLaMA settings, and the wrapper the trainer uses.

Settings (Touvron et al. 2023, section 2.1, plus what exact round-trips need):
BPE; numbers split into individual digits; unknown UTF-8 falls back to bytes;
*no* normalisation, no whitespace collapsing and no dummy prefix, so source
code, indentation and newlines decode back exactly (SentencePiece's defaults
NFKC-normalise, collapse runs of spaces and eat a leading space).  Ids:
0 = <unk>, 1 = <s> (BOS), 2 = </s> (EOS); there is no padding piece
(``pad_id == -1``): training samples are packed, never padded.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import random
import re
from pathlib import Path
from typing import Iterable, Iterator, List, Sequence

from megallama.atomic import write_bytes, write_text
from megallama.data.sources import output_error
from megallama.errors import DataError

SETTINGS = dict(
    model_type="bpe",
    split_digits=True,
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    add_dummy_prefix=False,
    character_coverage=0.9995,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
)
NUM_BYTE_PIECES = 256
NUM_SPECIAL = 3  # <unk>, <s>, </s>
CHUNK_CHARS = 4096  # training "sentences": documents cut at line boundaries into pieces this long


class Tokenizer:
    """A trained SentencePiece model.  ``fingerprint`` identifies the model file's content."""

    def __init__(self, model_path: str):
        import sentencepiece as spm

        self.path = str(model_path)
        try:
            data = Path(model_path).read_bytes()
        except OSError:
            raise DataError(f"tokenizer model '{model_path}' not found; train one with "
                            "`megallama tokenizer` or set data.tokenizer to an existing .model file") from None
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(data)
        except (RuntimeError, OSError):
            raise DataError(f"tokenizer model '{model_path}' is not a valid SentencePiece model; "
                            "retrain it with `megallama tokenizer`") from None
        self.fingerprint = hashlib.sha256(data).hexdigest()[:16]
        self.vocab_size = int(self._sp.GetPieceSize())
        self.bos_id = int(self._sp.bos_id())
        self.eos_id = int(self._sp.eos_id())
        self.pad_id = int(self._sp.pad_id())  # -1: no padding piece
        self._data, self._continuation = data, None

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> List[int]:
        ids = self._sp.EncodeAsIds(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_continuation(self, text: str) -> List[int]:
        """Ids of ``text`` where it continues other text (a response after its prompt).

        :meth:`encode` treats ``text`` as the start of one: a model with a dummy prefix (Meta's
        LLaMA tokenizer; megallama's own have none) then puts a ``▁`` (a space) in front of it,
        which inside a whole text is not there.  This encodes with the model's dummy prefix off.
        """
        if self._continuation is None:
            self._continuation = self._sp
            from sentencepiece import sentencepiece_model_pb2  # needs protobuf (a dependency)

            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString(self._data)
            if proto.normalizer_spec.add_dummy_prefix:
                import sentencepiece as spm

                proto.normalizer_spec.add_dummy_prefix = False
                self._continuation = spm.SentencePieceProcessor()
                self._continuation.LoadFromSerializedProto(proto.SerializeToString())
        return self._continuation.EncodeAsIds(text)

    def encode_batch(self, texts: Sequence[str], threads: int = -1) -> List[List[int]]:
        """Encode many texts; SentencePiece spreads them over ``threads`` threads (-1: all cores)."""
        return self._sp.EncodeAsIds(list(texts), num_threads=threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.IdToPiece(int(i))


def _chunks(text: str) -> Iterator[str]:
    """Cut a document at line ends into pieces of at most ~CHUNK_CHARS (newlines kept inside)."""
    start = 0
    while start < len(text):
        end = min(start + CHUNK_CHARS, len(text))
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        yield text[start:end]
        start = end


def sample_chunks(texts: Iterable[str], sample_chars: int, seed: int) -> List[str]:
    """Reservoir-sample about ``sample_chars`` of text in chunks; same inputs + seed = same sample.

    Memory is bounded by the sample, whatever the input size.
    """
    k = max(1, sample_chars // CHUNK_CHARS)
    rng = random.Random(seed)
    reservoir: List[tuple[int, str]] = []
    n = 0
    for text in texts:
        for chunk in _chunks(text):
            if len(reservoir) < k:
                reservoir.append((n, chunk))
            else:
                j = rng.randrange(n + 1)
                if j < k:
                    reservoir[j] = (n, chunk)
            n += 1
    return [c for _, c in sorted(reservoir)]


def train_tokenizer(texts: Iterable[str], vocab_size: int, output_prefix: str, sample_mb: float = 64.0,
                    seed: int = 1234, force: bool = False, threads: int = 0) -> Path:
    """Train a BPE model on a bounded sample of ``texts``; write PREFIX.model and PREFIX.vocab atomically."""
    import sentencepiece as spm

    model, vocab = Path(f"{output_prefix}.model"), Path(f"{output_prefix}.vocab")
    if model.exists() and not force:
        raise DataError(f"'{model}' already exists; pass --force to overwrite it or choose another --output")
    if vocab_size <= NUM_BYTE_PIECES + NUM_SPECIAL:
        raise DataError(f"--vocab-size {vocab_size} is too small: byte fallback alone needs "
                        f"{NUM_BYTE_PIECES + NUM_SPECIAL} ids; use at least 512")
    if not (sample_mb > 0 and math.isfinite(sample_mb)):
        raise DataError(f"--sample-mb must be a positive number of megabytes, got {sample_mb}")
    sample = sample_chunks(texts, int(sample_mb * 1e6), seed)
    if not any(s.strip() for s in sample):
        raise DataError("the tokenizer inputs hold no text; pass non-empty files to --input")
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=iter(sample), model_writer=buf, vocab_size=vocab_size,
            input_sentence_size=0, max_sentence_length=4 * CHUNK_CHARS + 16, minloglevel=2,
            num_threads=threads or min(os.cpu_count() or 1, 16), hard_vocab_limit=True, **SETTINGS)
    except RuntimeError as exc:
        msg = str(exc).strip()
        most = re.search(r"too high.*?<= *(\d+)", msg)
        fix = (f"lower --vocab-size to at most {most.group(1)} or give more text" if most
               else "raise --vocab-size or give more text")
        raise DataError(f"SentencePiece could not train a {vocab_size}-piece vocabulary ({msg}); {fix}") from None
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(buf.getvalue())
    vocab_lines = "".join(f"{sp.IdToPiece(i)}\t{i}\n" for i in range(sp.GetPieceSize()))
    try:
        model.parent.mkdir(parents=True, exist_ok=True)
        write_text(vocab, vocab_lines)
        write_bytes(model, buf.getvalue())  # last: a .model present means a complete pair
    except OSError as exc:
        raise output_error(output_prefix, "--output", exc) from None
    return model
