"""Web quality heuristics (Gopher-style length and symbol ratios), one step per rule so the report says
which removed what (the one copy: curate.py keeps only line keys and MinHash)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from megallama.data.steps.base import Step, StepsConfig


class WebRule(Step):
    """Drop a document when rule ``name`` holds for it (a rule reads only ``text.split()``)."""

    def __init__(self, name: str, cfg: StepsConfig):
        self.name, self.cfg = name, cfg

    def fails(self, words: List[str], text: str) -> bool:
        cfg = self.cfg
        if self.name == "filter: too short":
            return len(words) < cfg.min_words
        if self.name == "filter: too long":
            return len(words) > cfg.max_words
        if not words:
            return False
        if self.name == "filter: symbol ratio":
            symbols = text.count("#") + text.count("...") + text.count("\u2026")
            return symbols / len(words) > cfg.max_symbol_ratio
        if self.name == "filter: mean word length":
            mean = sum(map(len, words)) / len(words)
            return not cfg.min_mean_word_length <= mean <= cfg.max_mean_word_length
        if self.name == "filter: alphabetic words":
            return sum(any(c.isalpha() for c in w) for w in words) / len(words) < cfg.min_alpha_word_fraction
        raise ValueError(self.name)

    def __call__(self, doc: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        return None if self.fails(doc["text"].split(), doc["text"]) else doc


RULES = ("filter: too short", "filter: too long", "filter: symbol ratio", "filter: mean word length",
         "filter: alphabetic words")


def web_rules(cfg: StepsConfig) -> List[Step]:
    return [WebRule(name, cfg) for name in RULES]
