"""The paper's per-source, document-local curation steps (section 2.1); dedup lives in ``megallama.data.curate``.

Interface (what ``megallama curate`` and its sharded executors rely on):

* ``StepsConfig`` (frozen dataclass): ``languages=("en",)``, ``lid_model`` (fastText ``lid.176.bin``;
  None: langid.py's model, shipped in its PyPI package), ``lid_threshold=0.5``, ``lm_model`` (KenLM
  ``.arpa``/binary), ``lm_tokenizer`` (its SentencePiece model), ``lm_cutoffs=(head, middle)``
  perplexities, ``lm_buckets=("head", "middle")`` kept, ``classifier_model`` (fastText ``.bin`` from
  ``megallama train-classifier``), ``classifier_threshold=0.5``, ``badwords`` (a file), ``licenses=
  ("apache-2.0", "bsd", "mit")``, ``on_error="fail"|"skip"``, and the C4/code/web rule thresholds.
  ``"any"`` in ``languages`` or ``licenses`` disables that filter.  Each field's ``metadata["help"]`` is its
  command-line help (``megallama curate`` offers every field as ``--field-name``); values given as the
  command line gives them (strings, lists, ``""`` for no file) are converted, and the whole is checked
  when it is made (a bad value: one-line ``ConfigError``).
* ``Step``: ``name`` and ``step(doc) -> doc | None``: the document (its text possibly rewritten, ``meta``
  possibly extended) or None to drop it.  No state crosses documents; models load lazily, once per process
  (``step.load()`` loads them now); a step pickles as its settings, so multiprocessing/Ray can ship it.
* ``source_steps(source, cfg) -> list[Step]`` for ``web c4 code wiki books arxiv qa``, in order.  Model
  files are checked (exist, readable, right magic) here: a missing or corrupt one is a one-line
  :class:`~megallama.errors.UserError` naming the file (exit 2) before any document is read.
* ``read_documents(source, path, on_error="fail", stats=None) -> Iterator[dict]``: the documents of one
  input in the layouts of :mod:`.readers` (QA lines and ``Posts.xml``, code directories with licence
  files, and the plain text/JSONL inputs).  A document always has ``"text"`` and may carry ``"id"``,
  ``"path"`` and ``"meta"``.
* ``StepError``: a malformed document (wikitext, LaTeX, HTML/QA record).  :func:`run_steps` applies a
  list of steps to one document, counts what each dropped, and turns a ``StepError`` into a counted skip
  (``on_error="skip"``) or a one-line ``DataError`` naming the document.

Steps per source (``source_steps``):

=======  ====================================================================================
web      language id; quality heuristics; KenLM perplexity bucket (with ``lm_model``); fastText
         "Wikipedia-reference-like" classifier (with ``classifier_model``)  [CCNet]
c4       language id; C4's line rules, lorem ipsum, curly braces, javascript/policy lines,
         >= 5 sentences; the user's bad words (with ``badwords``)
code     licence (Apache/BSD/MIT from SPDX headers, header comments or licence files); licence
         header stripped; line lengths, alphanumeric share, generated files
wiki     wikitext to text (mwparserfromhell)
books    (none: book-level near dedup only)
arxiv    comments stripped, macros expanded, before the first section and the bibliography dropped
qa       HTML to text, question first, answers by score
=======  ====================================================================================
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Dict, List, Optional, Sequence

from megallama.data.steps.base import Step, StepError, StepsConfig
from megallama.data.steps.readers import read_documents
from megallama.errors import ConfigError, DataError

SOURCES = ("web", "c4", "code", "wiki", "books", "arxiv", "qa")

__all__ = ["SOURCES", "Step", "StepError", "StepsConfig", "source_steps", "read_documents", "run_steps"]


def source_steps(source: str, cfg: StepsConfig) -> List[Step]:
    """The document-local steps of ``source``, in order (model files checked now, loaded lazily)."""
    cfg.check()
    any_language = "any" in [lang.lower() for lang in cfg.languages]
    if source == "web":
        from megallama.data.steps.classifier import ClassifierFilter
        from megallama.data.steps.langid import LanguageFilter
        from megallama.data.steps.lm_filter import PerplexityFilter
        from megallama.data.steps.web import web_rules

        steps: List[Step] = [] if any_language else [LanguageFilter(cfg)]
        steps += web_rules(cfg)
        if cfg.lm_model is not None:
            steps.append(PerplexityFilter(cfg))
        if cfg.classifier_model is not None:
            steps.append(ClassifierFilter(cfg))
        return steps
    if source == "c4":
        from megallama.data.steps.c4 import c4_steps
        from megallama.data.steps.langid import LanguageFilter

        return ([] if any_language else [LanguageFilter(cfg)]) + c4_steps(cfg)
    if source == "code":
        from megallama.data.steps.code import code_steps

        return code_steps(cfg)
    if source == "wiki":
        from megallama.data.steps.wiki import WikiMarkup, _mw

        _mw()  # the package is there, before any document
        return [WikiMarkup()]
    if source == "books":
        return []
    if source == "arxiv":
        from megallama.data.steps.arxiv import ArxivClean

        return [ArxivClean()]
    if source == "qa":
        from megallama.data.steps.qa import QAFormat

        return [QAFormat()]
    raise ConfigError(f"--source must be one of {', '.join(SOURCES)}, got '{source}'")


def run_steps(steps: Sequence[Step], doc: Dict[str, Any], removed: Counter, on_error: str = "fail",
              kept: Optional[Counter] = None) -> Optional[Dict[str, Any]]:
    """Apply ``steps`` in order: the surviving document, or None with ``removed[step.name]`` (or
    ``removed["malformed (<step>)"]`` under ``on_error="skip"``) incremented; ``kept[step.name]`` (if
    given) counts the documents each step passed on."""
    for step in steps:
        try:
            out = step(doc)
        except StepError as exc:
            where = doc.get("id") or doc.get("path") or "a document"
            if on_error != "skip":
                raise DataError(f"{where}: {exc}; fix the document or pass --on-error skip to skip and count it") \
                    from None
            removed[f"malformed ({step.name})"] += 1
            return None
        if out is None:
            removed[step.name] += 1
            return None
        if kept is not None:
            kept[step.name] += 1
        doc = out
    return doc
