"""StackExchange: HTML to text with the standard library's HTML parser, the question first, then its
answers from the highest score to the lowest (ties keep their input order).

A QA document carries ``meta.question`` (HTML), ``meta.answers`` (a list of ``{"score": n, "text": html}``)
and optionally ``meta.title``, as :func:`megallama.data.steps.readers.read_qa` yields them; a document with
only ``text`` is HTML converted as it is.  Output: the title, the question and each answer separated by
blank lines.  A record of the wrong shape (answers not a list, a score that is not a number, a body that is
not a string) is malformed: :class:`StepError`.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any, Dict, List, Optional

from megallama.data.steps.base import Step, StepError, with_text

_PARAGRAPH = {"p", "pre", "blockquote", "h1", "h2", "h3", "h4", "h5", "h6", "table", "ul", "ol", "dl", "div", "hr"}
_LINE = {"br", "li", "tr", "dt", "dd"}
_SKIP = {"script", "style", "head", "title", "noscript", "template"}


class _TextParser(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: List[str] = []
        self.pre = 0
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in _SKIP:
            self.skip += 1
        elif tag == "pre":
            self.pre += 1
        if tag in _PARAGRAPH:
            self.parts.append("\n\n")
        elif tag in _LINE:
            self.parts.append("\n")
        if tag == "li":
            self.parts.append("- ")
        elif tag == "img":
            alt = dict(attrs).get("alt")
            if alt:
                self.parts.append(alt)

    def handle_startendtag(self, tag, attrs):
        if tag in _LINE or tag in _PARAGRAPH:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in _SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in _PARAGRAPH:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if self.skip:
            return
        if self.pre:
            self.parts.append(data)
            return
        data = re.sub(r"\s+", " ", data)
        if not self.parts or self.parts[-1].endswith("\n"):
            data = data.lstrip(" ")
        self.parts.append(data)


def html_to_text(html: str) -> str:
    """Readable text of an HTML fragment: tags removed, entities decoded, paragraphs and list items on
    their own lines, ``<pre>`` blocks (code) kept verbatim."""
    parser = _TextParser()
    parser.feed(html)
    parser.close()
    lines = [line.rstrip() for line in "".join(parser.parts).split("\n")]
    out: List[str] = []
    for line in lines:
        if not line.strip():
            if out and out[-1] != "":
                out.append("")
            continue
        out.append(line)
    return "\n".join(out).strip("\n")


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            return float(str(value).strip())
        except ValueError:
            raise StepError(f"malformed QA record: {what} score {value!r} is not a number") from None
    return float(value)


def qa_text(question: Any, answers: Any, title: Any = None) -> str:
    if not isinstance(question, str):
        raise StepError(f"malformed QA record: 'question' must be an HTML string, got {type(question).__name__}")
    if not isinstance(answers, list):
        raise StepError(f"malformed QA record: 'answers' must be a list of {{score, text}}, got {type(answers).__name__}")
    scored = []
    for k, answer in enumerate(answers):
        if not isinstance(answer, dict) or not isinstance(answer.get("text"), str):
            raise StepError(f"malformed QA record: answer {k} must be {{\"score\": n, \"text\": html}}")
        scored.append((-_number(answer.get("score", 0), f"answer {k}"), k, answer["text"]))
    scored.sort()
    parts = [title.strip()] if isinstance(title, str) and title.strip() else []
    parts += [html_to_text(question)] + [html_to_text(text) for _, _, text in scored]
    return "\n\n".join(p for p in parts if p)


class QAFormat(Step):
    name = "qa: empty"

    def __call__(self, doc: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        meta = doc.get("meta") or {}
        if "question" in meta:
            text = qa_text(meta["question"], meta.get("answers", []), meta.get("title"))
        else:
            text = html_to_text(doc["text"])
        return with_text(doc, text) if text.strip() else None
