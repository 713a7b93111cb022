"""Input layouts beyond ``{"text": ...}`` JSONL lines.

* ``qa``: JSONL lines ``{"question": html, "answers": [{"score": n, "text": html}, ...], "title": ...}``,
  or a StackExchange dump's ``Posts.xml`` (rows with ``PostTypeId`` 1 = question, 2 = answer and
  ``ParentId``); answers are grouped with their question through a temporary SQLite file, so memory does
  not grow with the dump.
* ``code``: a directory of source files, each carrying the licence of the nearest ``LICENSE``/``COPYING``
  file up its directory tree (``meta.license``, an SPDX id); JSONL lines ``{"text" or "content": ...,
  "license": ..., "path": ...}``; or one file.  Binary files (a NUL byte in the first 8 KB) and ``.git``
  and other hidden directories are not read.
* ``wiki``: a MediaWiki XML dump (``*.xml``, ``*.xml.bz2``, ``*.xml.gz``: the articles, namespace 0 and
  not redirects, the text of their last revision; ``meta.title``), or JSONL/text of wikitext.
* ``arxiv``: a paper's source as arXiv distributes it (``.tar``/``.tar.gz``/``.tgz``: the main ``.tex``
  with its ``\\input``/``\\include`` files inlined; ``.gz``: one gzipped ``.tex``), a ``.tex``, or JSONL.
* anything else: the text readers of :mod:`megallama.data.sources` (``.jsonl``/``.txt``, ``.gz``).

A document is ``{"text", "id"}`` plus ``"path"`` and ``"meta"`` where known.  A malformed record is a
one-line :class:`DataError` naming ``file:line``, or under ``on_error="skip"`` counted in ``stats`` and
skipped; a file that cannot be parsed at all (broken XML) is always a :class:`DataError`.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import sqlite3
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, Optional
from xml.etree import ElementTree

from megallama.data.sources import READ_ERRORS, ReadStats, _open_binary, iter_documents, json_lines, unicode_problem
from megallama.data.steps.code import license_from_text
from megallama.errors import DataError

_LICENSE_FILE = re.compile(r"^(?:un)?licen[cs]e(?:[-_.].*)?$|^copying(?:[-_.].*)?$", re.IGNORECASE)


def _bad(msg: str, where: str, on_error: str, stats: Optional[ReadStats]) -> None:
    if on_error != "skip":
        raise DataError(f"{where}: {msg}; fix it or pass --on-error skip to skip and count it")
    if stats is not None:
        stats.skip(where)


def _jsonl_objects(path: Path, on_error: str, stats: Optional[ReadStats]) -> Iterator[tuple]:
    for where, _, raw in json_lines(path):
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            _bad("not valid JSON", where, on_error, stats)
            continue
        if not isinstance(obj, dict):
            _bad("not a JSON object", where, on_error, stats)
            continue
        yield obj, where, len(raw)


def _count(stats: Optional[ReadStats], nbytes: int) -> None:
    if stats is not None:
        stats.documents += 1
        stats.bytes += nbytes


# ----------------------------------------------------------------------------- qa

def read_qa_jsonl(path: Path, on_error: str = "fail", stats: Optional[ReadStats] = None) -> Iterator[Dict[str, Any]]:
    for obj, where, nbytes in _jsonl_objects(path, on_error, stats):
        if "question" not in obj:
            _bad("no field 'question' (a QA line is {\"question\": html, \"answers\": [{\"score\": n, \"text\": "
                 "html}]})", where, on_error, stats)
            continue
        _count(stats, nbytes)
        raw = [obj["question"]] + [a.get("text") if isinstance(a, dict) else a for a in obj.get("answers") or []]
        yield {"text": "\n".join(x for x in raw if isinstance(x, str)), "id": str(obj.get("id", where)), "path": str(path),
               "meta": {"question": obj["question"], "answers": obj.get("answers", []), "title": obj.get("title")}}


def read_stackexchange_posts(path: Path, on_error: str = "fail",
                             stats: Optional[ReadStats] = None) -> Iterator[Dict[str, Any]]:
    """Questions of a ``Posts.xml`` with their answers (in the dump's order), streamed through SQLite."""
    with tempfile.TemporaryDirectory(prefix="megallama-posts-") as tmp:
        db = sqlite3.connect(os.path.join(tmp, "posts.sqlite"))
        db.execute("CREATE TABLE q (id INTEGER PRIMARY KEY, title TEXT, body TEXT, line INTEGER)")
        db.execute("CREATE TABLE a (id INTEGER, parent INTEGER, score TEXT, body TEXT)")
        try:
            with _open_binary(path) as f:
                parser = ElementTree.iterparse(f, events=("end",))
                for _, elem in parser:
                    if elem.tag != "row":
                        continue
                    row = elem.attrib
                    elem.clear()
                    kind, pid = row.get("PostTypeId"), row.get("Id", "")
                    where = f"{path}: post {pid or '?'}"
                    if kind not in ("1", "2"):
                        continue  # wiki excerpts, tag descriptions, ...
                    if not pid.isdigit() or "Body" not in row or (kind == "2" and not row.get("ParentId", "").isdigit()):
                        _bad("a post without a numeric Id, a Body or (an answer) a ParentId", where, on_error, stats)
                        continue
                    if kind == "1":
                        db.execute("INSERT OR REPLACE INTO q VALUES (?, ?, ?, 0)", (int(pid), row.get("Title"), row["Body"]))
                    else:
                        db.execute("INSERT INTO a VALUES (?, ?, ?, ?)",
                                   (int(pid), int(row["ParentId"]), row.get("Score", "0"), row["Body"]))
        except ElementTree.ParseError as exc:
            line = exc.position[0] if getattr(exc, "position", None) else "?"
            raise DataError(f"{path}:{line}: not a readable StackExchange Posts.xml ({exc}); "
                            "give the dump's Posts.xml intact") from None
        except READ_ERRORS as exc:
            raise DataError(f"cannot read '{path}' ({exc}); check the file") from None
        db.execute("CREATE INDEX a_parent ON a (parent, id)")
        db.commit()
        for qid, title, body, _ in db.execute("SELECT * FROM q ORDER BY id"):
            answers = [{"score": _score(score), "text": text}
                       for score, text in db.cursor().execute("SELECT score, body FROM a WHERE parent = ? ORDER BY id",
                                                              (qid,))]
            _count(stats, len(body) + sum(len(a["text"]) for a in answers))
            yield {"text": "\n".join([body] + [a["text"] for a in answers]), "id": f"{path}: post {qid}",
                   "path": str(path), "meta": {"question": body, "answers": answers, "title": title}}
        db.close()


def _score(value: str):
    try:
        return int(value)
    except ValueError:
        return value  # the qa step reports a score that is not a number


def read_qa(path: Path, on_error: str = "fail", stats: Optional[ReadStats] = None) -> Iterator[Dict[str, Any]]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        name = f.name[:-3] if f.name.endswith(".gz") else f.name
        if name.endswith(".xml"):
            yield from read_stackexchange_posts(f, on_error, stats)
        elif name.endswith(".jsonl"):
            yield from read_qa_jsonl(f, on_error, stats)
        elif not path.is_dir():
            raise DataError(f"'{f}' is neither .jsonl QA lines nor a StackExchange Posts.xml; give one of those")


# ----------------------------------------------------------------------------- wiki

def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]  # the MediaWiki export namespace changes with its version


def read_wiki_dump(path: Path, on_error: str = "fail", stats: Optional[ReadStats] = None) -> Iterator[Dict[str, Any]]:
    """The articles of a MediaWiki XML dump (``pages-articles.xml``, ``.bz2`` or ``.gz``), streamed: pages
    of namespace 0 that are not redirects, the wikitext of their last revision."""
    import bz2

    opener = bz2.open if path.name.endswith(".bz2") else gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            page: Dict[str, Any] = {}
            for event, elem in ElementTree.iterparse(f, events=("start", "end")):
                tag = _local(elem.tag)
                if event == "start":
                    if tag == "page":
                        page = {}
                    continue
                if tag in ("title", "ns") and "text" not in page:
                    page[tag] = elem.text or ""
                elif tag == "id" and "id" not in page:
                    page["id"] = elem.text or ""
                elif tag == "redirect":
                    page["redirect"] = True
                elif tag == "text":
                    page["text"] = elem.text or ""
                elif tag == "page":
                    elem.clear()
                    where = f"{path}: page {page.get('id') or '?'}"
                    if page.get("ns") != "0" or page.get("redirect"):
                        continue  # talk, user, template ... pages and redirects are not articles
                    if "text" not in page:
                        _bad("a page without revision text", where, on_error, stats)
                        continue
                    _count(stats, len(page["text"].encode("utf-8")))
                    yield {"text": page["text"], "id": where, "path": str(path), "meta": {"title": page.get("title")}}
                if tag in ("revision", "page"):
                    elem.clear()
    except ElementTree.ParseError as exc:
        line = exc.position[0] if getattr(exc, "position", None) else "?"
        raise DataError(f"{path}:{line}: not a readable MediaWiki XML dump ({exc}); give the dump intact") from None
    except (EOFError, OSError) as exc:
        raise DataError(f"cannot read '{path}' ({exc}); check the file (a truncated .bz2?)") from None


# ----------------------------------------------------------------------------- arxiv

_INPUT = re.compile(r"(?<!\\)\\(?:input|include)\s*\{([^}]*)\}")
_DOCUMENTCLASS = re.compile(r"^[^%\n]*\\documentclass", re.MULTILINE)
ARXIV_ARCHIVES = (".tar", ".tar.gz", ".tgz", ".gz")
_MAX_TEX_BYTES = 64 << 20  # a paper's .tex files together; more is not a paper


def _arxiv_main(files: Dict[str, str]) -> Optional[str]:
    """The main file of a paper: a ``.tex`` with ``\\documentclass`` (one with ``\\begin{document}`` first)."""
    mains = sorted((r"\begin{document}" not in text, name) for name, text in files.items()
                   if name.endswith(".tex") and _DOCUMENTCLASS.search(text))
    return mains[0][1] if mains else None


def _inline_inputs(name: str, files: Dict[str, str], depth: int = 0) -> str:
    """``files[name]`` with its ``\\input``/``\\include`` files inlined (relative to the paper's root, as
    LaTeX resolves them); one that is not in the archive stays as written."""
    if depth > 20:
        raise ValueError(f"\\input nested more than 20 deep at {name}")

    def inline(m: "re.Match") -> str:
        target = m.group(1).strip()
        for candidate in (target, target + ".tex"):
            candidate = os.path.normpath(candidate)
            if candidate in files and candidate != name:
                return _inline_inputs(candidate, files, depth + 1)
        return m.group(0)

    return _INPUT.sub(inline, files[name])


def read_arxiv_source(path: Path, on_error: str = "fail", stats: Optional[ReadStats] = None) -> Iterator[Dict[str, Any]]:
    """One paper from arXiv's source as it is distributed: a ``.tar``/``.tar.gz``/``.tgz`` of its files (the
    main ``.tex``, the one with ``\\documentclass``, with its ``\\input``/``\\include`` files inlined),
    a gzipped single ``.tex`` (``.gz``), or a ``.tex``."""
    import tarfile

    where = str(path)
    name = path.name
    if name.endswith(".tex"):
        text = path.read_bytes().decode("utf-8", "replace")
        _count(stats, len(text))
        yield {"text": text, "id": where, "path": where}
        return
    files: Dict[str, str] = {}
    try:
        if tarfile.is_tarfile(path):
            with tarfile.open(path) as tar:
                total = 0
                for member in tar:
                    if not member.isfile() or not member.name.endswith((".tex", ".ltx")):
                        continue
                    total += member.size
                    if total > _MAX_TEX_BYTES:
                        raise ValueError(f"its .tex files hold more than {_MAX_TEX_BYTES >> 20} MB")
                    data = tar.extractfile(member).read()
                    files[os.path.normpath(member.name)] = data.decode("utf-8", "replace")
        else:
            with gzip.open(path, "rb") as f:
                data = f.read(_MAX_TEX_BYTES + 1)
            if len(data) > _MAX_TEX_BYTES:
                raise ValueError(f"it holds more than {_MAX_TEX_BYTES >> 20} MB")
            files["main.tex"] = data.decode("utf-8", "replace")
        main = _arxiv_main(files)
        if main is None:
            _bad("no .tex file with \\documentclass (a paper's source is its main .tex and the files it inputs)",
                 where, on_error, stats)
            return
        text = _inline_inputs(main, files)
    except ValueError as exc:
        _bad(f"not a paper's source ({exc})", where, on_error, stats)
        return
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"cannot read '{path}' ({' '.join(str(exc).split())}); check the file (a truncated "
                        "archive?) or drop it from --input") from None
    _count(stats, len(text))
    yield {"text": text, "id": where, "path": where, "meta": {"main": main}}


# ----------------------------------------------------------------------------- code

def _is_binary(data: bytes) -> bool:
    return b"\0" in data[:8192]


def _code_file(path: Path, license: Optional[str], on_error: str, stats: Optional[ReadStats]):
    data = path.read_bytes()
    if _is_binary(data):
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        _bad(f"invalid UTF-8 at byte {exc.start}", f"{path}:{line}", on_error, stats)
        return None
    _count(stats, len(data))
    return {"text": text, "id": str(path), "path": str(path), "meta": {"license": license}}


def read_code(path: Path, on_error: str = "fail", stats: Optional[ReadStats] = None) -> Iterator[Dict[str, Any]]:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    if path.is_file() and name.endswith(".jsonl"):
        for obj, where, nbytes in _jsonl_objects(path, on_error, stats):
            text = obj.get("text", obj.get("content"))
            if not isinstance(text, str) or unicode_problem(text):
                _bad("no string field 'text' (or 'content') holding valid Unicode", where, on_error, stats)
                continue
            meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
            _count(stats, nbytes)
            yield {"text": text, "id": str(obj.get("path") or where), "path": str(obj.get("path") or path),
                   "meta": {**meta, "license": obj.get("license", meta.get("license"))}}
        return
    if path.is_file():
        doc = _code_file(path, None, on_error, stats)
        if doc is not None:
            yield doc
        return
    licenses: Dict[str, Optional[str]] = {}
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        here = Path(root)
        found = licenses.get(str(here.parent)) if here != path else None
        for name in sorted(files):
            if _LICENSE_FILE.match(name):
                try:
                    found = license_from_text((here / name).read_text(encoding="utf-8", errors="replace"))
                except OSError as exc:
                    raise DataError(f"cannot read '{here / name}' ({exc.strerror}); check the file") from None
                break
        licenses[str(here)] = found
        for name in sorted(files):
            if name.startswith(".") or _LICENSE_FILE.match(name):
                continue
            doc = _code_file(here / name, found, on_error, stats)
            if doc is not None:
                yield doc


# ----------------------------------------------------------------------------- any source

def read_documents(source: str, path: Path, on_error: str = "fail",
                   stats: Optional[ReadStats] = None) -> Iterator[Dict[str, Any]]:
    """The documents of one input ``path`` for ``source`` (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"input '{path}' does not exist; pass existing files or directories to --input")
    try:
        if source == "qa" and (path.is_dir() or not path.name.endswith((".txt", ".txt.gz"))):
            yield from read_qa(path, on_error, stats)
        elif source == "code":
            yield from read_code(path, on_error, stats)
        elif source == "arxiv" and path.is_file() and path.name.endswith((".tex",) + ARXIV_ARCHIVES) \
                and not path.name.endswith((".jsonl.gz", ".txt.gz")):
            yield from read_arxiv_source(path, on_error, stats)
        elif source == "wiki" and path.name.endswith((".xml", ".xml.bz2", ".xml.gz")):
            yield from read_wiki_dump(path, on_error, stats)
        else:
            for d in iter_documents([str(path)], on_error=on_error, stats=stats if stats is not None else ReadStats()):
                yield {"text": d.text, "id": d.where}
    except READ_ERRORS as exc:
        raise DataError(f"cannot read '{path}' ({exc}); check the file (a truncated .gz?) or drop it") from None
