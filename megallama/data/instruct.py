"""Instruction data: templates, tokens with a loss mask, and packed or padded samples.

An *example* is a conversation.  Input files are JSONL, one example per line, in any of:

* ``{"prompt": "...", "response": "..."}`` (optional ``"system"``),
* ``{"instruction": "...", "input": "...", "output": "..."}`` (Alpaca; ``input`` may be empty),
* ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``: an optional
  system message, then user/assistant turns alternating, ending with an assistant turn.

Rendering (see docs/finetuning.md): ``<s>`` then, per turn, the template's text for the system
or user message, then the assistant's text followed by ``</s>``.  Each piece is tokenized on its
own, so the boundary between prompt and response is exact (pieces after the first as
continuations: a dummy-prefix tokenizer such as Meta's puts no space in front of them); only
assistant tokens and their ``</s>`` are trained (loss mask 1), everything else is context (mask 0).

``megallama preprocess-instruct`` writes ``PREFIX.bin/.idx`` (tokens, one document per
example), ``PREFIX.mask.bin/.idx`` (the 0/1 loss mask, same offsets) and, last, the manifest
``PREFIX.instruct.json`` (template, where each example came from): no manifest, no dataset.

Training samples are rows of ``seq_len + 1`` tokens.  With packing, whole examples are laid
greedily into rows (never split) and each token carries its example's number in the row; the
model restarts positions and masks attention per example (:func:`megallama.model.document_layout`),
so packed examples never see each other.  Without packing each row holds one example.  Either
way the rest of a row is padding: its own document, never trained.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Sequence

import numpy as np

from megallama.atomic import write_text
from megallama.data.indexed import IndexedDataset, IndexedDatasetWriter
from megallama.data.sources import READ_ERRORS, expand_inputs, json_lines, unicode_problem
from megallama.data.tokenizer import Tokenizer
from megallama.errors import ConfigError, DataError

MANIFEST_VERSION = 1
ROLES = ("system", "user", "assistant")


# ----------------------------------------------------------------------------- templates

@dataclass(frozen=True)
class Template:
    """Text around the messages; ``{content}`` is replaced by the message.  The assistant's
    text follows the user text directly and ends with the ``</s>`` token."""

    system: str
    user: str


TEMPLATES = {
    # Alpaca-style (Taori et al. 2023): the response starts after "### Response:\n".
    "alpaca": Template(system="{content}\n\n", user="### Instruction:\n{content}\n\n### Response:\n"),
    # No markup at all: the prompt, a newline, the response.
    "plain": Template(system="{content}\n", user="{content}\n"),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ConfigError(f"unknown instruction template '{name}'; choose one of: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def render_prompt(prompt: str, template: str = "alpaca", system: str = "") -> str:
    """The text the model sees before its response (after ``<s>``): use it as the context of
    ``megallama eval`` / ``generate`` so they ask exactly what finetuning taught."""
    t = get_template(template)
    return (t.system.format(content=system) if system else "") + t.user.format(content=prompt)


def segments(messages: Sequence[dict], template: str) -> List[tuple[str, bool]]:
    """(text, trained) pieces of a conversation, in order; assistant pieces are trained."""
    t = get_template(template)
    out = []
    for m in messages:
        if m["role"] == "assistant":
            out.append((m["content"], True))
        else:
            out.append((getattr(t, m["role"]).format(content=m["content"]), False))
    return out


# ----------------------------------------------------------------------------- parsing

_FORMATS = 'give {"prompt", "response"}, {"instruction", "output"} or {"messages": [...]} per line'


def _need_text(obj: dict, key: str, where: str, allow_empty: bool = False, response: bool = False) -> str:
    if key not in obj:
        raise DataError(f"{where}: missing field '{key}'; {_FORMATS}")
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    problem = unicode_problem(value)
    if problem:
        raise DataError(f"{where}: field '{key}' holds {problem}; fix or remove that line")
    if not allow_empty and not value.strip():
        what = "response" if response else f"field '{key}'"
        raise DataError(f"{where}: empty {what}; give it text or drop the line")
    return value


def parse_example(obj, where: str) -> List[dict]:
    """One JSON line -> a list of {role, content} messages, validated; errors name ``where``."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object per line, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        out = []
        for i, m in enumerate(msgs):
            at = f"{where}: messages[{i}]"
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise DataError(f"{at} needs a 'role' of {', '.join(ROLES)}")
            if m["role"] == "system" and i > 0:
                raise DataError(f"{at}: a system message may only come first")
            expected = "user" if not out or out[-1]["role"] != "user" else "assistant"
            if m["role"] != "system" and m["role"] != expected:
                raise DataError(f"{at}: expected the '{expected}' turn (user and assistant alternate), got '{m['role']}'")
            content = _need_text(m, "content", at, response=m["role"] == "assistant")
            out.append({"role": m["role"], "content": content})
        if out[-1]["role"] != "assistant":
            raise DataError(f"{where}: the conversation must end with an 'assistant' message (the response)")
        return out
    if "instruction" in obj:
        prompt = _need_text(obj, "instruction", where)
        extra = _need_text(obj, "input", where, allow_empty=True) if "input" in obj else ""
        prompt = f"{prompt}\n\n{extra}" if extra.strip() else prompt
        response = _need_text(obj, "output", where, response=True)
    else:
        prompt, response = _need_text(obj, "prompt", where), _need_text(obj, "response", where, response=True)
    system = _need_text(obj, "system", where) if "system" in obj else ""
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def iter_examples(paths: Sequence[str]) -> Iterator[tuple[List[dict], str, int, int]]:
    """(messages, file, line, file index) of every non-blank line of the JSONL inputs."""
    for fi, path in enumerate(expand_inputs(paths, (".jsonl", ".jsonl.gz"))):
        try:
            for where, lineno, raw in json_lines(path):
                try:
                    obj = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise DataError(f"{where}: not valid JSON; fix or remove that line") from None
                yield parse_example(obj, where), str(path), lineno, fi
        except READ_ERRORS as exc:
            raise DataError(f"cannot read '{path}' ({exc}); check the file (a truncated .gz?) or drop it") from None


# ----------------------------------------------------------------------------- tokenizing

def tokenize_example(messages: Sequence[dict], tok: Tokenizer, template: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, loss mask) of one conversation: ``<s>`` + pieces, ``</s>`` after each response."""
    ids, mask = [tok.bos_id], [0]
    for i, (text, trained) in enumerate(segments(messages, template)):
        # pieces after the first continue the text: no dummy prefix (a space) in front of them
        piece = (tok.encode_continuation(text) if i else tok.encode(text)) + ([tok.eos_id] if trained else [])
        ids += piece
        mask += [int(trained)] * len(piece)
    return np.asarray(ids, np.int64), np.asarray(mask, np.int64)


@dataclass
class InstructReport:
    examples: int
    tokens: int
    trained_tokens: int
    truncated: int
    dropped: int
    seconds: float

    def line(self) -> str:
        return (f"{self.examples:,} examples, {self.tokens:,} tokens ({self.trained_tokens:,} trained), "
                f"{self.truncated} truncated, {self.dropped} dropped (no response left) in {self.seconds:.1f}s")


def preprocess_instruct(inputs: Sequence[str], tokenizer_path: str, output_prefix: str, seq_len: int,
                        template: str = "alpaca", truncate: bool = False, force: bool = False) -> InstructReport:
    """Validate, render and tokenize instruction JSONL into the three files of PREFIX."""
    get_template(template)
    if seq_len < 2:
        raise DataError(f"--seq-len must be at least 2, got {seq_len}")
    manifest = Path(output_prefix + ".instruct.json")
    if manifest.exists() and not force:
        raise DataError(f"'{manifest}' already exists; pass --force to overwrite it or choose another --output-prefix")
    tok = Tokenizer(tokenizer_path)
    limit, start = seq_len + 1, time.perf_counter()
    writers = [IndexedDatasetWriter(output_prefix, tok.vocab_size, tok.fingerprint, force=force),
               IndexedDatasetWriter(output_prefix + ".mask", 2, tok.fingerprint, force=force)]
    files: List[str] = []
    origins: List[List[int]] = []
    trained = truncated = dropped = 0
    try:
        for messages, path, lineno, fi in iter_examples(inputs):
            ids, mask = tokenize_example(messages, tok, template)
            if len(ids) > limit:
                if not truncate:
                    raise DataError(f"{path}:{lineno}: example is {len(ids)} tokens, longer than --seq-len + 1 = "
                                    f"{limit}; shorten it, raise --seq-len or pass --truncate")
                ids, mask, truncated = ids[:limit], mask[:limit], truncated + 1
            if not mask.any():
                dropped += 1
                continue
            while len(files) <= fi:
                files.append("")
            files[fi] = path
            writers[0].add_documents([ids])
            writers[1].add_documents([mask])
            origins.append([fi, lineno])
            trained += int(mask.sum())
        if not origins:
            raise DataError(f"the inputs {', '.join(map(str, inputs))} hold no usable examples; "
                            "pass non-empty JSONL files")
        # --force: the old manifest must not vouch for the new files while they replace the old ones,
        # but a run that fails before this point (a bad line) leaves the old dataset whole
        if manifest.exists():
            manifest.unlink()
        for w in writers:
            w.finish()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    meta = dict(format="megallama-instruct", version=MANIFEST_VERSION, template=template, seq_len=seq_len,
                truncate=truncate, tokenizer_fingerprint=tok.fingerprint, examples=len(origins),
                files=files, origins=origins)
    write_text(manifest, json.dumps(meta) + "\n")
    return InstructReport(len(origins), writers[0].num_tokens, trained, truncated, dropped,
                          time.perf_counter() - start)


# ----------------------------------------------------------------------------- reading

class InstructionSet:
    """The examples of a preprocessed PREFIX: tokens, loss masks and where each came from."""

    def __init__(self, prefix: str):
        self.prefix = str(prefix)
        path = Path(self.prefix + ".instruct.json")
        if not path.is_file():
            raise DataError(f"'{path}' not found: '{self.prefix}' is not an instruction dataset; build it with "
                            f"`megallama preprocess-instruct --output-prefix {self.prefix} ...`")
        try:
            self.meta = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise DataError(f"'{path}' is corrupt (not JSON); re-run `megallama preprocess-instruct`") from None
        self.tokens, self.mask = IndexedDataset(self.prefix), IndexedDataset(self.prefix + ".mask")
        if (self.tokens.num_docs != self.meta.get("examples") or self.mask.num_tokens != self.tokens.num_tokens
                or not np.array_equal(self.mask.offsets, self.tokens.offsets)):
            raise DataError(f"instruction dataset '{self.prefix}' is inconsistent (tokens, mask and manifest "
                            "disagree); re-run `megallama preprocess-instruct` with --force")
        self.lengths = self.tokens.lengths

    def __len__(self) -> int:
        return self.tokens.num_docs

    def where(self, i: int) -> str:
        fi, line = self.meta["origins"][i]
        return f"{self.meta['files'][fi]}:{line}"

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.tokens.document(i).astype(np.int64), self.mask.document(i).astype(np.int64)


def pack_rows(lengths: np.ndarray, order: np.ndarray, capacity: int, packing: bool) -> List[np.ndarray]:
    """Greedy packing in ``order``: an example goes into the current row if it fits, else it opens
    a new one (examples are never split).  Without packing every example is its own row."""
    if not packing:
        return [order[i:i + 1] for i in range(len(order))]
    rows, current, used = [], [], 0
    for e in order.tolist():
        n = int(lengths[e])
        if current and used + n > capacity:
            rows.append(np.asarray(current, np.int64))
            current, used = [], 0
        current.append(e)
        used += n
    if current:
        rows.append(np.asarray(current, np.int64))
    return rows


class InstructDataset:
    """``num_samples`` rows ``[3, seq_len + 1]`` (int64): tokens, loss mask, document id.

    Each epoch reshuffles the examples (seeded) and packs them anew; as many epochs are
    stacked as the run needs.  Padding uses ``</s>`` tokens with mask 0 in a document of its own.
    """

    def __init__(self, examples: InstructionSet, ids: np.ndarray, seq_len: int, num_samples: int,
                 packing: bool, seed: Sequence[int], pad_id: int):
        self.examples, self.seq_len, self.num_samples, self.pad_id = examples, seq_len, int(num_samples), pad_id
        capacity = seq_len + 1
        ids = np.asarray(ids, np.int64)
        if len(ids) == 0:
            raise DataError(f"instruction dataset '{examples.prefix}' has no examples in this split; "
                            "add examples or lower data.valid_fraction")
        too_long = ids[examples.lengths[ids] > capacity]
        if len(too_long):
            e = int(too_long[0])
            raise DataError(f"{examples.where(e)}: example is {int(examples.lengths[e])} tokens, longer than "
                            f"train.seq_len + 1 = {capacity}; re-run `megallama preprocess-instruct` with "
                            f"--seq-len {seq_len} (and --truncate) or raise train.seq_len")
        rng = np.random.default_rng(np.random.SeedSequence(list(seed)))
        self.rows: List[np.ndarray] = []
        per_epoch = 0
        while len(self.rows) < self.num_samples:
            self.rows += pack_rows(examples.lengths, rng.permutation(ids), capacity, packing)
            per_epoch = per_epoch or len(self.rows)
        self.epochs = self.num_samples / per_epoch  # passes over the split's examples

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range [0, {self.num_samples})")
        out = np.zeros((3, self.seq_len + 1), np.int64)
        at = 0
        for doc, e in enumerate(self.rows[i].tolist()):
            tokens, mask = self.examples.example(e)
            n = len(tokens)
            out[0, at:at + n], out[1, at:at + n], out[2, at:at + n] = tokens, mask, doc
            at += n
        out[0, at:], out[2, at:] = self.pad_id, len(self.rows[i])
        return out


def split_instruct_batch(batch):
    """A micro-batch ``[b, 3, seq_len + 1]`` -> ``((inputs, doc_ids), (targets, loss_mask))``.

    The mask of a target token says whether it is trained; the document id of an input
    token says which example it belongs to.  Plain batches ``[b, seq_len + 1]`` give
    ``(inputs, targets)`` as before.
    """
    if batch.dim() == 2:
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
    tokens, mask, docs = batch[:, 0], batch[:, 1], batch[:, 2]
    return ((tokens[:, :-1].contiguous(), docs[:, :-1].contiguous()),
            (tokens[:, 1:].contiguous(), mask[:, 1:].contiguous()))
