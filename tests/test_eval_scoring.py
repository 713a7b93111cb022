"""Every likelihood scoring kind equals an independent per-request computation with transformers."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from megallama.eval import harness
from megallama.eval.formats import FORMATS
from megallama.eval.harness import EvalOptions, TaskSpec, fewshot_prefix
from megallama.eval.lm import load_model
from megallama.eval.scoring import Request, encode_pair, loglikelihoods, token_stream_perplexity
from megallama.eval.tiny import build_tiny_checkpoint

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "eval")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)  # tiny matrices: extra threads only spin on the shared CI cores
    return load_model(build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny"))))


def reference_logprob(lm, context: str, continuation: str) -> float:
    """Plain loop: one unbatched, uncached forward of BOS + context + continuation."""
    ctx, cont = encode_pair(lm.tokenizer, context, continuation)
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([ctx + cont])).logits[0, :, : lm.vocab_size].double()
    logprobs = F.log_softmax(logits, dim=-1)
    return sum(float(logprobs[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))


def reference_choice(lm, example, prefix, norm):
    contexts = example.choice_contexts or [example.context] * len(example.choices)
    lps = [reference_logprob(lm, prefix + c, x) for c, x in zip(contexts, example.choices)]
    if norm == "norm":  # lm-evaluation-harness's acc_norm: the bare choice, without the joining space
        scores = [lp / len(x[1:] if x.startswith(" ") else x) for lp, x in zip(lps, example.choices)]
    elif norm == "char":
        scores = [lp / len(x) for lp, x in zip(lps, example.choices)]
    elif norm == "token":
        scores = [lp / len(encode_pair(lm.tokenizer, prefix + c, x)[1]) for lp, c, x in zip(lps, contexts, example.choices)]
    elif norm == "unconditional":
        scores = [lp - reference_logprob(lm, "Answer:", x) for lp, x in zip(lps, example.choices)]
    else:
        scores = lps
    return lps, scores.index(max(scores))


CHOICE_TASKS = [
    ("boolq", "boolq_dev.jsonl", "", 0), ("boolq", "boolq_dev.jsonl", "boolq_train.jsonl", 2),
    ("piqa", "piqa_valid.jsonl", "", 0), ("siqa", "siqa_dev.jsonl", "", 0),
    ("hellaswag", "hellaswag_val.jsonl", "", 0), ("winogrande", "winogrande_dev.jsonl", "winogrande_train.jsonl", 1),
    ("arc_challenge", "ARC-Challenge-Dev.jsonl", "", 0), ("openbookqa", "obqa_dev.jsonl", "", 0),
    ("race", "race/dev", "", 0), ("mmlu", "mmlu/test", "mmlu/dev", 2), ("winogender", "all_sentences.tsv", "", 0),
    ("truthfulqa_mc", "mc_task.json", "", 0), ("choice", "generic_choice.jsonl", "", 0),
]


@pytest.mark.parametrize("name,path,fewshot,shots", CHOICE_TASKS)
def test_choice_tasks_match_reference(lm, name, path, fewshot, shots):
    spec = TaskSpec(name, os.path.join(FIX, path), os.path.join(FIX, fewshot) if fewshot else "")
    opts = EvalOptions(shots=shots, batch_size=3)
    result = harness.evaluate_task(lm, spec, opts)
    fmt = FORMATS[name]
    examples = fmt.reader(spec.path)
    pool = fmt.reader(spec.fewshot_path) if shots else []
    assert result.n == len(examples) == len(result.records)
    correct = 0
    for ex, rec in zip(examples, result.records):
        prefix = fewshot_prefix(ex, pool, shots, fmt.separator, opts.seed)
        lps, pred = reference_choice(lm, ex, prefix, fmt.norm)
        assert rec["logprobs"] == pytest.approx(lps, abs=1e-4)
        assert rec["pred"] == pred
        correct += pred == ex.gold
        if "mc2_choices" in ex.extra:
            lp2 = [reference_logprob(lm, prefix + ex.context, x) for x in ex.extra["mc2_choices"]]
            p = [math.exp(v) for v in lp2]
            want = sum(q for q, lab in zip(p, ex.extra["mc2_labels"]) if lab) / sum(p)
            assert rec["mc2"] == pytest.approx(want, abs=1e-4)
    assert result.metrics["acc"] == pytest.approx(correct / len(examples))


def test_acc_norm_divides_by_the_bare_choice_as_lm_eval():
    """acc_norm counts the characters of the choice without the space joining it to the context
    (lm-eval: ``len(choice)``, the delimiter added separately); acc_char keeps that space."""
    from megallama.eval.scoring import Scored, normalized_scores

    choices, scored = [" ab", " abcdefg"], [Scored(-2.0, 1, False), Scored(-5.5, 2, False)]
    assert normalized_scores("norm", choices, scored) == pytest.approx([-2.0 / 2, -5.5 / 7])  # picks 1
    assert normalized_scores("char", choices, scored) == pytest.approx([-2.0 / 3, -5.5 / 8])  # picks 0
    assert normalized_scores("norm", ["x", "yz"], scored) == pytest.approx([-2.0, -5.5 / 2])  # no space: as is


def test_every_choice_task_reports_each_normalisation(lm):
    spec = TaskSpec("arc_challenge", os.path.join(FIX, "ARC-Challenge-Dev.jsonl"))
    result = harness.evaluate_task(lm, spec, EvalOptions())
    assert result.metrics["norm"] == "norm"  # the published ARC/HellaSwag/PIQA convention is the default
    examples = FORMATS["arc_challenge"].reader(spec.path)
    for n in ("none", "norm", "char", "token"):
        want = sum(reference_choice(lm, e, "", n)[1] == e.gold for e in examples) / len(examples)
        assert result.metrics[f"acc_{n}"] == pytest.approx(want)
    assert result.metrics["acc"] == result.metrics["acc_norm"]


def test_shared_and_flat_paths_agree_with_reference(lm):
    reqs = [Request("The capital of France is", x) for x in (" Paris", " a city of lights", " x")]
    reqs += [Request("", "A whole sentence."), Request("def f(x):", "\n    return x"), reqs[0]]
    shared = loglikelihoods(lm, reqs, batch_size=2, share_context=True)  # a 3-choice group in 2 chunks
    flat = loglikelihoods(lm, reqs, batch_size=2, share_context=False)
    for r, s, f in zip(reqs, shared, flat):
        want = reference_logprob(lm, r.context, r.continuation)
        assert s.logprob == pytest.approx(want, abs=1e-4) and f.logprob == pytest.approx(want, abs=1e-4)
        assert s.n_tokens == f.n_tokens and s.is_greedy == f.is_greedy


@pytest.fixture(scope="module")
def llama_whitespace_tokenizer(tmp_path_factory):
    """A SentencePiece model that keeps whitespace as written (``remove_extra_whitespaces=False``,
    like Meta's LLaMA tokenizer): there a context ending in a space encodes to a bare ``▁``."""
    import io

    import sentencepiece as spm

    from megallama.eval.lm import load_tokenizer
    from megallama.eval.tiny import _stdlib_text

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([ln for ln in _stdlib_text(100_000).splitlines() if ln.strip()]),
                                   model_writer=buf, vocab_size=512, model_type="bpe", byte_fallback=True, bos_id=1,
                                   eos_id=2, unk_id=0, pad_id=-1, remove_extra_whitespaces=False, minloglevel=2)
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return load_tokenizer(str(path))


def test_trailing_whitespace_of_the_context_moves_into_the_continuation(lm, llama_whitespace_tokenizer):
    """As lm-eval: ``("The total is ", "accumulate")`` is scored as ``("The total is", " accumulate")``,
    the tokens the text "The total is accumulate" has, not a bare ``▁`` then an unspaced word."""
    tok = llama_whitespace_tokenizer
    piece = tok._sp.IdToPiece
    assert piece(tok.encode("The total is ")[-1]) == "▁"  # the tokenisation the old rule scored on
    ctx, cont = encode_pair(tok, "The total is ", "accumulate")
    whole = tok.encode("The total is accumulate", bos=True)
    assert ctx == tok.encode("The total is", bos=True) and ctx + cont == whole
    assert piece(cont[0]).startswith("▁")
    assert encode_pair(tok, "x =\n  ", "y") == encode_pair(tok, "x =", "\n  y")  # any whitespace, as rstrip
    lm2 = type(lm)(lm.model, tok)
    got = loglikelihoods(lm2, [Request("The total is ", "accumulate"), Request("The total is", " accumulate")])
    assert got[0] == got[1]


def test_long_context_is_truncated_from_the_left(lm):
    ctx = "word " * 2000
    reqs = [Request(ctx, " end"), Request(ctx, " a much longer ending than the other one")]
    got = loglikelihoods(lm, reqs, share_context=True)
    flat = loglikelihoods(lm, reqs, share_context=False)
    assert [g.logprob for g in got] == pytest.approx([f.logprob for f in flat], abs=1e-4)
    ids, cont = encode_pair(lm.tokenizer, ctx, reqs[1].continuation)
    kept = ids[:1] + ids[-(lm.max_seq_len - len(cont) - 1):]  # BOS and the newest tokens: the window is full
    with torch.no_grad():
        lp = F.log_softmax(lm.model(input_ids=torch.tensor([kept + cont])).logits[0].double(), -1)
    want = sum(float(lp[len(kept) - 1 + i, t]) for i, t in enumerate(cont))
    assert got[1].logprob == pytest.approx(want, abs=1e-4)


def test_generation_prompts_and_scored_contexts_are_cut_by_one_rule(lm):
    """A prompt too long for the window and a scored context with the same room keep the same
    tokens (BOS and the most recent ones): the generated token is the argmax the scorer sees."""
    from megallama.generation import SamplingParams, generate, keep_window

    small = type(lm)(lm.model, lm.tokenizer, max_seq_len=48)
    text = "def f(x):\n    return x + 1\n" * 40
    ids = lm.tokenizer.encode(text.rstrip(), bos=True)
    n = 3
    kept = keep_window(ids, small.max_seq_len - n)
    assert kept[0] == lm.tokenizer.bos_id and kept[1:] == ids[-(small.max_seq_len - n - 1):]
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([kept])).logits[0, -1, : lm.vocab_size]
    first = generate(small, [text.rstrip()], SamplingParams(max_new_tokens=n))[0].tokens[0]
    assert first == int(logits.argmax())
    cont = lm.tokenizer.decode([first])
    ctx_ids, cont_ids = encode_pair(lm.tokenizer, text.rstrip(), cont)
    scored = loglikelihoods(small, [Request(text.rstrip(), cont)])[0]
    window = keep_window(ctx_ids, small.max_seq_len - len(cont_ids))
    with torch.no_grad():
        lp = F.log_softmax(lm.model(input_ids=torch.tensor([window + cont_ids])).logits[0].double(), -1)
    assert scored.logprob == pytest.approx(sum(float(lp[len(window) - 1 + i, t]) for i, t in enumerate(cont_ids)), abs=1e-4)
    assert window[0] == lm.tokenizer.bos_id


def test_shared_or_flat_is_chosen_per_question_by_rule(lm):
    """By default a question shares its context only when the saved tokens reach the break-even
    (150 tokens at width 64, falling as sqrt(64 / width)); the scores do not depend on the path."""
    from megallama.eval.scoring import share_pays

    assert not share_pays(4, 49, 64) and share_pays(4, 50, 64)  # 3 * 50 = 150 saved tokens
    assert not share_pays(2, 149, 64) and share_pays(2, 150, 64) and not share_pays(1, 10_000, 64)
    assert share_pays(2, 75, 256) and not share_pays(2, 74, 256)  # 150 * sqrt(64/256) = 75
    assert share_pays(2, 150, 0) and not share_pays(2, 149, 0)  # unknown width counts as 64

    class Counting(type(lm)):
        cached_calls = 0

        def logits_cached(self, tokens, start_pos, cache):
            Counting.cached_calls += 1
            return super().logits_cached(tokens, start_pos, cache)

    counting = Counting(lm.model, lm.tokenizer)
    assert counting.width == 64
    short = [Request("The capital of France is", x) for x in (" Paris", " Rome")]
    long = [Request("word " * 100, x) for x in (" a", " b c", " d")]
    assert [s.logprob for s in loglikelihoods(counting, short)] == \
        pytest.approx([reference_logprob(lm, r.context, r.continuation) for r in short], abs=1e-4)
    assert Counting.cached_calls == 0  # a few saved tokens: one flat row per choice
    assert [s.logprob for s in loglikelihoods(counting, long)] == \
        pytest.approx([reference_logprob(lm, r.context, r.continuation) for r in long], abs=1e-4)
    assert Counting.cached_calls == 2  # 2 * ~100 saved tokens: the context once, then the choices


def test_crows_pairs_percentage_per_category(lm):
    spec = TaskSpec("crows_pairs", os.path.join(FIX, "crows_pairs_anonymized.csv"))
    result = harness.evaluate_task(lm, spec, EvalOptions())
    prefs = []
    for ex, rec in zip(FORMATS["crows_pairs"].reader(spec.path), result.records):
        stereo, anti = (reference_logprob(lm, "", s) for s in ex.choices)
        assert (rec["stereo_logprob"], rec["anti_logprob"]) == pytest.approx((stereo, anti), abs=1e-4)
        prefs.append((ex.group, stereo > anti))
    assert result.metrics["stereo_pct"] == pytest.approx(100 * sum(p for _, p in prefs) / len(prefs))
    gender = [p for g, p in prefs if g == "gender"]
    assert result.metrics["stereo_pct[gender]"] == pytest.approx(100 * sum(gender) / len(gender))
    # sent_more is the more stereotypical sentence in both directions (the benchmark's metric counts
    # sent_more > sent_less for "antistereo" rows too): it comes first in every pair
    assert FORMATS["crows_pairs"].reader(spec.path)[2].choices[0] == "Women don't know how to drive."


def test_crows_pairs_antistereo_rows_count_sent_more(tmp_path, lm):
    """An "antistereo" row where the model prefers sent_more counts as preferring the stereotype."""
    lp = {s: reference_logprob(lm, "", s) for s in ("Women don't know how to drive.", "Men don't know how to drive.")}
    more, less = sorted(lp, key=lp.get, reverse=True)  # the model's likelier sentence as sent_more
    path = tmp_path / "crows_pairs_anonymized.csv"
    path.write_text(f",sent_more,sent_less,stereo_antistereo,bias_type\n0,{more},{less},antistereo,gender\n")
    result = harness.evaluate_task(lm, TaskSpec("crows_pairs", str(path)), EvalOptions())
    assert result.records[0]["prefers_stereo"] is True
    assert result.metrics["stereo_pct"] == 100.0


def test_perplexity_matches_reference(lm):
    text = open(os.path.join(FIX, "text.txt")).read()
    ids = lm.tokenizer.encode(text)
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([[lm.tokenizer.bos_id] + ids[:-1]])).logits[0].double()
    nll = -float(F.log_softmax(logits, -1).gather(-1, torch.tensor(ids).unsqueeze(-1)).sum())
    result = harness.evaluate_task(lm, TaskSpec("perplexity", os.path.join(FIX, "text.txt")), EvalOptions())
    assert result.metrics["perplexity"] == pytest.approx(math.exp(nll / len(ids)), rel=1e-4)
    lm_small = type(lm)(lm.model, lm.tokenizer, max_seq_len=40)  # several windows, each from BOS
    windows = token_stream_perplexity(lm_small, [ids], batch_size=2)
    want = 0.0
    for i in range(0, len(ids), 39):
        w = ids[i: i + 39]
        with torch.no_grad():
            lg = lm.model(input_ids=torch.tensor([[lm.tokenizer.bos_id] + w[:-1]])).logits[0].double()
        want -= float(F.log_softmax(lg, -1).gather(-1, torch.tensor(w).unsqueeze(-1)).sum())
    assert windows.nll == pytest.approx(want, rel=1e-5) and windows.n_tokens == len(ids)


class FakeMegallamaTransformer(torch.nn.Module):
    """Stands in for ``megallama.model.Transformer``'s documented interface (padded vocabulary,
    ``new_kv_cache``, ``forward(tokens, start_pos=, kv_cache=)``), computing with the HF model."""

    class Cache:
        def __init__(self, hf_cache, repeatable):
            self.hf = hf_cache
            if repeatable:
                self.repeat_batch = self._repeat

        def _repeat(self, n):
            self.hf.batch_repeat_interleave(n)
            return self

    def __init__(self, hf_model, padded_vocab, repeatable):
        super().__init__()
        self.hf, self.padded, self.repeatable = hf_model, padded_vocab, repeatable

    def new_kv_cache(self, batch_size, max_seq_len, dtype=None, device=None):
        from transformers import DynamicCache

        return self.Cache(DynamicCache(), self.repeatable)

    def forward(self, tokens, start_pos=0, kv_cache=None):
        if kv_cache is None:
            logits = self.hf(input_ids=tokens).logits
        else:
            assert kv_cache.hf.get_seq_length() == start_pos
            logits = self.hf(input_ids=tokens, cache=kv_cache.hf, use_cache=True).logits
        pad = torch.full((*logits.shape[:-1], self.padded - logits.shape[-1]), 1e4)  # must never win
        return torch.cat([logits, pad], dim=-1)


@pytest.mark.parametrize("repeatable", [True, False])
def test_megallama_adapter_scores_and_generates_like_hf(lm, repeatable):
    from megallama.config import ModelConfig
    from megallama.eval.lm import MegallamaAdapter
    from megallama.generation import SamplingParams, generate

    cfg = ModelConfig(vocab_size=lm.vocab_size, max_seq_len=lm.max_seq_len)
    adapter = MegallamaAdapter(FakeMegallamaTransformer(lm.model, lm.vocab_size + 8, repeatable), cfg, lm.tokenizer)
    reqs = [Request("The capital of France is", x) for x in (" Paris", " a city of lights")] + [Request("", "Hi.")]
    got = loglikelihoods(adapter, reqs)
    assert [g.logprob for g in got] == pytest.approx([reference_logprob(lm, r.context, r.continuation) for r in reqs], abs=1e-4)
    prompts = ["def foo(x):", "x = 1"]
    params = SamplingParams(max_new_tokens=6)
    assert [g.tokens for g in generate(adapter, prompts, params)] == [g.tokens for g in generate(lm, prompts, params)]


def test_perplexity_of_an_indexed_dataset(lm, tmp_path):
    indexed = pytest.importorskip("megallama.data.indexed")
    docs = [lm.tokenizer.encode(t) for t in ("def f(x):\n    return x\n", "import os\n", "class A:\n    pass\n" * 5)]
    writer = indexed.IndexedDatasetWriter(str(tmp_path / "d"), lm.vocab_size, getattr(lm.tokenizer, "fingerprint", "0" * 16))
    writer.add_documents(docs)
    writer.finish()
    result = harness.evaluate_task(lm, TaskSpec("perplexity", str(tmp_path / "d")), EvalOptions())
    nll = 0.0
    for ids in docs:  # each document on its own, from BOS
        with torch.no_grad():
            lg = lm.model(input_ids=torch.tensor([[lm.tokenizer.bos_id] + ids[:-1]])).logits[0].double()
        nll -= float(F.log_softmax(lg, -1).gather(-1, torch.tensor(ids).unsqueeze(-1)).sum())
    assert result.metrics["perplexity"] == pytest.approx(math.exp(nll / sum(map(len, docs))), rel=1e-4)
