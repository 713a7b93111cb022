"""GitHub: the licence filter (the paper keeps Apache, BSD and MIT licensed code) and the existing heuristics
(line lengths, alphanumeric share, generated files, licence headers stripped; copied from
``megallama.data.curate`` with the same names and thresholds).

A file's licence is, first match wins:

1. an ``SPDX-License-Identifier:`` expression in its first 30 lines, parsed with ``license-expression``;
2. a licence named in its leading comment block ("Licensed under the Apache License, Version 2.0",
   "GNU General Public License", ...);
3. ``meta.license`` of the document: the repository's licence file found by :func:`read_code` (the
   nearest ``LICENSE``/``COPYING`` up the directory tree) or a ``license`` field of a JSONL line.

An expression is kept when it holds with every allowed licence true and every other false: ``MIT OR
GPL-3.0`` is kept (the MIT branch may be chosen), ``MIT AND GPL-3.0`` is not.  Files with no licence found
are dropped.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Sequence

from megallama.data.steps.base import Step, StepsConfig, with_text

# ----------------------------------------------------------------------------- licence detection

_SPDX = re.compile(r"SPDX-License-Identifier:\s*([^\n*]+?)\s*(?:\*/|-->|$)", re.MULTILINE)

# (SPDX id, phrases that must all appear), most specific first; matched on text with whitespace collapsed.
_LICENSE_TEXTS = (
    ("AGPL-3.0", ("gnu affero general public license",)),
    ("LGPL-3.0", ("gnu lesser general public license", "version 3")),
    ("LGPL-2.1", ("gnu lesser general public license",)),
    ("LGPL-2.0", ("gnu library general public license",)),
    ("GPL-3.0", ("gnu general public license", "version 3")),
    ("GPL-2.0", ("gnu general public license", "version 2")),
    ("GPL-1.0", ("gnu general public license",)),
    ("MPL-2.0", ("mozilla public license", "2.0")),
    ("EPL-2.0", ("eclipse public license", "2.0")),
    ("EPL-1.0", ("eclipse public license",)),
    ("Apache-2.0", ("apache license", "version 2.0")),
    ("Apache-2.0", ("licensed under the apache license",)),
    ("Apache-1.1", ("apache software license", "1.1")),
    ("MIT", ("permission is hereby granted, free of charge, to any person obtaining a copy",)),
    ("MIT", ("mit license",)),
    ("MIT", ("licensed under the mit",)),
    ("BSD-3-Clause", ("redistribution and use in source and binary forms", "neither the name")),
    ("BSD-3-Clause", ("bsd-style license",)),
    ("BSD-3-Clause", ("bsd 3-clause",)),
    ("BSD-2-Clause", ("redistribution and use in source and binary forms",)),
    ("BSD-2-Clause", ("bsd 2-clause",)),
    ("ISC", ("permission to use, copy, modify, and/or distribute this software for any purpose",)),
    ("Unlicense", ("this is free and unencumbered software released into the public domain",)),
    ("CC0-1.0", ("cc0 1.0 universal",)),
)


def license_from_text(text: str) -> Optional[str]:
    """The SPDX id of the licence a licence file or header comment states, or None."""
    m = _SPDX.search(text[:4000])
    if m:
        return m.group(1).strip()
    flat = " ".join(text[:20000].lower().split())
    for spdx, phrases in _LICENSE_TEXTS:
        if all(p in flat for p in phrases):
            return spdx
    return None


_HEADER = re.compile(r"\A(?:[ \t]*(?:#|//|/?\*|\*/|--|;)[^\n]*\n|[ \t]*\n)+")
_DOCSTRING = re.compile(r'\A\s*(?:"""|\'\'\')(.*?)(?:"""|\'\'\')', re.DOTALL)


def header_license(text: str) -> Optional[str]:
    """The licence stated in a file's SPDX line or leading comment block (or module docstring), or None."""
    head = "\n".join(text.splitlines()[:30])
    m = _SPDX.search(head)
    if m:
        return m.group(1).strip()
    body = text[text.find("\n") + 1:] if text.startswith("#!") else text
    block = _HEADER.match(body)
    doc = _DOCSTRING.match(body)
    found = (block.group(0) if block else "") + (doc.group(1) if doc else "")
    return license_from_text(found) if found else None


def _family_match(key: str, allowed: Sequence[str]) -> bool:
    key = key.lower()
    for fam in allowed:
        fam = fam.lower()
        if key == fam or key.startswith(fam + "-") or (fam == "bsd" and key == "0bsd"):
            return True
    return False


def license_allowed(expression: str, allowed: Sequence[str]) -> bool:
    """Whether an SPDX expression can be satisfied using only ``allowed`` licence families."""
    licensing = _spdx_licensing()
    try:
        parsed = licensing.parse(expression, validate=False)
    except Exception:  # ExpressionError, ParseError and friends: an unreadable expression allows nothing
        return False
    if parsed is None:
        return False
    subs = {}
    for symbol in licensing.license_symbols(parsed, unique=True, decompose=False):
        base = getattr(symbol, "license_symbol", symbol)  # "GPL-2.0 WITH Classpath-exception": the licence
        subs[symbol] = licensing.TRUE if _family_match(base.key, allowed) else licensing.FALSE
    return parsed.subs(subs).simplify() == licensing.TRUE


_LICENSING = []


def _spdx_licensing():
    if not _LICENSING:
        from license_expression import get_spdx_licensing

        _LICENSING.append(get_spdx_licensing())
    return _LICENSING[0]


class LicenseFilter(Step):
    name = "licence not allowed"

    def __init__(self, cfg: StepsConfig):
        self.allowed = tuple(cfg.licenses)

    def __call__(self, doc: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        found = header_license(doc["text"]) or (doc.get("meta") or {}).get("license")
        if not found or not license_allowed(found, self.allowed):
            return None
        return with_text(doc, doc["text"], license=found)


# ----------------------------------------------------------------------------- heuristics (from curate.py)

_GENERATED = re.compile(r"(?i)(auto-?generated|do not edit|generated by (?:the )?(?:protoc|swig|cython|thrift))")
_LICENSE_WORDS = re.compile(r"(?i)copyright|licen[cs]e|all rights reserved|spdx-license")


def strip_license_header(text: str) -> str:
    """Remove a leading comment block that is a licence/copyright notice (keeps a shebang line)."""
    shebang = ""
    if text.startswith("#!"):
        end = text.find("\n") + 1 or len(text)
        shebang, text = text[:end], text[end:]
    m = _HEADER.match(text)
    if m and _LICENSE_WORDS.search(m.group(0)):
        text = text[m.end():]
    return shebang + text


class StripLicenseHeader(Step):
    name = "licence header stripped (kept)"

    def __call__(self, doc):
        stripped = strip_license_header(doc["text"])
        return doc if stripped == doc["text"] else with_text(doc, stripped, license_header_stripped=True)


class CodeRule(Step):
    def __init__(self, name: str, cfg: StepsConfig):
        self.name, self.cfg = name, cfg

    def __call__(self, doc):
        text, cfg = doc["text"], self.cfg
        lengths = [len(line) for line in text.splitlines()] or [0]
        if self.name == "filter: max line length":
            bad = max(lengths) > cfg.max_line_length
        elif self.name == "filter: mean line length":
            bad = sum(lengths) / len(lengths) > cfg.max_mean_line_length
        elif self.name == "filter: alphanumeric fraction":
            bad = bool(text) and sum(c.isalnum() for c in text) / len(text) < cfg.min_alnum_fraction
        elif self.name == "filter: boilerplate (generated)":
            bad = bool(_GENERATED.search(text[:2000]))
        else:
            raise ValueError(self.name)
        return None if bad else doc


RULES = ("filter: max line length", "filter: mean line length", "filter: alphanumeric fraction",
         "filter: boilerplate (generated)")


def code_steps(cfg: StepsConfig) -> List[Step]:
    steps: List[Step] = [] if "any" in [x.lower() for x in cfg.licenses] else [LicenseFilter(cfg)]
    return steps + [StripLicenseHeader()] + [CodeRule(name, cfg) for name in RULES]
