"""Streaming reader of raw text inputs: .txt, .jsonl, .gz of either, and directories.

A *document* is one JSON line of a .jsonl file (its text under a configurable
key) or one whole text file (source code, a book).  Inputs are read lazily, one
line or one file at a time, so corpora far larger than memory stream through.
A malformed line is reported as ``file:line``; with ``on_error="skip"`` it is
counted and skipped, with ``"fail"`` it raises :class:`DataError`.
"""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, List, Sequence

from megallama.errors import DataError

# Suffixes picked up when walking a directory (explicit files may have any suffix: read as text).
# Other suffixes (source code: .py, .c, ...) are read as whole-file text documents when asked for.
TEXT_SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")
ON_ERROR = ("skip", "fail")
# What reading a damaged input raises: a truncated .gz is an EOFError, a corrupt one a zlib.error
READ_ERRORS = (OSError, EOFError, gzip.BadGzipFile, zlib.error)


@dataclass
class ReadStats:
    """What reading found: documents, text bytes, and malformed lines skipped (with a sample of where)."""

    documents: int = 0
    bytes: int = 0
    skipped: int = 0
    skipped_at: List[str] = field(default_factory=list)

    def skip(self, where: str) -> None:
        self.skipped += 1
        if len(self.skipped_at) < 10:
            self.skipped_at.append(where)


@dataclass(frozen=True)
class Document:
    text: str
    where: str  # "file:line" (line 1 for whole-file documents)


def expand_inputs(paths: Iterable[str], suffixes: Sequence[str] = TEXT_SUFFIXES) -> List[Path]:
    """Files named directly plus the files ending in ``suffixes`` under named directories, sorted."""
    suffixes = tuple(suffixes)
    files: List[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(suffixes))
            if not found:
                raise DataError(f"input directory '{raw}' holds no {' '.join(suffixes)} files; "
                                "point --input at your text files or name their suffix with --suffix")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"input '{raw}' does not exist; pass existing files or directories to --input")
    if not files:
        raise DataError("no input files given; pass text files or directories to --input")
    return files


def contiguous_shards(sizes: Sequence[int], shards: int) -> List[int]:
    """The shard of each input (in order): contiguous runs balanced by bytes; an input goes to the shard
    where its middle byte falls, so shard i holds inputs before shard i + 1's."""
    total = sum(sizes)
    if total <= 0:
        return [0] * len(sizes)
    out, before = [], 0
    for size in sizes:
        out.append(min(shards - 1, int((before + size / 2) * shards / total)))
        before += size
    return out


def _is_jsonl(path: Path) -> bool:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return name.endswith(".jsonl")


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def json_lines(path: Path) -> Iterator[tuple]:
    """(where, line number, raw bytes) of every non-blank line of a .jsonl(.gz) file."""
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                yield f"{path}:{lineno}", lineno, raw


def unicode_problem(text: str) -> str:
    """'' for text that is valid Unicode, else what is wrong: JSON can escape a lone surrogate
    (``"\\ud800"``, a cut-off emoji in scraped text) that no UTF-8 encoder or tokenizer accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"a lone surrogate \\u{ord(text[exc.start]):04x} at character {exc.start}, not valid Unicode"
    return ""


def _bad(msg: str, on_error: str, stats: ReadStats, where: str) -> None:
    if on_error == "fail":
        raise DataError(f"{where}: {msg}; fix that line or pass --on-error skip to skip and count it")
    stats.skip(where)


def _jsonl_documents(path: Path, text_key: str, on_error: str, stats: ReadStats) -> Iterator[Document]:
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                _bad("not valid JSON", on_error, stats, where)
                continue
            text = obj.get(text_key) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                _bad(f"no string field '{text_key}' (choose the field with --text-key)", on_error, stats, where)
                continue
            problem = unicode_problem(text)
            if problem:
                _bad(f"field '{text_key}' holds {problem}", on_error, stats, where)
                continue
            stats.documents += 1
            stats.bytes += len(raw)
            yield Document(text, where)


def _text_document(path: Path, on_error: str, stats: ReadStats) -> Iterator[Document]:
    with _open_binary(path) as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        _bad(f"invalid UTF-8 at byte {exc.start}", on_error, stats, f"{path}:{line}")
        return
    stats.documents += 1
    stats.bytes += len(data)
    yield Document(text, f"{path}:1")


def iter_documents(paths: Iterable[str], text_key: str = "text", on_error: str = "fail",
                   stats: ReadStats | None = None, suffixes: Sequence[str] = TEXT_SUFFIXES) -> Iterator[Document]:
    """Stream the documents of all inputs in order; ``stats`` (if given) is updated as they go."""
    if on_error not in ON_ERROR:
        raise DataError(f"--on-error must be one of {', '.join(ON_ERROR)}, got '{on_error}'")
    stats = stats if stats is not None else ReadStats()
    for path in expand_inputs(paths, suffixes):
        try:
            if _is_jsonl(path):
                yield from _jsonl_documents(path, text_key, on_error, stats)
            else:
                yield from _text_document(path, on_error, stats)
        except READ_ERRORS as exc:
            raise DataError(f"cannot read '{path}' ({exc}); check the file (a truncated .gz?) or drop it") from None


def output_error(path, option: str, exc) -> DataError:
    """The one-line error for an output that cannot be created (a parent that is a file, no permission...)."""
    if isinstance(exc, (FileExistsError, NotADirectoryError)):
        reason = "a parent of it is a file, not a directory"
    else:
        reason = exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)
    return DataError(f"cannot write {option} '{path}' ({reason}); choose a {option} in a writable directory")


def add_input_arguments(p) -> None:
    """The input options shared by `tokenizer`, `preprocess` and `curate`."""
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help=".txt, .jsonl, .gz of either, or directories of them")
    p.add_argument("--text-key", default="text", help="JSON field holding the text in .jsonl inputs (default: text)")
    p.add_argument("--suffix", action="append", default=None, metavar=".EXT",
                   help="file suffix picked up in directories, repeatable (default: .txt .jsonl and their .gz); "
                        "other files are read whole as one document")
    p.add_argument("--on-error", choices=ON_ERROR, default="fail",
                   help="a malformed line: skip and count it, or stop (default: fail)")


def documents_from_args(args, stats: ReadStats) -> Iterator[Document]:
    return iter_documents(args.input, args.text_key, args.on_error, stats, tuple(args.suffix or TEXT_SUFFIXES))
