"""Input checks that run before any process group, directory or file is created.

Everything a user can get wrong about the *files* a run needs (tokenizer, datasets)
is checked here, on every rank, by opening them read-only: a typo costs one line
and exit status 2 instead of a stack trace from 1,000 ranks after the rendezvous.
"""

from __future__ import annotations

from megallama.config import Config


def check_inputs(cfg: Config) -> None:
    """Raise a one-line UserError if a configured tokenizer or dataset is missing or mismatched."""
    from megallama.data.indexed import open_dataset
    from megallama.data.pipeline import _check_config
    from megallama.data.tokenizer import Tokenizer

    _check_config(cfg)
    d = cfg.data
    if not d.sources:
        return  # the default corpus is built (and cached) by the run itself
    tok = Tokenizer(d.tokenizer)
    for s in d.sources:
        open_dataset(s.path).check_tokenizer(tok.vocab_size, tok.fingerprint, d.tokenizer)
