"""Loading Hugging Face directories without ever running code that came with them.

A model directory is data.  transformers can import Python files shipped next to the weights when
a config names them (``auto_map``) and the caller trusts remote code; asked interactively it even
prompts on stdin.  Every Hugging Face load in megallama goes through :func:`load_pretrained`,
which refuses such a directory in one line before transformers sees it, and always passes
``trust_remote_code=False`` and ``local_files_only=True`` (nothing is downloaded either).
"""

from __future__ import annotations

import json
import os
from typing import Any

from megallama.errors import CheckpointError

# keys by which a config asks transformers to import code from the directory (or the Hub)
REMOTE_CODE_KEYS = ("auto_map", "custom_pipelines")


def _configs(path: str) -> list[str]:
    """The JSON files transformers reads from a model directory (every top-level ``*.json``)."""
    return sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".json"))


def check_no_remote_code(path) -> None:
    """Refuse (one line, :class:`CheckpointError`) a directory whose configs ask for custom code.

    Also refuses a path that is not a local directory (a Hub name would download) and a config that
    is not a JSON object.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"'{path}' is not a local directory; pass a Hugging Face model directory "
                              "(nothing is downloaded)")
    for f in _configs(path):
        try:
            with open(f, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise CheckpointError(f"'{f}' is not readable JSON ({type(exc).__name__}); "
                                  "download the model's configuration again") from None
        if not isinstance(data, dict):
            if os.path.basename(f) in ("config.json", "tokenizer_config.json", "generation_config.json"):
                raise CheckpointError(f"'{f}' must be a JSON object, got {type(data).__name__}; "
                                      "download the model's configuration again")
            continue
        for key in REMOTE_CODE_KEYS:
            if key in data:
                raise CheckpointError(f"'{f}' has '{key}': this model directory ships its own Python code, "
                                      "which megallama never runs; use a directory of a supported architecture "
                                      "(e.g. LlamaForCausalLM) without custom code")


def load_pretrained(auto_cls: Any, path, **kwargs):
    """``auto_cls.from_pretrained(path, **kwargs)`` with remote code off and nothing downloaded.

    ``auto_cls`` is any transformers class with ``from_pretrained`` (``AutoModelForCausalLM``,
    ``AutoTokenizer``, ``AutoConfig``, ...).  The directory is checked first with
    :func:`check_no_remote_code`; ``trust_remote_code=True`` is refused.
    """
    if kwargs.get("trust_remote_code"):
        raise ValueError("load_pretrained never trusts remote code")
    check_no_remote_code(path)
    kwargs["trust_remote_code"] = False
    kwargs.setdefault("local_files_only", True)
    return auto_cls.from_pretrained(os.fspath(path), **kwargs)
