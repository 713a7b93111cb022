"""The small model protocol the harness and the sampler talk to, and its two adapters.

Everything above this module (scoring, generation, tasks) only needs:

* ``lm.tokenizer`` with ``encode(text, bos=False, eos=False) -> list[int]``, ``decode(ids) -> str``,
  ``bos_id``, ``eos_id``;
* ``lm.logits(tokens[b, s]) -> float[b, s, vocab]`` (the true vocabulary, padding columns removed);
* ``lm.new_cache(batch, max_len)`` and ``lm.logits_cached(tokens, start_pos, cache)`` where every
  sequence in the batch shares ``start_pos`` (Meta's reference generation does the same, and it
  needs no attention mask: prompts are right-padded and the causal mask hides the padding);
* ``lm.repeat_cache(cache, n)`` to score the choices of one question after computing their
  shared context once.

:class:`HFAdapter` wraps a Hugging Face ``LlamaForCausalLM`` (the independent reference in tests,
and what ``--checkpoint HF_DIR`` loads today); :class:`MegallamaAdapter` wraps
``megallama.model.Transformer``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Protocol

import torch

from megallama.errors import CheckpointError


class TokenizerLike(Protocol):
    bos_id: int
    eos_id: int

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class SentencePieceTokenizer:
    """A SentencePiece model behind the megallama tokenizer protocol.

    Used only when ``megallama.data.tokenizer`` is not importable (it implements the same protocol).
    """

    def __init__(self, model_path: str):
        import sentencepiece as spm

        if not os.path.isfile(model_path):
            raise CheckpointError(f"tokenizer {model_path} not found; pass a SentencePiece .model file")
        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = list(self.sp.encode(text))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))


def load_tokenizer(model_path: str) -> TokenizerLike:
    try:
        from megallama.data.tokenizer import Tokenizer  # the project's tokenizer, when present
    except ImportError:
        return SentencePieceTokenizer(model_path)
    return Tokenizer(model_path)


class LanguageModel:
    """Base class: shared helpers over the four primitives the adapters implement."""

    tokenizer: TokenizerLike
    vocab_size: int
    max_seq_len: int
    device: torch.device
    width: int = 0  # the model's hidden size (0 = unknown): sizes the shared-context rule of scoring

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def new_cache(self, batch_size: int, max_len: int) -> Any:
        raise NotImplementedError

    def logits_cached(self, tokens: torch.Tensor, start_pos: int, cache: Any) -> torch.Tensor:
        raise NotImplementedError

    def repeat_cache(self, cache: Any, n: int) -> Any:
        raise NotImplementedError


class HFAdapter(LanguageModel):
    """A transformers causal LM (e.g. ``LlamaForCausalLM``) as a :class:`LanguageModel`."""

    def __init__(self, model, tokenizer: TokenizerLike, max_seq_len: Optional[int] = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.vocab_size = int(model.config.vocab_size)
        self.max_seq_len = int(max_seq_len or getattr(model.config, "max_position_embeddings", 2048))
        self.width = int(getattr(model.config, "hidden_size", 0) or 0)
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens.to(self.device)).logits.float()[..., : self.vocab_size]

    def new_cache(self, batch_size: int, max_len: int):
        from transformers import DynamicCache

        return DynamicCache()

    @torch.no_grad()
    def logits_cached(self, tokens: torch.Tensor, start_pos: int, cache) -> torch.Tensor:
        if cache.get_seq_length() != start_pos:  # DynamicCache only grows; keep the contract honest
            cache.crop(start_pos)
        out = self.model(input_ids=tokens.to(self.device), cache=cache, use_cache=True)
        return out.logits.float()[..., : self.vocab_size]

    def repeat_cache(self, cache, n: int):
        cache.batch_repeat_interleave(n)
        return cache


class MegallamaAdapter(LanguageModel):
    """``megallama.model.Transformer`` as a :class:`LanguageModel`.

    The model returns logits over the padded vocabulary (gathered on every tensor-parallel rank);
    the padding columns are sliced off here so no padding id can ever be scored or sampled.
    """

    def __init__(self, model, model_cfg, tokenizer: TokenizerLike, dtype: Optional[torch.dtype] = None):
        self.model = model.eval()
        self.model_cfg = model_cfg
        self.tokenizer = tokenizer
        self.vocab_size = int(model_cfg.vocab_size)
        self.max_seq_len = int(model_cfg.max_seq_len)
        self.width = int(model_cfg.dim)
        first = next(model.parameters())
        self.device, self.dtype = first.device, dtype or first.dtype

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens.to(self.device)).float()[..., : self.vocab_size]

    def new_cache(self, batch_size: int, max_len: int):
        return self.model.new_kv_cache(batch_size, max_len, dtype=self.dtype, device=self.device)

    @torch.no_grad()
    def logits_cached(self, tokens: torch.Tensor, start_pos: int, cache) -> torch.Tensor:
        out = self.model(tokens.to(self.device), start_pos=start_pos, kv_cache=cache)
        return out.float()[..., : self.vocab_size]

    def repeat_cache(self, cache, n: int):
        """Repeat a batch-1 cache ``n`` times: the cache's ``repeat_batch(n)`` if it has one."""
        if hasattr(cache, "repeat_batch"):
            return cache.repeat_batch(n)
        raise NotImplementedError("megallama KV cache has no repeat_batch(n)")


def load_model(checkpoint: str, device: str = "cpu", dtype: Optional[str] = None) -> LanguageModel:
    """Load ``checkpoint`` (a megallama checkpoint or a Hugging Face model directory) for evaluation.

    A directory with ``config.json`` and Hugging Face weights loads through transformers; the
    tokenizer is the ``tokenizer.model`` (SentencePiece) next to it.  Megallama checkpoints load
    through :func:`load_megallama_checkpoint`.
    """
    if not os.path.exists(checkpoint):
        raise CheckpointError(f"checkpoint {checkpoint} not found; pass a megallama checkpoint or a Hugging Face model directory")
    torch_dtype = _dtype(dtype)
    if os.path.isfile(os.path.join(checkpoint, "config.json")):
        return _load_hf(checkpoint, device, torch_dtype)
    return load_megallama_checkpoint(checkpoint, device, torch_dtype)


def _dtype(name: Optional[str]) -> Optional[torch.dtype]:
    table = {None: None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in table:
        raise CheckpointError(f"unknown dtype {name!r}; use fp32, bf16 or fp16")
    return table[name]


def _load_hf(path: str, device: str, dtype: Optional[torch.dtype]) -> HFAdapter:
    from megallama.hf_safe import check_no_remote_code, load_pretrained

    check_no_remote_code(path)  # before transformers is even imported
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep stderr for our one-line errors

    tok_path = os.path.join(path, "tokenizer.model")
    if not os.path.isfile(tok_path):
        raise CheckpointError(f"{path} has no tokenizer.model; copy the SentencePiece model used for training next to config.json")
    try:
        model = load_pretrained(AutoModelForCausalLM, path, dtype=dtype or torch.float32)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load Hugging Face model from {path}: {str(exc).splitlines()[0]}")
    with open(os.path.join(path, "config.json")) as f:
        max_len = json.load(f).get("max_position_embeddings")
    tokenizer = load_tokenizer(tok_path)
    _check_vocab(tokenizer, model.config.vocab_size, tok_path, path)
    return HFAdapter(model.to(device), tokenizer, max_seq_len=max_len)


def _check_vocab(tokenizer, model_vocab: int, tok_path: str, path: str) -> None:
    """A tokenizer with more pieces than the model has embedding rows: one line, not an index error
    mid-forward (fewer is fine: a model may pad its vocabulary)."""
    n = tokenizer.vocab_size
    if n > model_vocab:
        raise CheckpointError(f"tokenizer '{tok_path}' has {n:,} pieces but the model in {path} has a vocabulary "
                              f"of {model_vocab:,}; put the tokenizer the model was trained with there")


def _check_tensor_parallel(cfg, tp: int, path) -> None:
    """Under a launcher every rank is one tensor-parallel shard: the heads, key/value heads and FFN
    rows must split evenly over the ranks (one line, not a traceback deep in the first forward)."""
    from megallama.config import tensor_parallel_sizes, tensor_parallel_uneven

    bad = tensor_parallel_uneven(cfg, tp)
    if bad:
        raise CheckpointError(f"checkpoint {path} cannot run tensor-parallel over {tp} ranks: {', '.join(bad)} "
                              f"not divisible by {tp}; launch it on "
                              f"{' or '.join(map(str, tensor_parallel_sizes(cfg)))} rank(s)")


def load_megallama_checkpoint(path: str, device: str, dtype: Optional[torch.dtype]) -> MegallamaAdapter:
    """Build a :class:`MegallamaAdapter` from a megallama checkpoint (or run) directory.

    In one process the whole model is loaded; under a launcher (torch.distributed already
    initialised) the world is one tensor-parallel group and each rank loads its shard.
    """
    import torch.distributed as dist

    from megallama.checkpoint import TOKENIZER_FILE, CheckpointReader
    from megallama.sharding import shard_specs
    from megallama.model import Transformer
    from parallel.topology import ParallelContext

    reader = CheckpointReader(path)
    model_cfg = reader.config.model
    tp = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    _check_tensor_parallel(model_cfg, tp, reader.path)
    ctx = ParallelContext.from_distributed(tp=tp) if tp > 1 else ParallelContext.single()
    tok_path = os.path.join(str(reader.path), TOKENIZER_FILE)
    if not os.path.isfile(tok_path):
        raise CheckpointError(f"checkpoint {reader.path} has no {TOKENIZER_FILE}; copy the run's SentencePiece "
                              "model there")
    tokenizer = load_tokenizer(tok_path)
    _check_vocab(tokenizer, model_cfg.vocab_size, tok_path, str(reader.path))
    model = Transformer(model_cfg, ctx)
    specs = shard_specs(model_cfg, tp)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(reader.read_shard(name, None, specs[name], ctx.tp_rank, tp))
    model = model.to(device=device, dtype=dtype or torch.float32).eval()
    return MegallamaAdapter(model, model_cfg, tokenizer, dtype=dtype)
