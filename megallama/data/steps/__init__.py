"""Per-source document steps (PLACEHOLDER until issue 21 item 1 lands).

This module implements the interface the sharded curation engine
(:mod:`megallama.data.shards`) codes to, by wrapping the heuristic filters of
:mod:`megallama.data.curate` as steps and reading JSONL / whole text files only.
The full per-source steps (language id, KenLM, classifier, C4 rules, licences,
wikitext, LaTeX, StackExchange) replace it.

Contract:

* :class:`StepsConfig` — the settings of the steps (frozen, picklable);
* :class:`Step` — ``name`` and ``__call__(doc) -> doc | None`` (None: drop);
* :func:`source_steps` — the document-local steps of a source, in order;
* :func:`read_documents` — the documents (dicts with ``"text"``) of one input path;
* :class:`StepError` — a malformed document (a counted skip under ``on_error="skip"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

from megallama.data.curate import CurateConfig, code_filter, strip_license_header, web_filter
from megallama.data.sources import iter_documents

class StepError(Exception):
    """A document a step cannot process (malformed markup...): skipped and counted under on_error='skip'."""


@dataclass(frozen=True)
class StepsConfig:
    languages: Tuple[str, ...] = ("en",)
    lid_model: str = ""
    lm_model: str = ""
    classifier_model: str = ""
    badwords: str = ""
    licenses: Tuple[str, ...] = ("mit", "apache-2.0", "bsd-2-clause", "bsd-3-clause")
    on_error: str = "fail"


class Step:
    """One document-local step: ``step(doc)`` is the document (text possibly transformed) or None (drop)."""

    name: str = "step"

    def __call__(self, doc: dict) -> Optional[dict]:  # pragma: no cover - interface
        raise NotImplementedError


class _Filter(Step):
    def __init__(self, name: str, reason: Callable[[str, CurateConfig], Optional[str]]):
        self.name, self.reason = name, reason

    def __call__(self, doc: dict) -> Optional[dict]:
        return None if self.reason(doc["text"], CurateConfig()) else doc


class _StripLicenceHeader(Step):
    name = "licence header stripped"

    def __call__(self, doc: dict) -> Optional[dict]:
        return dict(doc, text=strip_license_header(doc["text"]))


def source_steps(source: str, cfg: StepsConfig) -> List[Step]:
    if source in ("web", "c4"):
        return [_Filter("web filters (Gopher)", web_filter)]
    if source == "code":
        return [_StripLicenceHeader(), _Filter("code filters", code_filter)]
    return []


def read_documents(source: str, path: Path) -> Iterator[dict]:
    path = Path(path)
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    for doc in iter_documents([str(f) for f in files], suffixes=("",)):
        yield {"text": doc.text}
