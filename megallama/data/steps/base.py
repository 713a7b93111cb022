"""The pieces every step shares: the configuration, the Step protocol, the error type and the model cache."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from megallama.errors import ConfigError, DataError

ON_ERROR = ("fail", "skip")
BUCKETS = ("head", "middle", "tail")


class StepError(Exception):
    """One malformed document (wikitext, LaTeX, HTML, a QA record): a counted skip under
    ``on_error="skip"``, else a one-line :class:`DataError` naming the document (see :func:`run_steps`)."""


@dataclass(frozen=True)
class StepsConfig:
    """Settings of the document-local steps; ``"any"`` in ``languages`` or ``licenses`` disables that filter."""

    # language identification (CCNet keeps a document when the top language's probability >= threshold)
    languages: Tuple[str, ...] = ("en",)
    lid_model: Optional[str] = None  # fastText lid.176.bin / .ftz; None: langid.py's model (ships in its package)
    lid_threshold: float = 0.5
    # KenLM perplexity (CCNet): head < cutoffs[0] <= middle < cutoffs[1] <= tail
    lm_model: Optional[str] = None  # .arpa or KenLM binary
    lm_tokenizer: Optional[str] = None  # SentencePiece model the LM was trained on (CCNet); None: whitespace words
    lm_cutoffs: Optional[Tuple[float, float]] = None  # perplexities at CCNet's 30th and 60th percentiles
    lm_buckets: Tuple[str, ...] = ("head", "middle")  # buckets kept
    # "Wikipedia-reference-like" classifier (fastText supervised, `megallama train-classifier`)
    classifier_model: Optional[str] = None
    classifier_threshold: float = 0.5
    # C4
    badwords: Optional[str] = None  # a file with one word or phrase per line
    min_words_per_line: int = 3
    min_sentences: int = 5
    max_word_length: int = 1000
    # GitHub
    licenses: Tuple[str, ...] = ("apache-2.0", "bsd", "mit")
    max_line_length: int = 1000
    max_mean_line_length: float = 100.0
    min_alnum_fraction: float = 0.25
    # web quality heuristics (length and symbol ratios)
    min_words: int = 50
    max_words: int = 100_000
    max_symbol_ratio: float = 0.1
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    min_alpha_word_fraction: float = 0.8
    on_error: str = "fail"

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
        if self.lm_cutoffs is not None:
            head, middle = self.lm_cutoffs
            if not 0 < head <= middle:
                raise ConfigError(f"--lm-cutoffs HEAD MIDDLE must be perplexities with 0 < HEAD <= MIDDLE, "
                                  f"got {head} {middle}")
        if self.lm_model is not None and self.lm_cutoffs is None:
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
