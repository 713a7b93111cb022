"""The per-source steps of section 2.1 (megallama.data.steps), each on small real-looking inputs."""

import json
import pickle
import subprocess
import sys
from collections import Counter

import pytest

from megallama.data.steps import StepError, StepsConfig, read_documents, run_steps, source_steps
from megallama.errors import DataError, UserError

ENGLISH = """The history of the city goes back to the third century before our era, when a Celtic people settled
on an island in the river. The Romans conquered the area and founded a town with baths, a forum and an
amphitheatre. During the Middle Ages the city became one of the largest in Europe and a centre of learning,
with a university that drew students from many countries. Today it is known for its museums, its
architecture and its role in the history of science and the arts."""

FRENCH = """L'histoire de la ville remonte au troisième siècle avant notre ère, lorsqu'un peuple celte s'installa
sur une île du fleuve. Les Romains conquirent la région et fondèrent une ville avec des thermes, un forum et
un amphithéâtre. Au Moyen Âge, la ville devint l'une des plus grandes d'Europe et un centre du savoir, avec
une université qui attirait des étudiants de nombreux pays. Elle est aujourd'hui connue pour ses musées, son
architecture et son rôle dans l'histoire des sciences et des arts."""


def apply(source, docs, cfg=StepsConfig(), on_error="fail"):
    steps = source_steps(source, cfg)
    removed, kept = Counter(), []
    for d in docs:
        doc = d if isinstance(d, dict) else {"text": d, "id": f"doc{len(kept)}"}
        out = run_steps(steps, doc, removed, on_error)
        if out is not None:
            kept.append(out)
    return kept, removed


# ----------------------------------------------------------------------------- web (CCNet)

def test_language_id_keeps_english_drops_french():
    kept, removed = apply("web", [ENGLISH, FRENCH])
    assert [d["text"] for d in kept] == [ENGLISH]
    assert kept[0]["meta"]["language"] == "en" and kept[0]["meta"]["language_score"] > 0.99
    assert removed == {"language id": 1}
    kept, _ = apply("web", [ENGLISH, FRENCH], StepsConfig(languages=("fr",)))
    assert [d["text"] for d in kept] == [FRENCH]
    kept, _ = apply("web", [ENGLISH, FRENCH], StepsConfig(languages=("any",)))
    assert len(kept) == 2


def test_fasttext_language_model_when_given(tmp_path):
    """A fastText model given with --lid-model is used (its labels __label__xx), not langid.py's."""
    import fasttext

    train = tmp_path / "lid.txt"
    lines = [f"__label__en {s}" for s in ENGLISH.lower().replace(",", "").split(". ")] * 20
    lines += [f"__label__fr {s}" for s in FRENCH.lower().replace(",", "").split(". ")] * 20
    train.write_text("\n".join(lines) + "\n")
    model = fasttext.train_supervised(str(train), epoch=10, minn=2, maxn=4, seed=1, thread=1, verbose=0)
    model.save_model(str(tmp_path / "lid.bin"))
    cfg = StepsConfig(lid_model=str(tmp_path / "lid.bin"), languages=("fr",))
    kept, removed = apply("web", [ENGLISH, FRENCH], cfg)
    assert [d["text"] for d in kept] == [FRENCH] and kept[0]["meta"]["language"] == "fr"
    assert removed == {"language id": 1}


# Hand-written bigram ARPA: log10 probabilities and backoffs
ARPA = """
\\data\\
ngram 1=8
ngram 2=6

\\1-grams:
-1.5\t<unk>\t0
-99\t<s>\t-0.5
-1.0\t</s>\t0
-0.6\tthe\t-0.3
-1.1\tcat\t-0.2
-1.2\tsat\t-0.25
-1.3\ton\t-0.2
-1.4\tmat\t-0.1

\\2-grams:
-0.3\t<s> the
-0.4\tthe cat
-0.2\tcat sat
-0.25\tsat on
-0.15\ton the
-0.5\tmat </s>

\\end\\
"""


def arpa_perplexity(lines):
    """Independent reference: bigram backoff scoring of whitespace tokens with <s> and </s>."""
    uni, bi = {}, {}
    for row in ARPA.split("\\1-grams:")[1].split("\\2-grams:")[0].strip().splitlines():
        p, w, b = row.split("\t")
        uni[w] = (float(p), float(b))
    for row in ARPA.split("\\2-grams:")[1].split("\\end\\")[0].strip().splitlines():
        p, words = row.split("\t")
        bi[tuple(words.split())] = float(p)
    total, n = 0.0, 0
    for line in lines:
        words = line.lower().split()
        prev = "<s>"
        for w in words + ["</s>"]:
            w = w if w in uni else "<unk>"
            total += bi[(prev, w)] if (prev, w) in bi else uni[prev][1] + uni[w][0]
            prev = w
        n += len(words) + 1
    return 10 ** (-total / n)


def test_kenlm_perplexity_matches_arpa_and_buckets(tmp_path):
    arpa = tmp_path / "tiny.arpa"
    arpa.write_text(ARPA)
    good, odd, bad = "The cat sat on the mat", "the mat sat\nOn the cat", "zebra quantum mat cat"
    refs = [arpa_perplexity(t.splitlines()) for t in (good, odd, bad)]
    assert refs[0] < refs[1] < refs[2]
    head, middle = (refs[0] + refs[1]) / 2, (refs[1] + refs[2]) / 2
    loose = dict(languages=("any",), min_words=1, min_mean_word_length=1)  # only the LM decides here
    cfg = StepsConfig(lm_model=str(arpa), lm_cutoffs=(head, middle), **loose)
    steps = source_steps("web", cfg)
    lm = steps[-1]
    assert lm.name == "perplexity (KenLM)"
    for text, ref in zip((good, odd, bad), refs):
        assert lm.perplexity(text) == pytest.approx(ref, rel=1e-4, abs=0.06)  # CCNet rounds to 0.1
    kept, removed = apply("web", [good, odd, bad], cfg)
    assert [(d["text"], d["meta"]["bucket"]) for d in kept] == [(good, "head"), (odd, "middle")]
    assert removed == {"perplexity (KenLM)": 1}
    kept, _ = apply("web", [good, odd, bad], StepsConfig(lm_model=str(arpa), lm_cutoffs=(head, middle),
                                                          lm_buckets=("head",), **loose))
    assert [d["text"] for d in kept] == [good]


def test_kenlm_normalises_like_ccnet():
    from megallama.data.steps.lm_filter import normalize_line

    assert normalize_line("  Café 1984 «Été» ’s…  ") == "cafe 0000 \"ete\" 's..."


def _spam(rng, n=40):
    words = "buy cheap pills now click here free casino bonus win money fast deal offer discount".split()
    return " ".join(rng.choice(words) for _ in range(n))


ENCYCLOPEDIC = set("the history of the city was studied by historians in the century university treaty "
                   "population river architecture published journal research museum".split())


def _encyclopedic(rng, n=40):
    return " ".join(rng.choice(sorted(ENCYCLOPEDIC)) for _ in range(n))


def test_train_classifier_command_and_filter(tmp_path):
    import random

    rng = random.Random(0)
    pos, neg = tmp_path / "refs.jsonl", tmp_path / "random.jsonl"
    pos.write_text("".join(json.dumps({"text": _encyclopedic(rng)}) + "\n" for _ in range(150)))
    neg.write_text("".join(json.dumps({"text": _spam(rng)}) + "\n" for _ in range(150)))
    out = tmp_path / "quality.bin"
    cmd = [sys.executable, "-m", "megallama", "train-classifier", "--positive", str(pos), "--negative", str(neg),
           "--output", str(out), "--epoch", "20"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "from 150 positive and 150 negative documents; held-out accuracy 1.000" in r.stdout
    first = out.read_bytes()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "already exists; pass --force" in again.stderr
    forced = subprocess.run(cmd + ["--force"], capture_output=True, text=True, timeout=120)
    assert forced.returncode == 0 and out.read_bytes() == first  # one thread, one seed: the same model
    cfg = StepsConfig(languages=("any",), classifier_model=str(out), classifier_threshold=0.5, min_words=10)
    kept, removed = apply("web", [_encyclopedic(rng), _spam(rng)], cfg)
    assert len(kept) == 1 and set(kept[0]["text"].split()) <= ENCYCLOPEDIC
    assert kept[0]["meta"]["classifier_score"] > 0.9
    assert removed == {"quality classifier (fastText)": 1}


# ----------------------------------------------------------------------------- C4

C4_PAGE = """Home | About | Contact
Welcome to our bakery in the old town.
We bake fresh bread every morning before six o'clock.[1] Our rye loaf won a prize in 2019.
Please enable JavaScript to view the opening hours.
This site uses cookies to improve your experience.
Ok.
Read more...
Our pastry chef trained in Lyon for ten years. She makes croissants, tarts and eclairs.
Visit us on Saturdays for the farmers' market!"""


def test_c4_rules():
    kept, removed = apply("c4", [C4_PAGE], StepsConfig(languages=("any",)))
    assert kept[0]["text"] == (
        "Welcome to our bakery in the old town.\n"
        "We bake fresh bread every morning before six o'clock. Our rye loaf won a prize in 2019.\n"
        "Our pastry chef trained in Lyon for ten years. She makes croissants, tarts and eclairs.\n"
        "Visit us on Saturdays for the farmers' market!")
    lorem = C4_PAGE + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit."
    code = C4_PAGE + "\nfunction f() { return document.cookie; }."
    brace_dropped_line = C4_PAGE + "\nvar x = {a: 1}"  # no terminal punctuation: the line goes, the page stays
    short = "One sentence here is fine.\nAnd a second one too."
    kept, removed = apply("c4", [lorem, code, brace_dropped_line, short], StepsConfig(languages=("any",)))
    assert [d["text"] for d in kept] == [apply("c4", [C4_PAGE], StepsConfig(languages=("any",)))[0][0]["text"]]
    assert removed == {"c4: lorem ipsum": 1, "c4: curly braces": 1, "c4: too few sentences": 1}


def test_c4_language_and_badwords(tmp_path):
    words = tmp_path / "badwords.txt"
    words.write_text("rye loaf\ncroissant\n")
    english = (ENGLISH + " It has about two million inhabitants.").replace("\n", " ").replace(". ", ".\n")
    kept, removed = apply("c4", [C4_PAGE, english, FRENCH.replace("\n", " ").replace(". ", ".\n")],
                          StepsConfig(badwords=str(words)))
    # "croissants" is not the listed word "croissant"; "rye loaf" is listed
    assert [d["text"] for d in kept] == [english]
    assert removed == {"c4: bad words": 1, "language id": 1}


# ----------------------------------------------------------------------------- GitHub

MIT = """MIT License

Copyright (c) 2021 Example

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and associated
documentation files (the "Software"), to deal in the Software without restriction..."""
GPL = """                    GNU GENERAL PUBLIC LICENSE
                       Version 3, 29 June 2007
 Copyright (C) 2007 Free Software Foundation, Inc. <https://fsf.org/>"""
PY = "def area(r):\n    return 3.14159 * r * r\n\n\nprint(area(2.0))\n"


def test_code_licences_from_files_and_headers(tmp_path):
    mit, gpl, none = tmp_path / "mit_repo", tmp_path / "gpl_repo", tmp_path / "no_licence"
    (mit / "src" / "sub").mkdir(parents=True)
    gpl.mkdir()
    none.mkdir()
    (mit / "LICENSE").write_text(MIT)
    (mit / "src" / "geometry.py").write_text(PY)
    (mit / "src" / "sub" / "gpl_vendored.c").write_text(
        "// SPDX-License-Identifier: GPL-2.0-only\nint area(int r) { return 3 * r * r; }\n")
    (mit / "src" / "sub" / "dual.c").write_text(
        "/* SPDX-License-Identifier: MIT OR GPL-2.0-only */\nint twice(int x) { return 2 * x; }\n")
    (mit / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0IHDR")
    (mit / ".git").mkdir()
    (mit / ".git" / "config").write_text("[core]\n")
    (gpl / "COPYING").write_text(GPL)
    (gpl / "tool.py").write_text(PY.replace("area", "volume"))
    (gpl / "apache_file.py").write_text("# Licensed under the Apache License, Version 2.0 (the \"License\");\n"
                                        "# you may not use this file except in compliance with the License.\n" + PY)
    (none / "script.py").write_text(PY.replace("area", "circle"))
    docs = [d for root in (mit, gpl, none) for d in read_documents("code", root)]
    assert [d["path"].replace(str(tmp_path) + "/", "") for d in docs] == [
        "mit_repo/src/geometry.py", "mit_repo/src/sub/dual.c", "mit_repo/src/sub/gpl_vendored.c",
        "gpl_repo/apache_file.py", "gpl_repo/tool.py", "no_licence/script.py"]
    assert [d["meta"]["license"] for d in docs] == ["MIT", "MIT", "MIT", "GPL-3.0", "GPL-3.0", None]
    kept, removed = apply("code", docs)
    assert [d["path"].replace(str(tmp_path) + "/", "") for d in kept] == [
        "mit_repo/src/geometry.py", "mit_repo/src/sub/dual.c", "gpl_repo/apache_file.py"]
    assert [d["meta"]["license"] for d in kept] == ["MIT", "MIT OR GPL-2.0-only", "Apache-2.0"]
    assert kept[2]["text"] == PY  # the licence header stripped after the licence was read from it
    assert removed == {"licence not allowed": 3}
    kept, _ = apply("code", docs, StepsConfig(licenses=("any",)))
    assert len(kept) == 6
    kept, _ = apply("code", docs, StepsConfig(licenses=("gpl",)))
    assert [d["meta"]["license"] for d in kept] == ["MIT OR GPL-2.0-only", "GPL-2.0-only", "GPL-3.0"]


def test_code_jsonl_licence_field_and_heuristics(tmp_path):
    rows = [{"content": PY, "license": "mit", "path": "a.py"},
            {"content": PY.replace("area", "b"), "license": "gpl-3.0", "path": "b.py"},
            {"content": "x = '" + "a" * 2000 + "'\n", "license": "apache-2.0", "path": "long.py"},
            {"content": ("{}[]();:,.<>!?" * 4 + "\n") * 20, "license": "bsd-3-clause", "path": "sym.js"},
            {"content": "# This file is auto-generated. Do not edit.\nx = 1\n", "license": "mit", "path": "gen.py"}]
    f = tmp_path / "code.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept, removed = apply("code", read_documents("code", f))
    assert [d["path"] for d in kept] == ["a.py"]
    assert removed == {"licence not allowed": 1, "filter: max line length": 1, "filter: alphanumeric fraction": 1,
                       "filter: boilerplate (generated)": 1}


# ----------------------------------------------------------------------------- Wikipedia

WIKITEXT = """{{Infobox settlement
| name = Paris
| population = 2,102,650
}}
'''Paris''' is the [[capital city|capital]] and most populous city of [[France]].<ref>{{cite web|url=https://insee.fr|title=Populations}}</ref> It has <!-- check this --> many [[museum]]s &amp; parks.
[[File:Paris Night.jpg|thumb|The city at night]]

== History ==
The [[Parisii]], a sub-tribe of the Celtic Senones, inhabited the area in the 3rd century BC.<ref name="lawrence"/>
{| class="wikitable"
|-
! Year !! Population
|-
| 1801 || 546,856
|}
* Roman era
* [[Middle Ages|Medieval]] period
See also [https://www.paris.fr the official site].

[[Category:Capitals in Europe]]
[[de:Paris]]
"""


def test_wikitext_rendered():
    kept, _ = apply("wiki", [WIKITEXT])
    assert kept[0]["text"] == (
        "Paris is the capital and most populous city of France. It has many museums & parks.\n\n"
        "History\n\n"
        "The Parisii, a sub-tribe of the Celtic Senones, inhabited the area in the 3rd century BC.\n\n"
        "Roman era\nMedieval period\nSee also the official site.")


def test_malformed_documents_fail_or_are_counted():
    broken = "'''Paris''' {{Infobox settlement | name = Paris\nis a city."
    kept, removed = apply("wiki", [WIKITEXT, broken], on_error="skip")
    assert len(kept) == 1 and removed == {"malformed (wiki: empty after markup removal)": 1}
    with pytest.raises(DataError) as exc:
        apply("wiki", [WIKITEXT, {"text": broken, "id": "enwiki.jsonl:7"}])
    msg = str(exc.value)
    assert msg.startswith("enwiki.jsonl:7: malformed wikitext: an unmatched '{{'") and "--on-error skip" in msg
    assert "\n" not in msg
    with pytest.raises(DataError, match=r"^p.tex: malformed LaTeX: unbalanced braces in the definition of \\R"):
        apply("arxiv", [{"text": "\\newcommand{\\R}{\\mathbb{R}\n\\section{A} $\\R$", "id": "p.tex"}])
    with pytest.raises(DataError, match="q.jsonl:3: malformed QA record: answer 0 score 'many' is not a number"):
        apply("qa", [{"text": "", "id": "q.jsonl:3",
                      "meta": {"question": "<p>Why?</p>", "answers": [{"score": "many", "text": "x"}]}}])


# ----------------------------------------------------------------------------- ArXiv

PAPER = r"""\documentclass{article}
\usepackage{amsmath}
% the preamble: macros
\newcommand{\R}{\mathbb{R}}
\newcommand{\norm}[1]{\left\| #1 \right\|}
\newcommand{\pair}[2][x]{(#1, #2)}
\def\eps{\varepsilon}
\def\inner#1#2{\langle #1, #2 \rangle}
\DeclareMathOperator{\Tr}{Tr}
\title{Bounds on norms}
\begin{document}
\maketitle
\begin{abstract}We bound norms.\end{abstract}
\section{Introduction}
Let $x \in \R^n$ with $\norm{x} \le \eps$. % TODO cite
We pay 5\% of $\pair{y}$ and $\pair[z]{w}$; $\inner{a}{\R}$ and $\Tr A$.\\eps stays a word.
\begin{comment}
An old paragraph.
\end{comment}
\section{Conclusion}
Done \cite{knuth}.
\bibliographystyle{plain}
\bibliography{refs}
\begin{thebibliography}{9}
\bibitem{knuth} D. Knuth. The Art of Computer Programming. 1968.
\end{thebibliography}
\end{document}
"""


def test_arxiv_cleaned_and_macros_expanded():
    kept, removed = apply("arxiv", [PAPER, r"\documentclass{article}\begin{document}No sections.\end{document}"])
    assert kept[0]["text"] == (
        "\\section{Introduction}\n"
        "Let $x \\in \\mathbb{R}^n$ with $\\left\\| x \\right\\| \\le \\varepsilon$. \n"
        "We pay 5\\% of $(x, y)$ and $(z, w)$; $\\langle a, \\mathbb{R} \\rangle$ and $\\operatorname{Tr} A$."
        "\\\\eps stays a word.\n\n"
        "\\section{Conclusion}\n"
        "Done \\cite{knuth}.\n")
    assert removed == {"arxiv: no \\section": 1}


# ----------------------------------------------------------------------------- StackExchange

QUESTION = ("<p>How do I reverse a list in Python?</p>\n<pre><code>x = [1, 2, 3]\nfor i in x:\n    print(i)\n"
            "</code></pre>\n<p>Thanks &amp; regards</p>")
ANSWERS = [{"score": 2, "text": "<p>Use <code>reversed(x)</code>.</p>"},
           {"score": 15, "text": "<p>Use slicing:</p>\n<pre><code>x[::-1]\n</code></pre>"},
           {"score": -1, "text": "<ul>\n<li>write a loop</li>\n<li>append <b>backwards</b></li>\n</ul>"}]
EXPECTED_QA = ("Reversing a list\n\nHow do I reverse a list in Python?\n\nx = [1, 2, 3]\nfor i in x:\n    print(i)\n\n"
               "Thanks & regards\n\nUse slicing:\n\nx[::-1]\n\nUse reversed(x).\n\n- write a loop\n- append backwards")


def test_qa_jsonl_answers_by_score(tmp_path):
    f = tmp_path / "qa.jsonl"
    f.write_text(json.dumps({"title": "Reversing a list", "question": QUESTION, "answers": ANSWERS}) + "\n"
                 + "{not json\n" + json.dumps({"text": "no question"}) + "\n")
    with pytest.raises(DataError, match=r"qa.jsonl:2: not valid JSON; fix it or pass --on-error skip"):
        list(read_documents("qa", f))
    from megallama.data.sources import ReadStats

    stats = ReadStats()
    docs = list(read_documents("qa", f, on_error="skip", stats=stats))
    assert stats.skipped == 2 and stats.skipped_at == [f"{f}:2", f"{f}:3"]
    kept, _ = apply("qa", docs)
    assert kept[0]["text"] == EXPECTED_QA


POSTS = """<?xml version="1.0" encoding="utf-8"?>
<posts>
  <row Id="1" PostTypeId="1" Score="10" Title="Reversing a list" Body="{q}" />
  <row Id="2" PostTypeId="2" ParentId="1" Score="2" Body="{a0}" />
  <row Id="3" PostTypeId="1" Score="1" Title="Unanswered" Body="&lt;p&gt;Anyone?&lt;/p&gt;" />
  <row Id="4" PostTypeId="2" ParentId="1" Score="15" Body="{a1}" />
  <row Id="5" PostTypeId="5" Body="a tag wiki" />
  <row Id="6" PostTypeId="2" ParentId="1" Score="-1" Body="{a2}" />
</posts>
"""


def test_stackexchange_posts_xml(tmp_path):
    from xml.sax.saxutils import quoteattr

    def attr(html):
        return quoteattr(html)[1:-1].replace("\n", "&#xA;")

    f = tmp_path / "Posts.xml"
    f.write_text(POSTS.format(q=attr(QUESTION), a0=attr(ANSWERS[0]["text"]), a1=attr(ANSWERS[1]["text"]),
                              a2=attr(ANSWERS[2]["text"])))
    docs = list(read_documents("qa", f))
    assert [d["id"] for d in docs] == [f"{f}: post 1", f"{f}: post 3"]
    assert [a["score"] for a in docs[0]["meta"]["answers"]] == [2, 15, -1]  # the dump's order; the step sorts
    kept, _ = apply("qa", docs)
    assert [d["text"] for d in kept] == [EXPECTED_QA, "Unanswered\n\nAnyone?"]
    f.write_text(POSTS.split("<row Id=\"3\"")[0] + "<row Id=\"3\" PostTypeId=\"1\" Body=\"unterminated\n")
    with pytest.raises(DataError, match=r"Posts.xml:5: not a readable StackExchange Posts.xml"):
        list(read_documents("qa", f))


# ----------------------------------------------------------------------------- models and pickling

@pytest.mark.parametrize("field,option", [("lid_model", "--lid-model"), ("lm_model", "--lm-model"),
                                          ("classifier_model", "--classifier-model"), ("badwords", "--badwords")])
def test_missing_or_corrupt_model_is_one_line(tmp_path, field, option):
    source = "c4" if field == "badwords" else "web"
    extra = {"lm_cutoffs": (10.0, 20.0)} if field == "lm_model" else {}
    missing = tmp_path / "nope.bin"
    with pytest.raises(UserError) as exc:
        source_steps(source, StepsConfig(**{field: str(missing)}, **extra))
    assert str(exc.value) == f"{option} '{missing}' does not exist (or is not a file); give the path of the model file"
    if field == "badwords":
        return
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"<html>404 Not Found</html>\n")
    with pytest.raises(UserError, match=f"^{option} '{garbage}' is "):
        source_steps(source, StepsConfig(**{field: str(garbage)}, **extra))


def test_truncated_models_fail_when_loaded(tmp_path):
    """Right magic, damaged body: the step's load() (first document, or a worker's start) names the file."""
    import fasttext

    train = tmp_path / "t.txt"
    train.write_text("__label__positive good page\n__label__negative bad page\n" * 5)
    good = tmp_path / "good.bin"
    fasttext.train_supervised(str(train), epoch=1, seed=1, thread=1, verbose=0).save_model(str(good))
    cut = tmp_path / "cut.bin"
    for size in (60, len(good.read_bytes()) - 8):  # in the header; in the last weights
        cut.write_bytes(good.read_bytes()[:size])
        steps = source_steps("web", StepsConfig(languages=("any",), classifier_model=str(cut)))
        with pytest.raises(UserError) as exc:
            steps[-1].load()
        assert str(exc.value).startswith(f"--classifier-model '{cut}' cannot be loaded as a fastText model (")
    arpa = tmp_path / "bad.arpa"
    arpa.write_text(ARPA.replace("ngram 2=6", "ngram 2=9"))  # fewer bigrams than announced
    steps = source_steps("web", StepsConfig(languages=("any",), lm_model=str(arpa), lm_cutoffs=(10.0, 20.0)))
    with pytest.raises(UserError) as exc:
        steps[-1].load()
    assert str(exc.value).startswith(f"--lm-model '{arpa}' cannot be loaded by KenLM (")
    assert "\n" not in str(exc.value)
    nolabel = tmp_path / "lid.bin"
    train.write_text("__label__en hello\n__label__fr bonjour\n" * 5)
    fasttext.train_supervised(str(train), epoch=1, seed=1, thread=1, verbose=0).save_model(str(nolabel))
    steps = source_steps("web", StepsConfig(languages=("any",), classifier_model=str(nolabel)))
    with pytest.raises(UserError, match="has no label __label__positive .* train it with megallama train-classifier"):
        steps[-1].load()


def test_steps_pickle_as_settings(tmp_path):
    words = tmp_path / "bad.txt"
    words.write_text("rye loaf\n")
    for source, cfg in (("web", StepsConfig()), ("c4", StepsConfig(badwords=str(words))), ("code", StepsConfig()),
                        ("wiki", StepsConfig()), ("arxiv", StepsConfig()), ("qa", StepsConfig())):
        steps = source_steps(source, cfg)
        for s in steps:
            s({"text": ENGLISH})  # loads models / compiles patterns in this process
        blob = pickle.dumps(steps)
        assert len(blob) < 20_000, (source, len(blob))  # settings, not models
        again = pickle.loads(blob)
        assert [s.name for s in again] == [s.name for s in steps]
        assert (run_steps(again, {"text": C4_PAGE}, Counter()) is None) == \
            (run_steps(steps, {"text": C4_PAGE}, Counter()) is None)


def test_config_checks():
    from megallama.errors import ConfigError

    with pytest.raises(ConfigError, match="--lm-model needs --lm-cutoffs HEAD MIDDLE"):
        source_steps("web", StepsConfig(lm_model="x.arpa"))
    with pytest.raises(ConfigError, match="--lid-threshold must be in"):
        source_steps("web", StepsConfig(lid_threshold=2))
    with pytest.raises(ConfigError, match="--source must be one of web, c4, code, wiki, books, arxiv, qa"):
        source_steps("news", StepsConfig())


def test_every_step_reachable_from_command_line_values(tmp_path):
    """``megallama curate`` offers each StepsConfig field as --field-name with its metadata help and passes
    the values as the command line gives them (lists of strings, "" for no file): they are converted here
    and every optional step of every source is switched on by a setting alone."""
    import dataclasses

    from megallama.errors import ConfigError

    assert all(f.metadata.get("help") for f in dataclasses.fields(StepsConfig))
    arpa = tmp_path / "tiny.arpa"
    arpa.write_text(ARPA)
    words = tmp_path / "badwords.txt"
    words.write_text("casino\n")
    cfg = StepsConfig(languages=["en", "de"], lid_model="", lm_model=str(arpa), lm_cutoffs=["30", "60.5"],
                      lm_buckets=["head"], badwords=str(words), licenses=["mit"], lm_tokenizer="")
    assert (cfg.languages, cfg.lm_cutoffs, cfg.lm_buckets, cfg.licenses) == (("en", "de"), (30.0, 60.5), ("head",),
                                                                             ("mit",))
    assert cfg.lid_model is None and cfg.lm_tokenizer is None
    assert cfg == StepsConfig(**dataclasses.asdict(cfg))  # a plan file's JSON round trip (tuples as lists)
    names = {s: [step.name for step in source_steps(s, cfg)] for s in ("web", "c4", "code", "wiki", "arxiv", "qa")}
    assert names["web"][0] == "language id" and names["web"][-1] == "perplexity (KenLM)"
    assert names["c4"][0] == "language id" and any("bad words" in n for n in names["c4"]), names["c4"]
    assert names["code"][:2] == ["licence not allowed", "licence header stripped (kept)"]
    assert names["wiki"] and names["arxiv"] and names["qa"]
    assert source_steps("books", cfg) == []
    for bad, match in (({"lm_cutoffs": ["thirty", "60"]}, r"--lm-cutoffs takes two perplexities HEAD MIDDLE, got"),
                       ({"lm_cutoffs": ["30"]}, "--lm-cutoffs takes two perplexities HEAD MIDDLE, got 1"),
                       ({"lm_cutoffs": ["60", "30"]}, "0 < HEAD <= MIDDLE, got 60.0 30.0"),
                       ({"lm_buckets": ["top"]}, "--lm-buckets must name some of head, middle, tail, got top")):
        with pytest.raises(ConfigError, match=match) as info:
            StepsConfig(**bad)
        assert "\n" not in str(info.value)


def test_wikipedia_xml_dump_read_and_rendered(tmp_path):
    import bz2
    from xml.sax.saxutils import escape

    def page(pid, ns, title, text, redirect=""):
        return (f"  <page>\n    <title>{title}</title>\n    <ns>{ns}</ns>\n    <id>{pid}</id>\n{redirect}"
                f"    <revision>\n      <id>9{pid}</id>\n      <contributor><username>Bot</username><id>7</id>"
                f"</contributor>\n      <model>wikitext</model>\n      <text bytes=\"{len(text)}\" xml:space=\"preserve\">"
                f"{escape(text)}</text>\n    </revision>\n  </page>\n")

    dump = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.11/" version="0.11" xml:lang="en">\n'
            "  <siteinfo><sitename>Wikipedia</sitename></siteinfo>\n"
            + page(681159, 0, "Paris", WIKITEXT)
            + page(5, 0, "Lutetia (city)", "#REDIRECT [[Paris]]", '    <redirect title="Paris" />\n')
            + page(22989, 1, "Talk:Paris", "== Population figure ==\nIs the 2,102,650 figure current? ~~~~")
            + "</mediawiki>\n")
    path = tmp_path / "enwiki-pages-articles.xml.bz2"
    path.write_bytes(bz2.compress(dump.encode("utf-8")))
    docs = list(read_documents("wiki", path))
    assert [(d["id"], d["meta"]["title"]) for d in docs] == [(f"{path}: page 681159", "Paris")]
    assert docs[0]["text"] == WIKITEXT
    kept, _ = apply("wiki", docs)
    assert kept[0]["text"].startswith("Paris is the capital and most populous city of France.")
    cut = tmp_path / "cut.xml.bz2"
    cut.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DataError, match=r"^cannot read '.*cut.xml.bz2' .*a truncated \.bz2\?") as info:
        list(read_documents("wiki", cut))
    assert "\n" not in str(info.value)
    broken = tmp_path / "broken.xml"
    broken.write_text(dump.replace("</page>", "</pag>", 1))
    with pytest.raises(DataError, match=r"^.*broken.xml:\d+: not a readable MediaWiki XML dump"):
        list(read_documents("wiki", broken))


def test_lm_cutoffs_command_gives_ccnet_percentiles(tmp_path):
    import numpy as np

    arpa = tmp_path / "tiny.arpa"
    arpa.write_text(ARPA)
    texts = ["The cat sat on the mat", "the mat sat\nOn the cat", "zebra quantum mat cat", "the cat sat", "mat", ""]
    sample = tmp_path / "sample.jsonl"
    sample.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    refs = [round(arpa_perplexity(t.splitlines()), 1) for t in texts[:-1]]  # the empty page has no perplexity
    want = [round(float(v), 1) for v in np.percentile(refs, [30, 60])]
    r = subprocess.run([sys.executable, "-m", "megallama", "lm-cutoffs", "--lm-model", str(arpa), "--input",
                        str(sample)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    head, middle = (float(v) for v in r.stdout.splitlines()[-1].split()[1:])
    assert r.stdout.splitlines()[-1].startswith("--lm-cutoffs ")
    assert (head, middle) == pytest.approx(want, abs=0.11)
    assert "percentiles 30 60 of 5 documents" in r.stdout
    # the printed cutoffs are what curate's filter takes: 30% of the sample in the head, 30% more in the middle
    steps = source_steps("web", StepsConfig(languages=("any",), lm_model=str(arpa), lm_cutoffs=(head, middle),
                                            lm_buckets=("head",), min_words=1, min_mean_word_length=1))
    assert [d["meta"]["bucket"] for d in (run_steps(steps, {"text": t}, Counter()) for t in texts[:-1]) if d] \
        == ["head"] * sum(p < head for p in refs)
    bad = subprocess.run([sys.executable, "-m", "megallama", "lm-cutoffs", "--lm-model", str(tmp_path / "no.arpa"),
                          "--input", str(sample)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no.arpa' does not exist" in bad.stderr


def test_arxiv_source_archives_read_with_inputs_inlined(tmp_path):
    import gzip
    import io
    import tarfile

    from megallama.data.sources import ReadStats

    intro = PAPER[PAPER.index(r"\section{Introduction}"):PAPER.index(r"\section{Conclusion}")]
    conclusion = PAPER[PAPER.index(r"\section{Conclusion}"):PAPER.index(r"\bibliographystyle")]
    main = PAPER.replace(intro, "\\input{sections/intro}\n").replace(conclusion, r"\include{sections/conclusion}")
    main = main.replace("\\input{sections/intro}\n", "\\input{sections/intro}")

    def tarball(name, members):
        path = tmp_path / name
        with tarfile.open(path, "w:gz") as tar:
            for member, data in members.items():
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return path

    paper = tarball("2101.00001.tar.gz", {
        "figures/plot.png": b"\x89PNG\r\n\x1a\n", "notes.tex": b"% old notes, never compiled\nTODO\n",
        "ms.tex": main.encode(), "sections/intro.tex": intro.encode(), "sections/conclusion.tex": conclusion.encode(),
        "refs.bib": b"@book{knuth, title={TAOCP}}\n"})
    docs = list(read_documents("arxiv", paper))
    assert [(d["id"], d["meta"]["main"]) for d in docs] == [(str(paper), "ms.tex")]
    assert docs[0]["text"] == PAPER
    assert [d["text"] for d in apply("arxiv", docs)[0]] == [d["text"] for d in apply("arxiv", [PAPER])[0]]
    single = tmp_path / "2101.00002.gz"  # arXiv ships a one-file paper as a gzipped .tex
    single.write_bytes(gzip.compress(PAPER.encode()))
    assert [d["text"] for d in read_documents("arxiv", single)] == [PAPER]
    nomain = tarball("2101.00003.tar.gz", {"notes.tex": b"no document class here\n"})
    with pytest.raises(DataError, match=r"2101.00003.tar.gz: no .tex file with \\documentclass.*--on-error skip"):
        list(read_documents("arxiv", nomain))
    stats = ReadStats()
    assert list(read_documents("arxiv", nomain, on_error="skip", stats=stats)) == [] and stats.skipped == 1
    cut = tmp_path / "2101.00004.tar.gz"
    cut.write_bytes(paper.read_bytes()[:60])
    with pytest.raises(DataError, match=r"^cannot read '.*2101.00004.tar.gz' .*a truncated archive\?") as info:
        list(read_documents("arxiv", cut))
    assert "\n" not in str(info.value)
