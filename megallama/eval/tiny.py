"""A tiny random Llama checkpoint (Hugging Face format + SentencePiece tokenizer) for tests and demos.

Built from the Python standard library sources in a couple of seconds, nothing downloaded.
"""

from __future__ import annotations

import io
import os
import sysconfig

import torch


def _stdlib_text(max_chars: int = 400_000) -> str:
    root = sysconfig.get_paths()["stdlib"]
    parts, total = [], 0
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            with open(os.path.join(root, name), encoding="utf-8", errors="ignore") as f:
                text = f.read()
            parts.append(text)
            total += len(text)
            if total >= max_chars:
                break
    return "".join(parts)


def build_tiny_checkpoint(out_dir: str, vocab_size: int = 512, dim: int = 64, n_layers: int = 2,
                          n_heads: int = 4, max_seq_len: int = 512, seed: int = 0) -> str:
    """Write ``config.json``, weights and ``tokenizer.model`` of a random tiny Llama into ``out_dir``."""
    import sentencepiece as spm
    from transformers import LlamaConfig, LlamaForCausalLM

    os.makedirs(out_dir, exist_ok=True)
    lines = [ln for ln in _stdlib_text().splitlines() if ln.strip()]
    model_io = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model_io, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=0.9995, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        split_digits=True, minloglevel=2,
    )
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(model_io.getvalue())
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=dim, intermediate_size=4 * dim, num_hidden_layers=n_layers,
                      num_attention_heads=n_heads, num_key_value_heads=n_heads, max_position_embeddings=max_seq_len,
                      rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger weights than the default init so the random model has opinions
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(out_dir)
    return out_dir
