"""Log-likelihood scoring: batched, length-sorted, with shared contexts computed once.

A request is a (context, continuation) pair; its score is ``sum log p(continuation | BOS + context)``
over the continuation's tokens.  Two execution paths give the same numbers:

* flat: every request is one right-padded row ``(context + continuation)[:-1]``; rows are sorted by
  length (longest first, so memory peaks at once and padding is minimal) and batched;
* shared: requests with the same context (the choices of one question) are grouped; the context
  runs once into a KV cache, the cache is repeated per choice, and all continuations run as one
  batch from the shared start position.  Used when the model supports ``repeat_cache``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from megallama.eval.lm import LanguageModel
from megallama.generation import keep_window


@dataclass(frozen=True)
class Request:
    context: str
    continuation: str


@dataclass(frozen=True)
class Scored:
    logprob: float  # sum over the continuation's tokens
    n_tokens: int
    is_greedy: bool  # every continuation token is the argmax


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of BOS + context and of the continuation.

    Whitespace that ends the context is moved to the front of the continuation first, as
    lm-evaluation-harness does: a SentencePiece text never has a bare ``▁`` token before a word
    (``"to accumulate"`` is ``▁to ▁acc um ulate``), so a context ending in a space would otherwise
    be scored on a tokenisation that never occurs in text.  The pair is then encoded as one string
    and split where the context's own encoding ends, so a word straddling the boundary is tokenized
    as the model saw such text in training.  Where the stripped context's tokens are not a prefix of
    the joint encoding (``"Response:"`` + ``"\\n"`` tokenizes differently from ``"Response:\\n"``), the
    context is split as written, so a prompt template's final newline stays where finetuning put it.
    Only if neither is a prefix (a merge across the boundary) is the continuation encoded on its own,
    as text that follows other text (no dummy prefix, where the tokenizer has one).
    """
    stripped = context.rstrip()
    if not stripped:
        return [tok.bos_id], tok.encode(context + continuation)
    whole = tok.encode(context + continuation, bos=True)
    for cut in dict.fromkeys((stripped, context)):  # the whitespace moved; else the context as written
        ctx = tok.encode(cut, bos=True)
        if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
            return ctx, whole[len(ctx):]
    return tok.encode(context, bos=True), getattr(tok, "encode_continuation", tok.encode)(continuation)


def _fit(ctx: list[int], cont_len: int, max_len: int) -> list[int]:
    """Context of a question whose longest continuation has ``cont_len`` tokens, cut to the window by
    generation's rule (:func:`~megallama.generation.keep_window`: BOS and the most recent tokens)."""
    keep = max_len - cont_len
    if keep < 1:
        raise ValueError(f"continuation of {cont_len} tokens does not fit a {max_len}-token window")
    return keep_window(ctx, keep)


def _score_rows(logprobs: torch.Tensor, targets: torch.Tensor) -> tuple[float, bool]:
    """Sum of the target log-probabilities and whether each target is the argmax."""
    lp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return float(lp.double().sum()), bool((logprobs.argmax(-1) == targets).all())


SHARED_BREAK_EVEN = 150  # context tokens saved at which sharing pays off, for a 64-wide model
SHARED_REFERENCE_WIDTH = 64


def share_pays(n_choices: int, context_tokens: int, width: int) -> bool:
    """Whether one question's choices run their shared context once (KV cache) or one flat row each.

    Sharing saves ``(n_choices - 1) * context_tokens`` tokens of compute but costs two more model
    calls per question (a batch-1 context call, then the continuations) and a cache copy.  The saved
    tokens must reach a break-even that falls as the model widens (each token costs more compute,
    a call's overhead does not): ``150 * sqrt(64 / width)`` tokens, measured with
    ``benchmarks/eval_speed.py --sweep`` (the derivation is in docs/eval.md).  A width of 0 (unknown)
    counts as 64."""
    if n_choices < 2:
        return False
    width = width or SHARED_REFERENCE_WIDTH
    return (n_choices - 1) * context_tokens >= SHARED_BREAK_EVEN * math.sqrt(SHARED_REFERENCE_WIDTH / width)


def loglikelihoods(lm: LanguageModel, requests: Sequence[Request], batch_size: int = 16,
                   share_context: Optional[bool] = None) -> list[Scored]:
    """Score every request; results come back in the order of ``requests``.

    Identical requests are scored once (the "Answer:" requests of unconditional normalisation
    repeat for every question).  A shared context is computed once per ``batch_size`` choices.
    ``share_context``: None chooses per question by :func:`share_pays` (the default), True shares
    every multi-choice context, False scores every request as a flat row (both give the same numbers).
    """
    tok = lm.tokenizer
    unique: dict[Request, int] = {}
    for r in requests:
        unique.setdefault(r, len(unique))
    encoded = [encode_pair(tok, r.context, r.continuation) for r in unique]
    for i, (_, cont) in enumerate(encoded):
        if not cont:
            raise ValueError(f"request {list(unique)[i]} has an empty continuation")
    groups: dict[tuple, list[int]] = {}
    for i, (ctx, _) in enumerate(encoded):
        groups.setdefault(tuple(ctx), []).append(i)
    for idx in groups.values():  # one truncation per question, so both paths score the same tokens
        longest = max(len(encoded[i][1]) for i in idx)
        for i in idx:
            encoded[i] = (_fit(encoded[i][0], longest, lm.max_seq_len), encoded[i][1])
    scored: list[Optional[Scored]] = [None] * len(encoded)
    flat = list(range(len(encoded)))
    if share_context is not False and _supports_shared(lm):
        width = int(getattr(lm, "width", 0) or 0)
        chunks = [idx[k: k + batch_size] for idx in groups.values() for k in range(0, len(idx), batch_size)]
        shared = [c for c in chunks if len(c) > 1 and (share_context or share_pays(len(c), len(encoded[c[0]][0]), width))]
        flat = [i for c in chunks if len(c) == 1 or not (share_context or share_pays(len(c), len(encoded[c[0]][0]), width))
                for i in c]
        shared.sort(key=lambda idx: -(len(encoded[idx[0]][0]) + max(len(encoded[i][1]) for i in idx)))
        for idx in shared:
            for i, s in zip(idx, _score_shared(lm, [encoded[i] for i in idx])):
                scored[i] = s
    flat.sort(key=lambda i: -(len(encoded[i][0]) + len(encoded[i][1])))
    for start in range(0, len(flat), batch_size):
        chunk = flat[start: start + batch_size]
        for i, s in zip(chunk, _score_flat(lm, [encoded[i] for i in chunk])):
            scored[i] = s
    return [scored[unique[r]] for r in requests]  # type: ignore[misc]


def _supports_shared(lm: LanguageModel) -> bool:
    try:
        lm.repeat_cache(lm.new_cache(1, 1), 1)
    except NotImplementedError:
        return False
    return True


def _score_flat(lm: LanguageModel, pairs: list[tuple[list[int], list[int]]]) -> list[Scored]:
    rows = pairs
    width = max(len(c) + len(x) - 1 for c, x in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    for b, (ctx, cont) in enumerate(rows):
        seq = (ctx + cont)[:-1]
        tokens[b, : len(seq)] = torch.tensor(seq)
    logprobs = F.log_softmax(lm.logits(tokens).float(), dim=-1).cpu()
    results = []
    for b, (ctx, cont) in enumerate(rows):
        span = logprobs[b, len(ctx) - 1: len(ctx) - 1 + len(cont)]
        lp, greedy = _score_rows(span, torch.tensor(cont))
        results.append(Scored(lp, len(cont), greedy))
    return results


def _score_shared(lm: LanguageModel, pairs: list[tuple[list[int], list[int]]]) -> list[Scored]:
    """Choices of one question: the context once (batch 1), then all continuations as one batch."""
    conts = [cont for _, cont in pairs]
    longest = max(len(c) for c in conts)
    ctx = pairs[0][0]
    cache = lm.new_cache(1, len(ctx) + longest)
    first = F.log_softmax(lm.logits_cached(torch.tensor([ctx]), 0, cache)[0, -1].float(), dim=-1).cpu()
    rest = None
    if longest > 1:
        cache = lm.repeat_cache(cache, len(conts))
        tokens = torch.zeros(len(conts), longest - 1, dtype=torch.long)
        for b, cont in enumerate(conts):
            tokens[b, : len(cont) - 1] = torch.tensor(cont[:-1])
        rest = F.log_softmax(lm.logits_cached(tokens, len(ctx), cache).float(), dim=-1).cpu()
    results = []
    for b, cont in enumerate(conts):
        span = first.unsqueeze(0)
        if len(cont) > 1:
            span = torch.cat([span, rest[b, : len(cont) - 1]], dim=0)
        lp, greedy = _score_rows(span, torch.tensor(cont))
        results.append(Scored(lp, len(cont), greedy))
    return results


# ---- multiple-choice normalisations ---------------------------------------------------------------

NORMALIZATIONS = ("none", "norm", "char", "token", "unconditional")
REPORTED_NORMS = ("none", "norm", "char", "token")  # every multiple-choice task reports acc_<each>
UNCONDITIONAL_CONTEXT = "Answer:"  # Brown et al. 2020: P(completion|context) / P(completion|"Answer:")


def bare_choice(continuation: str) -> str:
    """The answer text without the one space that joins it to the context (lm-eval's
    ``target_delimiter``): what lm-eval's ``acc_norm`` counts the characters of."""
    return continuation[1:] if continuation.startswith(" ") else continuation


def normalized_scores(norm: str, continuations: Sequence[str], cond: Sequence[Scored],
                      uncond: Optional[Sequence[Scored]] = None) -> list[float]:
    """Per-choice scores under ``norm`` (higher is better)."""
    if norm == "none":
        return [s.logprob for s in cond]
    if norm == "norm":  # lm-evaluation-harness's acc_norm: per character of the bare choice
        return [s.logprob / max(1, len(bare_choice(c))) for s, c in zip(cond, continuations)]
    if norm == "char":  # per character of the whole continuation, its leading space included
        return [s.logprob / max(1, len(c)) for s, c in zip(cond, continuations)]
    if norm == "token":
        return [s.logprob / s.n_tokens for s in cond]
    if norm == "unconditional":
        if uncond is None:
            raise ValueError("unconditional normalisation needs the scores given 'Answer:'")
        return [s.logprob - u.logprob for s, u in zip(cond, uncond)]
    raise ValueError(f"unknown normalisation {norm!r}; use one of {', '.join(NORMALIZATIONS)}")


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value, the first one on ties (deterministic)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


# ---- perplexity -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Perplexity:
    nll: float  # summed over predicted tokens (nats)
    n_tokens: int
    n_bytes: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / max(1, self.n_tokens))

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / max(1, self.n_bytes)


def token_stream_perplexity(lm: LanguageModel, streams: Sequence[Sequence[int]], n_bytes: int = 0,
                            batch_size: int = 8) -> Perplexity:
    """Perplexity of token streams (documents), each cut into disjoint windows of ``max_seq_len``.

    Every token is predicted exactly once; each window starts from BOS, like the paper's validation
    on fixed-length sequences.  Windows of all streams are batched together, longest first.
    """
    step = lm.max_seq_len - 1
    windows = [list(ids[i: i + step]) for ids in streams for i in range(0, len(ids), step)]
    windows.sort(key=len, reverse=True)
    nll, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        chunk = windows[start: start + batch_size]
        width = len(chunk[0])
        tokens = torch.zeros(len(chunk), width, dtype=torch.long)
        for b, w in enumerate(chunk):
            tokens[b, 0] = lm.tokenizer.bos_id
            tokens[b, 1: len(w)] = torch.tensor(w[:-1], dtype=torch.long)
        logprobs = F.log_softmax(lm.logits(tokens).float(), dim=-1).cpu()
        for b, w in enumerate(chunk):
            lp = logprobs[b, : len(w)].gather(-1, torch.tensor(w).unsqueeze(-1))
            nll -= float(lp.double().sum())
            count += len(w)
    return Perplexity(nll, count, n_bytes)
