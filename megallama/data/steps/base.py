"""The pieces every step shares: the configuration, the Step protocol, the error type and the model cache."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from megallama.errors import ConfigError, DataError

ON_ERROR = ("fail", "skip")
BUCKETS = ("head", "middle", "tail")


class StepError(Exception):
    """One malformed document (wikitext, LaTeX, HTML, a QA record): a counted skip under
    ``on_error="skip"``, else a one-line :class:`DataError` naming the document (see :func:`run_steps`)."""


def _opt(default: Any, help: str) -> Any:
    """A setting with its command-line help: ``megallama curate`` makes one ``--option`` per field from it."""
    return field(default=default, metadata={"help": help})


_PATHS = ("lid_model", "lm_model", "lm_tokenizer", "classifier_model", "badwords")
_TUPLES = ("languages", "lm_buckets", "licenses")


@dataclass(frozen=True)
class StepsConfig:
    """Settings of the document-local steps; ``"any"`` in ``languages`` or ``licenses`` disables that filter.

    The one place these settings are named: ``megallama curate`` offers each field as ``--field-name`` (its
    ``metadata["help"]``), and values come in as the command line gives them (strings, lists): they are
    converted and checked here, a bad one a one-line :class:`ConfigError`."""

    # language identification (CCNet keeps a document when the top language's probability >= threshold)
    languages: Tuple[str, ...] = _opt(("en",), "languages kept by language id (web, c4), ISO 639-1 codes; "
                                               "'any' keeps all (default: en)")
    lid_model: Optional[str] = _opt(None, "fastText language-id model (lid.176.bin/.ftz); default: langid.py's "
                                          "model, shipped in its package")
    lid_threshold: float = _opt(0.5, "minimum probability of the top language (default: 0.5)")
    # KenLM perplexity (CCNet): head < cutoffs[0] <= middle < cutoffs[1] <= tail
    lm_model: Optional[str] = _opt(None, "KenLM model (.arpa or binary) of the perplexity filter (web)")
    lm_tokenizer: Optional[str] = _opt(None, "SentencePiece model the KenLM model was trained on "
                                             "(default: whitespace words)")
    lm_cutoffs: Tuple[float, ...] = _opt((), "HEAD MIDDLE: perplexities ending CCNet's head and middle buckets "
                                             "(its 30th and 60th percentiles); needed with --lm-model")
    lm_buckets: Tuple[str, ...] = _opt(("head", "middle"), "perplexity buckets kept, of head middle tail "
                                                           "(default: head middle)")
    # "Wikipedia-reference-like" classifier (fastText supervised, `megallama train-classifier`)
    classifier_model: Optional[str] = _opt(None, "fastText quality classifier from `megallama train-classifier` (web)")
    classifier_threshold: float = _opt(0.5, "minimum probability of the positive label (default: 0.5)")
    # C4
    badwords: Optional[str] = _opt(None, "c4: drop pages holding any of these words (a file, one per line)")
    min_words_per_line: int = _opt(3, "c4: lines with fewer words are dropped (default: 3)")
    min_sentences: int = _opt(5, "c4: pages with fewer sentences are dropped (default: 5)")
    max_word_length: int = _opt(1000, "c4: lines with a longer word are dropped (default: 1000)")
    # GitHub
    licenses: Tuple[str, ...] = _opt(("apache-2.0", "bsd", "mit"), "code: licence families kept; 'any' keeps all "
                                                                   "(default: apache-2.0 bsd mit)")
    max_line_length: int = _opt(1000, "code: files with a longer line are dropped (default: 1000)")
    max_mean_line_length: float = _opt(100.0, "code: files with a longer mean line are dropped (default: 100)")
    min_alnum_fraction: float = _opt(0.25, "code: files with a smaller alphanumeric share are dropped (default: 0.25)")
    # web quality heuristics (length and symbol ratios)
    min_words: int = _opt(50, "web: pages with fewer words are dropped (default: 50)")
    max_words: int = _opt(100_000, "web: pages with more words are dropped (default: 100000)")
    max_symbol_ratio: float = _opt(0.1, "web: most '#' and '...' per word (default: 0.1)")
    min_mean_word_length: float = _opt(3.0, "web: least mean word length (default: 3)")
    max_mean_word_length: float = _opt(10.0, "web: most mean word length (default: 10)")
    min_alpha_word_fraction: float = _opt(0.8, "web: least share of words holding a letter (default: 0.8)")
    on_error: str = _opt("fail", "a malformed document: fail (one-line error) or skip (counted)")

    def __post_init__(self) -> None:
        for name in _PATHS:  # "" is no file (a command line's empty value)
            if getattr(self, name) == "":
                object.__setattr__(self, name, None)
        for name in _TUPLES:
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        try:
            cutoffs = tuple(float(v) for v in (self.lm_cutoffs or ()))
        except (TypeError, ValueError):
            raise ConfigError(f"--lm-cutoffs takes two perplexities HEAD MIDDLE, got {self.lm_cutoffs!r}") from None
        object.__setattr__(self, "lm_cutoffs", cutoffs)
        self.check()

    def check(self) -> None:
        if self.on_error not in ON_ERROR:
            raise ConfigError(f"--on-error must be one of {', '.join(ON_ERROR)}, got '{self.on_error}'")
        if not self.languages:
            raise ConfigError("--languages needs at least one language code (e.g. en), or 'any' to keep all")
        for name in ("lid_threshold", "classifier_threshold"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1], got {value}")
        bad = [b for b in self.lm_buckets if b not in BUCKETS]
        if bad or not self.lm_buckets:
            raise ConfigError(f"--lm-buckets must name some of {', '.join(BUCKETS)}, got {' '.join(self.lm_buckets)}")
        if self.lm_cutoffs:
            if len(self.lm_cutoffs) != 2:
                raise ConfigError(f"--lm-cutoffs takes two perplexities HEAD MIDDLE, got {len(self.lm_cutoffs)}")
            head, middle = self.lm_cutoffs
            if not 0 < head <= middle:
                raise ConfigError(f"--lm-cutoffs HEAD MIDDLE must be perplexities with 0 < HEAD <= MIDDLE, "
                                  f"got {head} {middle}")
        if self.lm_model is not None and not self.lm_cutoffs:
            raise ConfigError("--lm-model needs --lm-cutoffs HEAD MIDDLE: the perplexities that end CCNet's head "
                              "and middle buckets (30th and 60th percentiles of your language's documents)")
        if not self.licenses:
            raise ConfigError("--licenses needs at least one licence (e.g. mit), or 'any' to keep all")


class Step:
    """One document-local step: ``step(doc)`` returns the document (its text possibly changed) or None to
    drop it.  No state is carried from one document to the next; models are loaded lazily, once per process
    (:meth:`load`), and never pickled, so a step ships to worker processes as its settings alone."""

    name: str = "step"

    def __call__(self, doc: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        raise NotImplementedError

    def load(self) -> None:
        """Load the models this step needs now (UserError if one cannot be loaded); a no-op without models."""

    def __repr__(self) -> str:
        return f"<step {self.name}>"


def with_text(doc: Dict[str, Any], text: str, **meta: Any) -> Dict[str, Any]:
    """A copy of ``doc`` with new text (and ``meta`` entries added)."""
    out = dict(doc)
    out["text"] = text
    if meta:
        out["meta"] = {**(doc.get("meta") or {}), **meta}
    return out


# ----------------------------------------------------------------------------- models: once per process

_MODELS: Dict[Tuple[str, str], Any] = {}


def check_model_file(path: Optional[str], option: str) -> None:
    """A one-line error now, before any document, when a model file given on the command line is not there."""
    if path is None:
        return
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{option} '{path}' does not exist (or is not a file); give the path of the model file")
    if not os.access(p, os.R_OK):
        raise DataError(f"{option} '{path}' is not readable; fix its permissions")


def cached_model(kind: str, path: str, load: Callable[[str], Any]) -> Any:
    """``load(path)`` the first time this process asks for ``(kind, path)``; the same object afterwards."""
    key = (kind, path)
    model = _MODELS.get(key)
    if model is None:
        model = _MODELS[key] = load(path)
    return model


def quiet_native(fn: Callable[[], Any]) -> Tuple[Any, str]:
    """Run ``fn`` with file descriptor 2 captured (C++ libraries such as KenLM print progress bars there);
    returns its result and what it printed."""
    with tempfile.TemporaryFile() as capture:
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        try:
            result, error = fn(), None
        except BaseException as exc:  # re-raised below, after fd 2 is back
            result, error = None, exc
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        printed = capture.read().decode("utf-8", "replace")
    if error is not None:
        raise error
    return result, printed
