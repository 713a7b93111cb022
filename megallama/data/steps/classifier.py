"""The paper's quality classifier (CCNet): a fastText linear model of pages "used as references in Wikipedia"
against random pages, trained by ``megallama train-classifier`` from positive and negative documents; a
page is kept when its probability of the positive label reaches ``classifier_threshold``."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple

from megallama.atomic import committing
from megallama.data.steps.base import Step, StepsConfig, with_text
from megallama.data.steps.langid import check_fasttext_file, fasttext_predict, load_fasttext
from megallama.errors import DataError

POSITIVE, NEGATIVE = "__label__positive", "__label__negative"


def classifier_text(text: str) -> str:
    """What the classifier sees of a document, in training and in filtering alike: lower case, one line."""
    return " ".join(text.lower().split())


class ClassifierFilter(Step):
    name = "quality classifier (fastText)"

    def __init__(self, cfg: StepsConfig):
        assert cfg.classifier_model is not None
        check_fasttext_file(cfg.classifier_model, "--classifier-model")
        self.model_path, self.threshold = cfg.classifier_model, cfg.classifier_threshold

    def load(self):
        model = load_fasttext(self.model_path, "--classifier-model")
        if POSITIVE not in model.get_labels():
            raise DataError(f"--classifier-model '{self.model_path}' has no label {POSITIVE} (its labels: "
                            f"{' '.join(model.get_labels()[:5])}); train it with megallama train-classifier")
        return model

    def score(self, text: str) -> float:
        return dict((label, p) for p, label in fasttext_predict(self.load(), classifier_text(text))).get(POSITIVE, 0.0)

    def __call__(self, doc: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        score = self.score(doc["text"])
        if score < self.threshold:
            return None
        return with_text(doc, doc["text"], classifier_score=round(float(score), 4))


def train_classifier(positive: Iterable[str], negative: Iterable[str], output: Path, *, epoch: int = 5,
                     lr: float = 0.1, word_ngrams: int = 2, dim: int = 100, min_count: int = 1, seed: int = 1,
                     threads: int = 1, valid_fraction: float = 0.1) -> Tuple[int, int, Optional[float]]:
    """Train on labelled lines and write ``output`` (temporary name, renamed when complete); returns
    (positives, negatives, held-out accuracy or None when nothing was held out).  One thread and a fixed
    seed give the same model from the same inputs."""
    import fasttext

    rng = random.Random(seed)
    counts = {POSITIVE: 0, NEGATIVE: 0}
    train_lines, valid = [], []
    with tempfile.TemporaryDirectory(prefix="megallama-classifier-") as tmp:
        train_path = Path(tmp) / "train.txt"
        with open(train_path, "w", encoding="utf-8") as f:
            for label, texts in ((POSITIVE, positive), (NEGATIVE, negative)):
                for text in texts:
                    line = classifier_text(text)
                    if not line:
                        continue
                    counts[label] += 1
                    if rng.random() < valid_fraction:
                        valid.append((label, line))
                    else:
                        f.write(f"{label} {line}\n")
                        train_lines.append(label)
        for label, option in ((POSITIVE, "--positive"), (NEGATIVE, "--negative")):
            if label not in train_lines:
                raise DataError(f"{option} gave no documents to train on; give non-empty .jsonl/.txt inputs")
        model = fasttext.train_supervised(str(train_path), epoch=epoch, lr=lr, wordNgrams=word_ngrams, dim=dim,
                                          minCount=min_count, seed=seed, thread=threads, verbose=0)
        accuracy = None
        if valid:
            right = sum(fasttext_predict(model, line)[0][1] == label for label, line in valid)
            accuracy = right / len(valid)
        with committing(output) as tmp_out:
            model.save_model(str(tmp_out))
    return counts[POSITIVE], counts[NEGATIVE], accuracy
