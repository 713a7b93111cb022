"""Weight mapping between megallama, Meta's original release and Hugging Face, on full
(unsharded) state dicts.  This is the one place that knows these name and layout rules;
checkpoint conversion tools and the equivalence tests all go through it.

- megallama -> Meta: split the fused ``wqkv`` into ``wq, wk, wv`` and ``w13`` into ``w1, w3``;
  drop vocabulary padding rows.  Everything else has Meta's names and layout.
- Meta -> Hugging Face: rename, and permute the rows of ``wq``/``wk`` per head.  Meta
  rotates interleaved pairs (x[2i], x[2i+1]); Hugging Face rotates halves
  (x[i], x[i + hd/2]).  The permutation moves row ``2i + j`` of each head to row
  ``j * hd/2 + i``, which makes both formulations compute the same attention.
"""

from __future__ import annotations

import torch

from megallama.config import ModelConfig
from megallama.errors import CheckpointError

Tensors = dict[str, torch.Tensor]


def _permute_meta_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _permute_hf_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def ours_to_meta(sd: Tensors, cfg: ModelConfig) -> Tensors:
    q, kv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    out: Tensors = {}
    for name, t in sd.items():
        if name.endswith("attention.wqkv.weight"):
            base = name[: -len("wqkv.weight")]
            out[base + "wq.weight"], out[base + "wk.weight"], out[base + "wv.weight"] = t.split([q, kv, kv])
        elif name.endswith("feed_forward.w13.weight"):
            base = name[: -len("w13.weight")]
            out[base + "w1.weight"], out[base + "w3.weight"] = t.chunk(2)
        elif name in ("tok_embeddings.weight", "output.weight"):
            out[name] = t[: cfg.vocab_size]
        else:
            out[name] = t
    return {k: v.contiguous() for k, v in out.items()}


def _partners(sd: Tensors, name: str, base: str, *parts: str) -> list:
    """The tensors fused with ``name`` (wk/wv with wq, w3 with w1): a missing one is an incomplete source."""
    missing = [base + p for p in parts if base + p not in sd]
    if missing:
        raise CheckpointError(f"the weights hold '{name}' but not '{missing[0]}'; the model files are incomplete")
    return [sd[base + p] for p in parts]


def meta_to_ours(sd: Tensors, cfg: ModelConfig, tp: int = 1) -> Tensors:
    """Inverse of :func:`ours_to_meta`; vocabulary rows are zero-padded for ``tp``."""
    out: Tensors = {}
    for name, t in sd.items():
        if name.endswith("attention.wq.weight"):
            base = name[: -len("wq.weight")]
            out[base + "wqkv.weight"] = torch.cat([t, *_partners(sd, name, base, "wk.weight", "wv.weight")])
        elif name.endswith("feed_forward.w1.weight"):
            base = name[: -len("w1.weight")]
            out[base + "w13.weight"] = torch.cat([t, *_partners(sd, name, base, "w3.weight")])
        elif name.endswith(("attention.wk.weight", "attention.wv.weight", "feed_forward.w3.weight")):
            continue
        elif name in ("tok_embeddings.weight", "output.weight"):
            if t.shape[0] != cfg.vocab_size:  # zero-padding a short matrix would invent tokens
                raise CheckpointError(f"'{name}' has {t.shape[0]} rows but the model's vocab_size is "
                                      f"{cfg.vocab_size}; the weights and their config disagree")
            pad = cfg.padded_vocab_size(tp) - t.shape[0]
            out[name] = torch.cat([t, t.new_zeros(pad, t.shape[1])]) if pad else t
        elif name == "rope.freqs" or name.endswith("inner_attention.rope.freqs"):
            continue  # buffers in some Meta releases
        else:
            out[name] = t
    return {k: v.contiguous() for k, v in out.items()}


def fused_name(name: str):
    """The megallama tensor that the Meta-named tensor ``name`` becomes (part of), as
    :func:`meta_to_ours` maps it: ``wq``/``wk``/``wv`` -> ``wqkv``, ``w1``/``w3`` -> ``w13``; None for
    the buffers it drops.  Streaming imports use it to load only what one tensor needs."""
    if name == "rope.freqs" or name.endswith("inner_attention.rope.freqs"):
        return None
    for module, parts, fused in (("attention", ("wq", "wk", "wv"), "wqkv"), ("feed_forward", ("w1", "w3"), "w13")):
        for part in parts:
            if name.endswith(f"{module}.{part}.weight"):
                return name[: -len(f"{part}.weight")] + f"{fused}.weight"
    return name


_META_TO_HF = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_META_TO_HF_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}


def meta_to_hf(sd: Tensors, cfg: ModelConfig) -> Tensors:
    out: Tensors = {}
    for name, t in sd.items():
        if name in _META_TO_HF_TOP:
            out[_META_TO_HF_TOP[name]] = t
            continue
        _, layer, rest = name.split(".", 2)
        if rest == "attention.wq.weight":
            t = _permute_meta_to_hf(t, cfg.n_heads)
        elif rest == "attention.wk.weight":
            t = _permute_meta_to_hf(t, cfg.kv_heads)
        out[f"model.layers.{layer}.{_META_TO_HF[rest]}"] = t
    return {k: v.contiguous() for k, v in out.items()}


def hf_to_meta(sd: Tensors, cfg: ModelConfig) -> Tensors:
    top = {v: k for k, v in _META_TO_HF_TOP.items()}
    inner = {v: k for k, v in _META_TO_HF.items()}
    out: Tensors = {}
    for name, t in sd.items():
        if name in top:
            out[top[name]] = t
            continue
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some checkpoints carry
        if not name.startswith("model.layers."):
            raise KeyError(name)  # a top-level tensor LLaMA lacks (a score head, biases...): refused, not dropped
        _, _, layer, rest = name.split(".", 3)
        meta = inner[rest]
        if meta == "attention.wq.weight":
            t = _permute_hf_to_meta(t, cfg.n_heads)
        elif meta == "attention.wk.weight":
            t = _permute_hf_to_meta(t, cfg.kv_heads)
        out[f"layers.{layer}.{meta}"] = t
    if "output.weight" not in out and "tok_embeddings.weight" in out:  # tied HF models
        out["output.weight"] = out["tok_embeddings.weight"].clone()
    return {k: v.contiguous() for k, v in out.items()}


def ours_to_hf(sd: Tensors, cfg: ModelConfig) -> Tensors:
    return meta_to_hf(ours_to_meta(sd, cfg), cfg)


def hf_to_ours(sd: Tensors, cfg: ModelConfig, tp: int = 1) -> Tensors:
    return meta_to_ours(hf_to_meta(sd, cfg), cfg, tp)


def hf_config(cfg: ModelConfig, bos_id: int = 1, eos_id: int = 2) -> dict:
    """A ``config.json`` for ``transformers.LlamaForCausalLM``."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }
