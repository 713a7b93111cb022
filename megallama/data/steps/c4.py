"""C4's own cleaning rules (Raffel et al. 2020, the TensorFlow Datasets ``c4_utils.clean_page`` order),
split into steps so the report counts each:

1. ``c4: lines`` keeps a line (stripped, citation markers ``[1]``/``[edit]``/``[citation needed]`` removed)
   only if it ends in terminal punctuation (``. ? ! "``, not an ellipsis), has at least
   ``min_words_per_line`` words and no word longer than ``max_word_length``; a page with no line left is
   dropped;
2. ``c4: lorem ipsum`` drops a page whose kept lines say "lorem ipsum";
3. ``c4: curly braces`` drops a page whose kept lines hold ``{`` (code);
4. ``c4: javascript / policy lines`` removes lines mentioning "javascript" and cookie/privacy/terms notices;
5. ``c4: too few sentences`` drops a page of fewer than ``min_sentences`` sentences;
6. ``c4: bad words`` (with ``badwords``) drops a page holding a word or phrase of the user's list.

Steps 2 and 3 see the lines step 1 kept, as in C4 (where a page is dropped on such a line before its
javascript/policy check), so the order gives C4's result.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Optional

from megallama.data.steps.base import Step, StepsConfig, check_model_file, with_text
from megallama.errors import DataError

_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]")
_END_MARKS = (".", "?", "!", '"')
_ELLIPSIS = "..."
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[^\sa-z])")  # not before a lower-case word ("e.g. this")


def sentences(line: str) -> List[str]:
    """Sentences of a line: split after ``. ! ?`` (and closing quotes/brackets), a space, and a word that does
    not start in lower case (C4 counted with NLTK's punkt tokenizer; this is a regular-expression stand-in)."""
    return [s for s in _SENTENCE_END.split(line.strip()) if s.strip()]


class C4Lines(Step):
    name = "c4: lines"

    def __init__(self, cfg: StepsConfig):
        self.min_words, self.max_word = cfg.min_words_per_line, cfg.max_word_length

    def keep(self, line: str) -> Optional[str]:
        line = line.strip()
        if any(len(w) > self.max_word for w in line.split()):
            return None
        line = _CITATION.sub("", line)
        if not line.endswith(_END_MARKS) or line.endswith(_ELLIPSIS):
            return None
        if len(line.split()) < self.min_words:
            return None
        return line

    def __call__(self, doc):
        kept = [line for line in map(self.keep, doc["text"].splitlines()) if line is not None]
        return with_text(doc, "\n".join(kept)) if kept else None


class C4PageRule(Step):
    def __init__(self, name: str, needle: str, lower: bool):
        self.name, self.needle, self.lower = name, needle, lower

    def __call__(self, doc):
        text = doc["text"].lower() if self.lower else doc["text"]
        return None if self.needle in text else doc


class C4NoticeLines(Step):
    name = "c4: javascript / policy lines"

    def __call__(self, doc):
        kept = [line for line in doc["text"].splitlines()
                if "javascript" not in line.lower() and not any(p in line.lower() for p in _POLICY)]
        return with_text(doc, "\n".join(kept)) if kept else None


class C4Sentences(Step):
    name = "c4: too few sentences"

    def __init__(self, cfg: StepsConfig):
        self.min_sentences = cfg.min_sentences

    def __call__(self, doc):
        n = sum(len(sentences(line)) for line in doc["text"].splitlines())
        return doc if n >= self.min_sentences else None


def read_badwords(path: str) -> List[str]:
    check_model_file(path, "--badwords")
    try:
        words = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"--badwords '{path}' is not UTF-8 text (byte {exc.start}); give a text file with one "
                        "word or phrase per line") from None
    words = sorted({w.strip().lower() for w in words if w.strip()})
    if not words:
        raise DataError(f"--badwords '{path}' holds no words; give a file with one word or phrase per line")
    return words


class C4BadWords(Step):
    """C4's ``badwords_filter``: a page holding a listed word or phrase, between non-word characters, is dropped."""

    name = "c4: bad words"

    def __init__(self, cfg: StepsConfig):
        assert cfg.badwords is not None
        words = read_badwords(cfg.badwords)
        self.pattern = r"(?:\W|^)(" + "|".join(re.escape(w) for w in words) + r")(?:\W|$)"
        self._regex = None

    def __call__(self, doc: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        if self._regex is None:
            self._regex = re.compile(self.pattern)
        return None if self._regex.search(doc["text"].lower()) else doc

    def __getstate__(self):
        return {"pattern": self.pattern, "_regex": None}


def c4_steps(cfg: StepsConfig) -> List[Step]:
    steps: List[Step] = [C4Lines(cfg), C4PageRule("c4: lorem ipsum", "lorem ipsum", True),
                         C4PageRule("c4: curly braces", "{", False), C4NoticeLines(), C4Sentences(cfg)]
    if cfg.badwords is not None:
        steps.append(C4BadWords(cfg))
    return steps
