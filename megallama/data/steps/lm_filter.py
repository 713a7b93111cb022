"""KenLM perplexity filter with CCNet's buckets.

Each line is normalised as CCNet does (lower case, accents removed, digits to 0, Unicode punctuation
mapped to ASCII, non-printing characters removed), tokenized with the SentencePiece model the LM was
trained on (``lm_tokenizer``; whitespace words without one), and scored by KenLM with sentence
boundaries; the document's perplexity is ``10 ** (-sum(log10 p) / sum(tokens + 1))`` over its lines.
``perplexity < cutoffs[0]`` is the *head* bucket, ``< cutoffs[1]`` the *middle*, else the *tail*; CCNet
sets the cutoffs at the 30th and 60th percentile of each language's perplexities
(:func:`perplexity_cutoffs`, `megallama lm-cutoffs`).  Buckets not in
``lm_buckets`` are dropped; ``meta.perplexity`` and ``meta.bucket`` are recorded.
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from megallama.data.steps.base import Step, StepsConfig, cached_model, check_model_file, quiet_native, with_text
from megallama.errors import DataError

_DIGITS = re.compile(r"\d")
_NON_PRINTING = re.compile(f"[{''.join(map(chr, list(range(0, 32)) + list(range(127, 160))))}]")
_PUNCT = {
    "，": ",", "。": ". ", "、": ",", "„": '"', "”": '"', "“": '"', "«": '"', "»": '"', "１": '"', "」": '"',
    "「": '"', "《": '"', "》": '"', "´": "'", "∶": ":", "：": ":", "？": "?", "！": "!", "（": "(", "）": ")",
    "；": ";", "–": "-", "—": " - ", "．": ". ", "～": "~", "’": "'", "…": "...", "━": "-", "〈": "<", "〉": ">",
    "【": "[", "】": "]", "％": "%", "►": "-",
}
_PUNCT_RE = re.compile(f"[{''.join(_PUNCT)}]")
KENLM_BINARY_MAGIC = b"mmap lm "


def normalize_line(line: str) -> str:
    """CCNet's ``text_normalizer.normalize`` (accent, case, numbers, punct=1)."""
    line = line.strip()
    if not line:
        return line
    line = line.lower()
    line = "".join(c for c in unicodedata.normalize("NFD", line) if unicodedata.category(c) != "Mn")
    line = _DIGITS.sub("0", line)
    line = _PUNCT_RE.sub(lambda m: _PUNCT[m.group(0)], line)
    return _NON_PRINTING.sub("", line)


def check_kenlm_file(path: str, option: str = "--lm-model") -> None:
    check_model_file(path, option)
    with open(path, "rb") as f:
        head = f.read(4096)
    if not (head.startswith(KENLM_BINARY_MAGIC) or head.lstrip().startswith(b"\\data\\")):
        raise DataError(f"{option} '{path}' is neither an ARPA file (it must start with \\data\\) nor a KenLM "
                        "binary; give the .arpa or the build_binary output")


def _load_kenlm(path: str):
    check_kenlm_file(path)
    try:
        import kenlm
    except ImportError:
        raise DataError("--lm-model needs the kenlm package: pip install kenlm (or pip install -e .[data])") from None
    try:
        model, _ = quiet_native(lambda: kenlm.Model(path))
    except (OSError, RuntimeError, MemoryError) as exc:
        reason = " ".join(str(exc).split())
        reason = reason.split(" threw ", 1)[-1][:200]
        raise DataError(f"--lm-model '{path}' cannot be loaded by KenLM ({reason}); give an intact .arpa or "
                        "KenLM binary") from None
    return model


def _load_sentencepiece(path: str):
    check_model_file(path, "--lm-tokenizer")
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        ok = sp.Load(path)
    except (OSError, RuntimeError) as exc:
        raise DataError(f"--lm-tokenizer '{path}' is not a SentencePiece model ({' '.join(str(exc).split())[:160]}); "
                        "give the .model the LM was trained on") from None
    if not ok:
        raise DataError(f"--lm-tokenizer '{path}' is not a SentencePiece model; give the .model the LM was trained on")
    return sp


class KenLMScorer:
    """CCNet's document perplexity under a KenLM model (and its SentencePiece tokenizer); pickles as paths."""

    def __init__(self, model_path: str, tokenizer_path: Optional[str] = None):
        check_kenlm_file(model_path)
        check_model_file(tokenizer_path, "--lm-tokenizer")
        self.model_path, self.tokenizer_path = model_path, tokenizer_path

    def load(self):
        model = cached_model("kenlm", self.model_path, _load_kenlm)
        sp = cached_model("sentencepiece", self.tokenizer_path, _load_sentencepiece) if self.tokenizer_path else None
        return model, sp

    def perplexity(self, text: str) -> float:
        model, sp = self.load()
        log_score, length = 0.0, 0
        for line in text.splitlines():
            line = normalize_line(line)
            if not line:
                continue
            if sp is not None:
                line = " ".join(sp.EncodeAsPieces(line))
            log_score += model.score(line, bos=True, eos=True)
            length += len(line.split()) + 1
        if length == 0:
            return float("inf")
        return round(10.0 ** (-log_score / length), 1)


def perplexity_cutoffs(scorer: KenLMScorer, texts: Iterable[str],
                       percentiles: Sequence[float] = (30.0, 60.0)) -> Tuple[List[float], int]:
    """CCNet's bucket cutoffs: the given percentiles (numpy's linear interpolation) of the perplexities of a
    sample of one language's documents, and how many documents had a perplexity (an empty one has none)."""
    values = [p for p in (scorer.perplexity(t) for t in texts) if math.isfinite(p)]
    if not values:
        raise DataError("no document of the sample has a line to score; give a sample of real documents")
    return [round(float(v), 1) for v in np.percentile(np.asarray(values), list(percentiles))], len(values)


class PerplexityFilter(KenLMScorer, Step):
    name = "perplexity (KenLM)"

    def __init__(self, cfg: StepsConfig):
        assert cfg.lm_model is not None and len(cfg.lm_cutoffs) == 2
        super().__init__(cfg.lm_model, cfg.lm_tokenizer)
        self.head, self.middle = map(float, cfg.lm_cutoffs)
        self.keep = tuple(cfg.lm_buckets)

    def bucket(self, perplexity: float) -> str:
        return "head" if perplexity < self.head else "middle" if perplexity < self.middle else "tail"

    def __call__(self, doc: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        ppl = self.perplexity(doc["text"])
        bucket = self.bucket(ppl)
        if bucket not in self.keep:
            return None
        return with_text(doc, doc["text"], perplexity=ppl, bucket=bucket)
