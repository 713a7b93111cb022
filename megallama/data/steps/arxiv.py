"""ArXiv LaTeX sources as the paper cleans them: comments stripped, macros defined in the document with
``\\newcommand``/``\\renewcommand``/``\\providecommand``/``\\def``/``\\DeclareMathOperator`` expanded inline
(arguments ``#1``..``#9`` and a ``\\newcommand`` optional first argument included), everything before the
first ``\\section`` (or ``\\chapter``) dropped, and the bibliography removed.  A document with no section is
dropped.  Unbalanced braces in a definition or a macro argument, a missing argument, or a macro that
expands forever are malformed LaTeX: :class:`StepError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from megallama.data.steps.base import Step, StepError, with_text

_COMMENT = re.compile(r"(?<!\\)((?:\\\\)*)%.*")
_COMMENT_ENV = re.compile(r"\\begin\{comment\}.*?\\end\{comment\}", re.DOTALL)
_DEFINITION = re.compile(r"\\(?:(?:re|provide)?newcommand\*?|def(?![A-Za-z@])|DeclareMathOperator\*?)")
_NAME = re.compile(r"\\([A-Za-z@]+|.)")
_SECTION = re.compile(r"\\(?:section|chapter)\*?\s*[\[{]")
_BIBLIOGRAPHY = (re.compile(r"\\begin\{thebibliography\}.*?\\end\{thebibliography\}", re.DOTALL),
                 re.compile(r"\\(?:bibliography|bibliographystyle|addbibresource)\s*\{[^}]*\}"),
                 re.compile(r"\\printbibliography(?:\[[^\]]*\])?"))
_END_DOCUMENT = re.compile(r"\\end\{document\}.*", re.DOTALL)
MAX_PASSES = 32


def strip_comments(tex: str) -> str:
    """Remove ``%`` comments (not ``\\%``), whole comment lines, and comment environments."""
    out = []
    for line in tex.splitlines(keepends=True):
        if line.lstrip().startswith("%"):
            continue
        out.append(_COMMENT.sub(lambda m: m.group(1), line.rstrip("\n")) + ("\n" if line.endswith("\n") else ""))
    return _COMMENT_ENV.sub("", "".join(out))


def _group(tex: str, i: int, what: str) -> Tuple[str, int]:
    """The content of the brace group opening at ``tex[i]`` and the index after it."""
    assert tex[i] == "{"
    depth, j = 0, i
    while j < len(tex):
        c = tex[j]
        if c == "\\":
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return tex[i + 1:j], j + 1
        j += 1
    raise StepError(f"malformed LaTeX: unbalanced braces in {what} at character {i}")


def _skip_space(tex: str, i: int) -> int:
    while i < len(tex) and tex[i] in " \t\n":
        i += 1
    return i


def _bracket(tex: str, i: int, what: str) -> Tuple[str, int]:
    end = tex.find("]", i)
    if end < 0:
        raise StepError(f"malformed LaTeX: an unclosed '[' in {what} at character {i}")
    return tex[i + 1:end], end + 1


@dataclass(frozen=True)
class Macro:
    body: str
    nargs: int = 0
    default: Optional[str] = None  # \newcommand's optional first argument


def _parse_definition(tex: str, m: re.Match) -> Tuple[str, Macro, int]:
    """The macro a definition at ``m`` defines and the index after the definition."""
    kind, i = m.group(0), _skip_space(tex, m.end())
    if i < len(tex) and tex[i] == "{":
        inner, i = _group(tex, i, f"a {kind} name")
        name = _NAME.fullmatch(inner.strip())
    else:
        name = _NAME.match(tex, i)
        i = name.end() if name else i
    if not name:
        raise StepError(f"malformed LaTeX: {kind} at character {m.start()} names no macro")
    name_s, nargs, default = name.group(1), 0, None
    what = f"the definition of \\{name_s}"
    i = _skip_space(tex, i)
    if kind.startswith("\\def"):
        params = re.compile(r"(?:#\d)*").match(tex, i)
        nargs, i = len(params.group(0)) // 2, params.end()
    elif "newcommand" in kind:
        if i < len(tex) and tex[i] == "[":
            n, i = _bracket(tex, i, what)
            if not n.strip().isdigit():
                raise StepError(f"malformed LaTeX: {what} has argument count '[{n}]', not a number")
            nargs, i = int(n), _skip_space(tex, i)
            if i < len(tex) and tex[i] == "[":
                default, i = _bracket(tex, i, what)
                i = _skip_space(tex, i)
    if i >= len(tex) or tex[i] != "{":
        raise StepError(f"malformed LaTeX: {what} at character {m.start()} has no {{body}}")
    body, i = _group(tex, i, what)
    if kind.startswith("\\DeclareMathOperator"):
        body = "\\operatorname{" + body + "}"
    return name_s, Macro(body, nargs, default), i


def collect_macros(tex: str) -> Tuple[str, Dict[str, Macro]]:
    """The text without its macro definitions, and the macros (a later definition wins)."""
    macros: Dict[str, Macro] = {}
    out, pos = [], 0
    for m in _DEFINITION.finditer(tex):
        if m.start() < pos:
            continue  # inside a definition already consumed
        name, macro, end = _parse_definition(tex, m)
        macros[name] = macro
        out.append(tex[pos:m.start()])
        pos = end
    out.append(tex[pos:])
    return "".join(out), macros


def _argument(tex: str, i: int, what: str) -> Tuple[str, int]:
    i = _skip_space(tex, i)
    if i >= len(tex):
        raise StepError(f"malformed LaTeX: {what} is missing an argument at the end of the document")
    if tex[i] == "{":
        return _group(tex, i, what)
    if tex[i] == "\\":
        m = _NAME.match(tex, i)
        return m.group(0), m.end()
    if tex[i] == "}":
        raise StepError(f"malformed LaTeX: {what} is missing an argument at character {i}")
    return tex[i], i + 1


def _substitute(body: str, args: List[str]) -> str:
    return re.sub(r"#(\d)", lambda m: args[int(m.group(1)) - 1] if 0 < int(m.group(1)) <= len(args) else m.group(0),
                  body)


def expand_macros(tex: str, macros: Dict[str, Macro]) -> str:
    """Replace each use of a macro by its body, arguments substituted, until none is left."""
    if not macros:
        return tex
    names = sorted(macros, key=len, reverse=True)
    pattern = re.compile(r"\\(" + "|".join(re.escape(n) for n in names) + r")(?![A-Za-z@])")
    for _ in range(MAX_PASSES):
        out, pos, changed = [], 0, False
        for m in pattern.finditer(tex):
            if m.start() < pos:
                continue
            if m.start() > 0 and tex[m.start() - 1] == "\\" and (m.start() < 2 or tex[m.start() - 2] != "\\"):
                continue  # "\\name": a line break "\\" followed by the word "name", not the macro
            name = m.group(1)
            macro, i, what = macros[name], m.end(), f"the macro \\{name}"
            args: List[str] = []
            if macro.default is not None:
                j = _skip_space(tex, i)
                if j < len(tex) and tex[j] == "[":
                    opt, i = _bracket(tex, j, what)
                    args.append(opt)
                else:
                    args.append(macro.default)
            while len(args) < macro.nargs:
                arg, i = _argument(tex, i, what)
                args.append(arg)
            out.append(tex[pos:m.start()])
            out.append(_substitute(macro.body, args))
            pos, changed = i, True
        out.append(tex[pos:])
        tex = "".join(out)
        if not changed:
            return tex
    raise StepError(f"malformed LaTeX: a macro still expands after {MAX_PASSES} passes (a recursive definition?)")


def clean_latex(tex: str) -> Optional[str]:
    """The cleaned body of a LaTeX document, or None when it has no section."""
    tex = strip_comments(tex)
    tex, macros = collect_macros(tex)
    m = _SECTION.search(tex)
    if not m:
        return None
    tex = _END_DOCUMENT.sub("", tex[m.start():])
    for pattern in _BIBLIOGRAPHY:
        tex = pattern.sub("", tex)
    tex = expand_macros(tex, macros)
    return re.sub(r"\n[ \t]*\n(?:[ \t]*\n)+", "\n\n", tex).strip() + "\n"


class ArxivClean(Step):
    name = "arxiv: no \\section"

    def __call__(self, doc):
        text = clean_latex(doc["text"])
        return None if text is None else with_text(doc, text)
