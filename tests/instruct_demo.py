"""The small instruction set of the finetuning demo and test: "is N even or odd?".

Numbers are written in digits (the tokenizer splits digits), so the answer depends on the
last digit only and a tiny model can learn it from a few hundred examples; the held-out
numbers never occur in training, so the held-out accuracy measures what finetuning taught,
not memorisation.  ``python -m tests.instruct_demo OUT_DIR`` writes:

* ``train.jsonl``: ``{"prompt", "response"}`` lines for ``megallama preprocess-instruct``;
* ``heldout.jsonl``: the held-out split in the same format;
* ``heldout_choice.jsonl``: the held-out split as ``megallama eval --task choice=...`` lines
  (context = the rendered prompt, choices = ["even", "odd"]).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from megallama.data.instruct import render_prompt

ANSWERS = ["even", "odd"]


def parity_example(n: int) -> dict:
    return {"prompt": f"Is {n} even or odd?", "response": ANSWERS[n % 2]}


def write_parity_set(out_dir: str, n_train: int = 800, n_heldout: int = 200, seed: int = 0,
                     template: str = "alpaca") -> dict:
    """Write the three files (see the module docstring); returns their paths."""
    numbers = random.Random(seed).sample(range(10_000), n_train + n_heldout)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.jsonl" for name in ("train", "heldout", "heldout_choice")}
    with open(paths["train"], "w") as f:
        f.writelines(json.dumps(parity_example(n)) + "\n" for n in numbers[:n_train])
    held = numbers[n_train:]
    with open(paths["heldout"], "w") as f:
        f.writelines(json.dumps(parity_example(n)) + "\n" for n in held)
    with open(paths["heldout_choice"], "w") as f:
        for n in held:
            ex = parity_example(n)
            f.write(json.dumps({"context": render_prompt(ex["prompt"], template), "choices": ANSWERS,
                                "gold": ANSWERS.index(ex["response"])}) + "\n")
    return {k: str(v) for k, v in paths.items()}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.instruct_demo OUT_DIR")
    for name, path in write_parity_set(sys.argv[1]).items():
        print(f"{name}: {path}")
