"""Answer normalisation and metrics: exact match, majority voting, pass@k."""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Optional, Sequence

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse whitespace (the SQuAD/TriviaQA rule)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in answers)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), computed stably."""
    if not 0 < k <= n:
        raise ValueError(f"pass@k needs 0 < k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def majority_vote(answers: Sequence[Optional[str]]) -> Optional[str]:
    """The most frequent non-empty answer, the earliest on ties (maj1@k)."""
    valid = [a for a in answers if a]
    if not valid:
        return None
    counts = Counter(valid)
    best = max(counts.values())
    return next(a for a in valid if counts[a] == best)


_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def _clean_number(text: str) -> str:
    text = text.replace(",", "").strip().rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value == int(value) else str(value)


def gsm8k_answer(text: str) -> Optional[str]:
    """The final number: after '####' (the dataset's format) or the last number in the text."""
    if "####" in text:
        text = text.split("####", 1)[1]
        found = _NUMBER.findall(text)
        return _clean_number(found[0]) if found else None
    found = _NUMBER.findall(text)
    return _clean_number(found[-1]) if found else None


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` (balanced braces), as MATH solutions mark answers."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1: j]
    return None


def math_answer(text: str) -> Optional[str]:
    """A MATH answer for comparison: the boxed (or last '$...$') expression without spaces and $."""
    ans = last_boxed(text)
    if ans is None:
        found = re.findall(r"\$([^$]+)\$", text)
        ans = found[-1] if found else None
    if ans is None:
        return None
    ans = ans.replace(" ", "").replace("\\!", "").replace("dfrac", "frac").replace("tfrac", "frac")
    ans = ans.replace("\\left", "").replace("\\right", "").replace("$", "").rstrip(".")
    return ans


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan
