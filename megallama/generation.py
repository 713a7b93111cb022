"""Batched sampling with a key/value cache: greedy, temperature and nucleus (top-p), stop sequences.

Prompts of different lengths share one batch the way Meta's reference generation does it: every
row starts at position 0 (right padding), decoding starts at the shortest prompt's end, and at each
position a row whose prompt is longer keeps its own prompt token instead of the sampled one.  All
rows therefore share ``start_pos`` (what the model's cache interface needs), no attention mask is
required, and each row's result equals generating it alone.  That holds for sampling too: every
row draws from its own random generator, seeded from ``(seed, row)`` (``row`` is the prompt's index,
or what ``rows`` gives), and only at its own decoding steps, so a sampled row depends on its prompt,
the seed and its row number alone, not on the other prompts in the batch or on the batch size.
Under tensor parallelism every rank runs this same loop with the same seed, so all ranks pick the
same tokens.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from megallama.errors import UserError


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = field(default_factory=tuple)  # the text is cut before the first stop string

    def validate(self) -> "SamplingParams":
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise UserError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        return self


@dataclass(frozen=True)
class Generation:
    text: str  # the completion, cut before any stop sequence
    tokens: list[int]  # the completion's token ids (up to and excluding EOS)
    finish_reason: str  # "stop" (a stop sequence), "eos", or "length"


def row_generator(seed: int, row: int) -> torch.Generator:
    """The random generator of one batch row: a function of ``(seed, row)`` only."""
    digest = hashlib.blake2b(f"megallama-sample:{seed}:{row}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def sample_top_p(probs: torch.Tensor, p: float, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Sample from the smallest set of tokens whose probability mass reaches ``p`` (nucleus),
    row ``b`` of ``probs`` with ``generators[b]``."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    cumulative = torch.cumsum(sorted_probs, dim=-1)
    sorted_probs[cumulative - sorted_probs > p] = 0.0  # keep every token needed to reach p
    sorted_probs.div_(sorted_probs.sum(dim=-1, keepdim=True))
    choice = torch.cat([torch.multinomial(sorted_probs[b: b + 1], num_samples=1, generator=g)
                        for b, g in enumerate(generators)])
    return torch.gather(order, -1, choice).squeeze(-1)


def _next_tokens(logits: torch.Tensor, params: SamplingParams, generators: Sequence[torch.Generator],
                 current: torch.Tensor, drawing: list[int]) -> torch.Tensor:
    """This position's token in every row: the rows in ``drawing`` pick the next token (a sampled row
    from its own generator), the others keep ``current`` (a prompt token, or a finished row's pad)."""
    out = current.clone()
    if not drawing:
        return out
    if params.temperature == 0:
        out[drawing] = logits[drawing].argmax(dim=-1)
    else:
        probs = torch.softmax(logits[drawing].float() / params.temperature, dim=-1)
        out[drawing] = sample_top_p(probs, params.top_p, [generators[b] for b in drawing])
    return out


def _cut_at_stop(text: str, stops: Sequence[str]) -> Optional[str]:
    hits = [text.index(s) for s in stops if s and s in text]
    return text[: min(hits)] if hits else None


_ANCHOR = 8  # prompt tokens decoded in front of a completion (enough to start on a whole character)


def decode_after(tok, prompt: Sequence[int], ids: Sequence[int]) -> str:
    """The text ``ids`` add after ``prompt``.

    Decoded behind the prompt's last tokens and the prompt's text cut off: a SentencePiece model
    with a dummy prefix (Meta's LLaMA tokenizer) drops the leading space of ids decoded on their
    own, which would take one space off the first line of every indented code completion.
    """
    ids = list(ids)
    if not ids:
        return ""
    anchor = list(prompt[-_ANCHOR:])
    head, whole = tok.decode(anchor), tok.decode(anchor + ids)
    return whole[len(head):] if anchor and whole.startswith(head) else tok.decode(ids)


def keep_window(ids: list[int], budget: int) -> list[int]:
    """The one truncation rule of generation prompts and scored contexts (``ids`` start with BOS):
    a sequence longer than ``budget`` keeps its BOS and its most recent ``budget - 1`` tokens, so the
    model always reads text from BOS, as in every perplexity window."""
    if budget < 1:
        raise ValueError(f"a budget of {budget} tokens leaves no room even for BOS")
    return ids if len(ids) <= budget else ids[:1] + ids[len(ids) - budget + 1:]


@torch.no_grad()
def generate(lm, prompts: Sequence[str], params: SamplingParams,
             rows: Optional[Sequence[int]] = None) -> list[Generation]:
    """Complete every prompt; results are in the order of ``prompts``.

    With sampling, prompt ``b`` draws from a generator seeded from ``(params.seed, rows[b])``
    (``rows`` defaults to ``0, 1, ...``), so its completion is the same whatever else is in the batch:
    ``generate(lm, [prompts[b]], params, rows=[rows[b]])`` gives it alone."""
    params.validate()
    if not prompts:
        return []
    rows = list(range(len(prompts))) if rows is None else list(rows)
    if len(rows) != len(prompts):
        raise ValueError(f"rows has {len(rows)} entries for {len(prompts)} prompts")
    tok = lm.tokenizer
    budget = lm.max_seq_len - params.max_new_tokens
    if budget < 1:
        raise UserError(f"--max-new-tokens {params.max_new_tokens} leaves no room for a prompt in the "
                        f"model's {lm.max_seq_len}-token window; lower it")
    encoded = [keep_window(tok.encode(p, bos=True), budget) for p in prompts]
    lengths = [len(e) for e in encoded]
    total = max(lengths) + params.max_new_tokens
    bsz = len(encoded)
    tokens = torch.zeros(bsz, total, dtype=torch.long)
    is_prompt = torch.zeros(bsz, total, dtype=torch.bool)
    for b, ids in enumerate(encoded):
        tokens[b, : len(ids)] = torch.tensor(ids)
        is_prompt[b, : len(ids)] = True
    generators = [row_generator(params.seed, r) for r in rows] if params.temperature > 0 else []
    cache = lm.new_cache(bsz, total)
    finish: list[Optional[str]] = [None] * bsz
    texts: list[Optional[str]] = [None] * bsz
    ends = [n + params.max_new_tokens for n in lengths]  # each row gets max_new_tokens of its own
    prev = 0
    for cur in range(min(lengths), total):
        logits = lm.logits_cached(tokens[:, prev:cur], prev, cache)[:, -1].cpu()
        drawing = [b for b in range(bsz) if finish[b] is None and not is_prompt[b, cur]]
        nxt = _next_tokens(logits, params, generators, tokens[:, cur], drawing)
        tokens[:, cur] = nxt
        prev = cur
        for b in range(bsz):
            if finish[b] is not None or is_prompt[b, cur]:
                continue
            if int(nxt[b]) == tok.eos_id:
                finish[b] = "eos"
            elif params.stop:
                cut = _cut_at_stop(decode_after(tok, encoded[b], tokens[b, lengths[b]: cur + 1].tolist()),
                                   params.stop)
                if cut is not None:
                    finish[b], texts[b] = "stop", cut
            if finish[b] is None and cur + 1 >= ends[b]:
                finish[b] = "length"
            if finish[b] is not None:
                ends[b] = cur + 1  # later steps still run for other rows; ignore this row's tokens
        if all(f is not None for f in finish):
            break
    results = []
    for b in range(bsz):
        ids = tokens[b, lengths[b]: min(ends[b], prev + 1)].tolist()
        if tok.eos_id in ids:
            ids = ids[: ids.index(tok.eos_id)]
        text = texts[b] if texts[b] is not None else decode_after(tok, encoded[b], ids)
        results.append(Generation(text, ids, finish[b] or "length"))
    return results
