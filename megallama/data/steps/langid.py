"""Language identification (CCNet, the paper: keep English): fastText ``lid.176.bin`` when its path is given,
else the model that ships inside the ``langid`` package (langid.py, 97 languages, works offline)."""

from __future__ import annotations

import os
import struct
from typing import Any, Dict, List, Optional, Tuple

from megallama.data.steps.base import Step, StepsConfig, cached_model, check_model_file, with_text
from megallama.errors import DataError

FASTTEXT_MAGIC = 793712314  # first int32 of every fastText .bin/.ftz model


def _one_line(text: str) -> str:
    return " ".join(text.split())


def check_fasttext_file(path: str, option: str) -> None:
    """Missing, unreadable or not a fastText model: one line naming the file, before any document."""
    check_model_file(path, option)
    with open(path, "rb") as f:
        head = f.read(4)
    if len(head) < 4 or struct.unpack("<i", head)[0] != FASTTEXT_MAGIC:
        raise DataError(f"{option} '{path}' is not a fastText model (wrong magic number); give a .bin/.ftz written "
                        "by fastText")


def load_fasttext(path: str, option: str):
    """A fastText model, once per process; a corrupt file is a one-line DataError naming it."""
    def load(p: str):
        check_fasttext_file(p, option)
        try:
            import fasttext.FastText as ft
        except ImportError:
            raise DataError(f"{option} needs the fasttext package: pip install fasttext-wheel "
                            "(or pip install -e .[data])") from None
        try:
            model = ft._FastText(model_path=p)  # fasttext.load_model without its deprecation warning
        except (ValueError, RuntimeError, MemoryError) as exc:
            raise DataError(f"{option} '{p}' cannot be loaded as a fastText model ({_one_line(str(exc))}); "
                            "give an intact .bin/.ftz") from None
        problem = _fasttext_problem(model, p)
        if problem:
            raise DataError(f"{option} '{p}' cannot be loaded as a fastText model ({problem}); "
                            "give an intact .bin/.ftz")
        return model
    return cached_model("fasttext", path, load)


def _fasttext_problem(model, path: str) -> str:
    """fastText reads a truncated file without complaint: check what it read against the file's size."""
    labels = model.get_labels()
    if not labels or not all(str(label).startswith("__label__") for label in labels):
        return "no labels: truncated, or not a supervised model"
    if model.f.isQuant():
        return ""
    args = model.f.getArgs()
    # fastText's layout: magic, version, 12 int32 + 1 double of arguments, the dictionary header and entries
    # (UTF-8 word, NUL, int64 count, int8 type), then the input (words + hash buckets) and output (labels)
    # float32 matrices, each after a quantisation flag byte and two int64 dimensions
    try:
        words = model.get_words()
    except UnicodeDecodeError:  # a vocabulary that is not UTF-8: its byte lengths are not known here
        return ""
    entries = sum(len(w.encode("utf-8")) + 10 for w in list(words) + list(labels))
    need = 8 + 56 + 28 + entries + 2 * 17 + 4 * args.dim * (len(words) + args.bucket + len(labels))
    size = os.path.getsize(path)
    return f"{size:,} bytes where its header announces {need:,}: truncated" if size < need else ""


def fasttext_predict(model, text: str) -> List[Tuple[float, str]]:
    """All labels with their probabilities, best first.  The C++ predict directly: the Python wrapper's
    ``np.array(copy=False)`` fails under numpy 2."""
    return model.f.predict(_one_line(text) + "\n", -1, 0.0, "strict")


def _load_langid(_path: str):
    try:
        from langid.langid import LanguageIdentifier, model
    except ImportError:
        raise DataError("language identification needs the langid package (pip install langid, or "
                        "pip install -e .[data]), or a fastText model given with --lid-model") from None
    return LanguageIdentifier.from_modelstring(model, norm_probs=True)


class LanguageFilter(Step):
    """Keep a document whose most probable language is in ``cfg.languages`` with probability
    >= ``cfg.lid_threshold``; records ``meta.language`` and ``meta.language_score``."""

    name = "language id"

    def __init__(self, cfg: StepsConfig):
        self.languages = tuple(lang.lower() for lang in cfg.languages)
        self.threshold = cfg.lid_threshold
        self.model_path = cfg.lid_model
        if self.model_path is not None:
            check_fasttext_file(self.model_path, "--lid-model")

    def load(self):
        if self.model_path is not None:
            return load_fasttext(self.model_path, "--lid-model")
        return cached_model("langid", "", _load_langid)

    def identify(self, text: str) -> Tuple[str, float]:
        model = self.load()
        if self.model_path is not None:
            ranked = fasttext_predict(model, text)
            if not ranked:
                return "", 0.0
            prob, label = ranked[0]
            return label.replace("__label__", "", 1), float(prob)
        lang, prob = model.classify(text)
        return lang, float(prob)

    def __call__(self, doc: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        lang, prob = self.identify(doc["text"])
        if "any" not in self.languages and (lang not in self.languages or prob < self.threshold):
            return None
        return with_text(doc, doc["text"], language=lang, language_score=round(prob, 4))
