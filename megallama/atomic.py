"""Atomic writes: every file and directory megallama writes appears complete or not at all.

The one helper for committing output (checkpoints and their ``latest`` pointer, converted models,
datasets' manifests, results, summaries, heartbeats, curated text):

* a **file** is written under a temporary name next to it (hidden, unique to this process and call,
  so concurrent writers and a user's own ``X.tmp`` are never touched), flushed (and fsynced with
  ``durable=True``), then renamed over its target with ``os.replace``, atomic on POSIX filesystems:
  a reader sees the old file or the new one, never a part, and a failed write leaves no temporary
  file (:func:`replacing`, :func:`write_bytes`, :func:`write_text`);
* a **directory** is built in a new temporary directory beside it (:func:`building`), then renamed
  into place (:func:`commit_directory`; an existing one is moved aside first and removed only once
  the new one is in place);
* inside a directory that is being built, files need no rename of their own: :func:`fsync_write`
  makes them durable before the directory's rename.

Two streaming writers commit several files as one and rename their parts themselves, in the order
their readers rely on: an indexed dataset's ``.bin``/``.idx`` pair (the ``.idx`` last,
:class:`megallama.data.indexed.IndexedDatasetWriter`) and a curate task's files then its marker
(:mod:`megallama.data.shards`).

Only the standard library: ``parallel/``, the data tools and the checkpoint code all use it.
"""

from __future__ import annotations

import itertools
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator, Optional

from megallama.errors import CheckpointError

_serial = itertools.count()  # temporary names unique across threads (an asynchronous checkpoint writer)


def temporary_name(path: Path) -> Path:
    """A hidden name next to ``path``, unique to this process and call."""
    return path.with_name(f".{path.name}.{os.getpid()}-{next(_serial)}.tmp")


def fsync_dir(path: Path) -> None:
    """Make renames inside ``path`` durable (POSIX needs the directory itself fsynced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


def fsync_write(path: Path, data: bytes) -> None:
    """Write a new file inside a directory being built and make it durable (no rename of its own)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def committing(path: str | Path, durable: bool = False) -> Iterator[Path]:
    """``with committing(path) as tmp: write(tmp)``: a temporary path next to ``path`` for a writer
    that takes a file name (a library's ``save(path)``); renamed over ``path`` when the block
    completes, removed if it raises.  ``durable``: fsync the file and its directory."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    if durable:
        fsync_dir(path.parent)


@contextmanager
def replacing(path: str | Path, mode: str = "w", durable: bool = False, **open_kwargs) -> Iterator[IO]:
    """``with replacing(path) as f: f.write(...)``: ``path`` is replaced by what the block wrote, once
    the block completes; if it raises, ``path`` is untouched and the temporary file removed.
    ``durable``: fsync the file and its directory (a crash after the return keeps the new file)."""
    with committing(path, durable=durable) as tmp:
        with open(tmp, mode, **open_kwargs) as f:
            yield f


def write_bytes(path: str | Path, data: bytes, durable: bool = False) -> None:
    with replacing(path, "wb", durable=durable) as f:
        f.write(data)


def write_text(path: str | Path, text: str, durable: bool = False) -> None:
    with replacing(path, "w", durable=durable, encoding="utf-8") as f:
        f.write(text)


# ----------------------------------------------------------------------------- directories

def check_new_output(path: str | Path, force: Optional[bool] = None) -> Path:
    """Refuse an existing output unless ``force``; ``force=None``: the tool has no ``--force``."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if not force:
            how = "choose a new path or remove it" if force is None else "choose a new path or pass --force"
            raise CheckpointError(f"output '{path}' already exists; {how}")
    return path



def new_tmp_dir(out: Path) -> Path:
    """A new, empty directory next to ``out`` to build it in, then rename: its name is unique, so
    no file of the user's (say a directory called ``OUT.tmp``) is ever removed or written into."""
    for attempt in range(1000):
        tmp = out.with_name(f".{out.name}.{os.getpid()}-{attempt}.tmp")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()  # fails if it exists: nothing of anyone else's is reused
            return tmp
        except FileExistsError:
            if not out.parent.is_dir():
                break
        except OSError as exc:
            raise CheckpointError(f"cannot create output '{out}' ({exc.strerror}); choose another path") from None
    raise CheckpointError(f"cannot create output '{out}' (its parent is not a directory); choose another path")


class WriteFailed(CheckpointError):
    """An output could not be written (its temporary directory is already removed)."""

    def __init__(self, out: Path, exc: OSError):
        self.os_error = exc
        super().__init__(f"writing '{out}' failed ({exc.strerror or exc}); nothing was written and an existing "
                         "output is kept: free space or choose another --output")


@contextmanager
def building(out: Path) -> Iterator[Path]:
    """A new temporary directory (:func:`new_tmp_dir`) to build ``out`` in; the block commits it with
    :func:`commit_directory`.  If the block fails the directory is removed, and a failed write (a full
    disk, a nested output's :class:`WriteFailed`) is reported as one line naming ``out``."""
    tmp = new_tmp_dir(out)
    try:
        yield tmp
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # a refused tensor or a full disk leaves nothing behind
        if isinstance(exc, (OSError, WriteFailed)):
            raise WriteFailed(out, getattr(exc, "os_error", exc)) from None
        raise


def commit_directory(tmp: Path, out: Path) -> None:
    """Replace ``out`` by the completed ``tmp`` directory (a reader never sees a half-written one);
    an existing ``out`` is moved aside first and only deleted once ``tmp`` is in place."""
    aside = None
    if out.exists() or out.is_symlink():
        aside = next(a for i in range(1000) if not (a := out.with_name(f".{out.name}.{os.getpid()}-{i}.old")).exists())
        os.replace(out, aside)
    try:
        os.replace(tmp, out)
    except BaseException:
        if aside is not None:
            os.replace(aside, out)
        raise
    fsync_dir(out.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True) if aside.is_dir() and not aside.is_symlink() else aside.unlink()
