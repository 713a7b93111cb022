"""A cache directory that many processes may build at once, safely and atomically.

All ranks of a job call :func:`build_once` with the same key.  An ``fcntl``
lock serialises them: the first builds into a temporary directory and renames
it into place (a rename is atomic, so a half-written entry never looks
complete); the others wait on the lock and then reuse the finished entry.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path
from typing import Callable

from megallama.atomic import commit_directory, new_tmp_dir
from megallama.errors import DataError


def cache_root(cache_dir: str) -> Path:
    """``cache_dir`` or ``$MEGALLAMA_CACHE`` or ``~/.cache/megallama``."""
    root = cache_dir or os.environ.get("MEGALLAMA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "megallama")
    return Path(root)


def build_once(entry: Path, build: Callable[[Path], None]) -> Path:
    """Return ``entry`` (a directory), calling ``build(tmp_dir)`` first if it does not exist yet."""
    if entry.is_dir():
        return entry
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        lock = open(entry.parent / f".{entry.name}.lock", "w")
    except OSError as exc:
        raise DataError(f"cannot create cache directory '{entry.parent}' ({exc.strerror}); "
                        "set data.cache_dir to a writable directory") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if entry.is_dir():  # another process built it while we waited
            return entry
        tmp = new_tmp_dir(entry)
        try:
            build(tmp)
            commit_directory(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return entry
