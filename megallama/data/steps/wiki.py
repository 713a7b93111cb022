"""Wikipedia: wikitext to plain text with mwparserfromhell, as the paper says ("removing hyperlinks,
comments and other formatting boilerplate").

Templates (infoboxes, citations), comments, ``<ref>`` footnotes and other invisible tags, tables, and
file/image/category/interlanguage links are removed; a link keeps its visible text (``[[Paris|the
capital]]`` -> ``the capital``), an external link its label, a heading its title, bold/italic its
content; entities are decoded.  Markup the parser could not match (an unclosed ``{{`` or ``[[``) is
malformed wikitext: :class:`StepError`.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional

from megallama.data.steps.base import Step, StepError, with_text
from megallama.errors import DataError

_DROP_TAGS = {"ref", "references", "table", "gallery", "math", "chem", "score", "timeline", "graph", "imagemap",
              "templatedata", "syntaxhighlight", "source", "nowiki", "noinclude", "includeonly", "onlyinclude",
              "categorytree", "mapframe", "maplink", "inputbox", "indicator", "style", "script"}
_BLOCK_TAGS = {"br", "p", "div", "li", "dt", "dd", "blockquote", "center", "hr"}
_DROP_NAMESPACES = {"file", "image", "media", "category", "wikt", "wiktionary", "commons", "special", "template",
                    "help", "portal", "draft", "module", "user", "wikipedia", "wp", "talk"}
_LANGUAGE_PREFIX = re.compile(r"^[a-z]{2,3}(?:-[a-z]{2,8})*$")
_LEFTOVER = re.compile(r"\{\{|\}\}|\[\[|\]\]|\{\|")
_SPACES = re.compile(r"[ \t\u00a0]+")
_BLANKS = re.compile(r"\n\s*\n\s*\n+")


def _mw():
    try:
        import mwparserfromhell
    except ImportError:
        raise DataError("--source wiki needs the mwparserfromhell package: pip install mwparserfromhell "
                        "(or pip install -e .[data])") from None
    return mwparserfromhell


def _render(code, out: List[str]) -> None:
    from mwparserfromhell import nodes

    for node in code.nodes:
        if isinstance(node, nodes.Text):
            out.append(str(node))
        elif isinstance(node, (nodes.Template, nodes.Comment, nodes.Argument)):
            continue
        elif isinstance(node, nodes.HTMLEntity):
            out.append(node.normalize())
        elif isinstance(node, nodes.Heading):
            out.append("\n")
            _render(node.title, out)
            out.append("\n")
        elif isinstance(node, nodes.Wikilink):
            title = str(node.title).strip()
            prefix = title.split(":", 1)[0].strip().lower() if ":" in title and not title.startswith(":") else ""
            if prefix and (prefix in _DROP_NAMESPACES or _LANGUAGE_PREFIX.match(prefix)):
                continue
            if node.text is not None:
                _render(node.text, out)
            else:
                out.append(title.lstrip(":").split("#", 1)[0] if not title.startswith("#") else title[1:])
        elif isinstance(node, nodes.ExternalLink):
            if node.title is not None:
                _render(node.title, out)
            elif not node.brackets:
                continue  # a bare URL
        elif isinstance(node, nodes.Tag):
            tag = str(node.tag).strip().lower()
            if tag in _DROP_TAGS or node.wiki_markup == "{|":
                continue
            if tag in _BLOCK_TAGS and node.wiki_markup is None:  # "*" list items already start a line
                out.append("\n")
            if node.contents is not None and not node.self_closing:
                _render(node.contents, out)
            if tag in _BLOCK_TAGS and tag not in ("li", "dt", "dd", "br", "hr"):
                out.append("\n")
        else:  # an unknown node type: its text, never its markup
            out.append(str(getattr(node, "value", "")))


def wikitext_to_text(wikitext: str) -> str:
    """Plain text of a wikitext page; :class:`StepError` for markup left unmatched."""
    out: List[str] = []
    _render(_mw().parse(wikitext, skip_style_tags=False), out)
    text = "".join(out)
    lines = [_SPACES.sub(" ", line).strip() for line in text.splitlines()]
    text = _BLANKS.sub("\n\n", "\n".join(lines)).strip()
    m = _LEFTOVER.search(text)
    if m:
        raise StepError(f"malformed wikitext: an unmatched '{m.group(0)}' near '{text[max(0, m.start() - 20):m.end() + 20]}'")
    return text


class WikiMarkup(Step):
    name = "wiki: empty after markup removal"

    def __call__(self, doc: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        text = wikitext_to_text(doc["text"])
        return with_text(doc, text) if text else None
