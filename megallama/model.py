"""The LLaMA model (Touvron et al. 2023), composed from tensor/sequence-parallel layers.

Read top to bottom: RMSNorm, rotary embeddings, attention, SwiGLU feed-forward, the
transformer block, and the model.  Their element-wise kernels (hand-written backward passes,
fused GPU kernels) are in :mod:`megallama.kernels`.  Differences from the original GPT recipe, as in
the paper: pre-normalisation with RMSNorm, SwiGLU with hidden size 2/3·4d rounded
up to a multiple of 256, rotary embeddings, no biases, untied output layer.

Parallelism is built in, never retrofitted: every projection is a column- or
row-parallel linear (:mod:`parallel.layers`), so a rank holds ``1/tp`` of the heads
and of the FFN.  Hidden states are sequence-first, ``[s, b, d]``; with sequence
parallelism they are ``[s/tp, b, d]`` between the tensor-parallel regions.
With ``ParallelContext.single()`` everything is a plain single-device model.

Weights are stored in Meta's layout (interleaved rotary pairs); q, k, v and the
SwiGLU gate/up projections are fused (``wqkv``, ``w13``) so each block does two
column-parallel matmuls.  :mod:`megallama.convert` maps to and from Hugging Face.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from megallama.config import ModelConfig
from megallama.kernels import _RMSNormFunction, _SwiGLUFunction, fused_rms_norm, rotary_qkv
from parallel.comm import SAVE_IN_RECOMPUTE, gather_from_tp
from parallel.gemm import MATMUL_OPS
from parallel.init import init_normal_
from parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, replicated_weight
from parallel.topology import ParallelContext


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float, ctx: ParallelContext, sequence_parallel: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.eps, self.ctx, self.sequence_parallel = eps, ctx, sequence_parallel
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = replicated_weight(self.weight, self.ctx, self.sequence_parallel)
        fused = fused_rms_norm(x, weight, self.eps)  # CUDA: apex's kernel or torch's (megallama/kernels.py)
        return _RMSNormFunction.apply(x, weight, self.eps) if fused is None else fused


# ----------------------------------------------------------------------------- rotary

def rotary_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * theta^(-2i/d), each ``[max_seq_len, head_dim/2]`` (fp32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


# ----------------------------------------------------------------------------- packed documents

def document_layout(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions ``[b, s]``, attention mask ``[b, 1, s, s]``) of packed documents.

    ``doc_ids`` ``[b, s]`` numbers the documents of each row (consecutive tokens of one
    document share an id).  Positions restart at 0 at every document start, so a packed
    example sees the rotary positions it would see alone; the boolean mask (True = may
    attend) is causal *and* block-diagonal, so no token attends across a document boundary.
    """
    b, s = doc_ids.shape
    index = torch.arange(s, device=doc_ids.device).expand(b, s)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool, device=doc_ids.device).tril()
    return index - first, (same & causal)[:, None]


# ----------------------------------------------------------------------------- KV cache

class KVCache:
    """Keys and values of past positions for generation, ``[layers, b, kv_heads/tp, max_s, hd]``."""

    def __init__(self, n_layers: int, batch: int, kv_heads: int, max_seq_len: int, head_dim: int,
                 dtype=torch.float32, device=None):
        shape = (n_layers, batch, kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def repeat_batch(self, n: int) -> "KVCache":
        """A cache holding ``n`` copies of this batch-1 cache (one shared context, n continuations)."""
        out = KVCache.__new__(KVCache)
        out.k, out.v = self.k.repeat(1, n, 1, 1, 1), self.v.repeat(1, n, 1, 1, 1)
        return out

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


# ----------------------------------------------------------------------------- attention

class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, sequence_parallel: bool, layer_id: int,
                 device=None, dtype=None):
        super().__init__()
        tp, hd = ctx.tp_size, cfg.head_dim
        self.layer_id = layer_id
        self.head_dim = hd
        self.n_heads, self.n_kv_heads = cfg.n_heads // tp, cfg.kv_heads // tp  # local heads
        q, kv = cfg.n_heads * hd, cfg.kv_heads * hd
        self.wqkv = ColumnParallelLinear(cfg.dim, q + 2 * kv, ctx, chunks=(q, kv, kv),
                                         sequence_parallel=sequence_parallel, device=device, dtype=dtype)
        self.wo = RowParallelLinear(q, cfg.dim, ctx, sequence_parallel=sequence_parallel, device=device, dtype=dtype)
        # fp32 tables kept out of the module's buffers so a bf16/fp16 cast never rounds them
        self._rope = rotary_tables(hd, cfg.max_seq_len, cfg.rope_theta)

    def rope(self, start: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope[0].device != device:
            self._rope = tuple(t.to(device) for t in self._rope)
        cos, sin = self._rope
        return cos[start:start + length], sin[start:start + length]

    def forward(self, x: torch.Tensor, start_pos: int = 0, kv_cache: Optional[KVCache] = None,
                doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        qkv = self.wqkv(x)  # [s, b, (h + 2*kvh) * hd] of the local heads (full s under SP)
        s, b = qkv.shape[:2]
        hd = self.head_dim
        doc_mask = None
        if doc_ids is None:
            cos, sin = self.rope(start_pos, s, x.device)
        else:  # packed documents: per-sample positions and a block-diagonal causal mask
            positions, doc_mask = document_layout(doc_ids)
            cos, sin = self.rope(0, s, x.device)
            cos, sin = cos[positions.t()], sin[positions.t()]  # [s, b, hd/2]
        q, k, v = rotary_qkv(qkv, cos, sin, self.n_heads, self.n_kv_heads, hd)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, hd]

        mask, causal = None, True
        if doc_mask is not None:
            mask, causal = doc_mask, False
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_id, start_pos, k, v)
            if start_pos > 0:  # queries sit at positions start_pos.. of a longer key sequence
                causal = False
                if s > 1:
                    qpos = torch.arange(start_pos, start_pos + s, device=x.device)
                    mask = torch.arange(k.shape[2], device=x.device)[None, :] <= qpos[:, None]
        gqa = {"enable_gqa": True} if self.n_kv_heads != self.n_heads else {}
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and s > 1, **gqa)
        out = out.permute(2, 0, 1, 3).reshape(s, b, self.n_heads * hd)
        return self.wo(out)


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020): w2(silu(w1 x) * w3 x), with w1 and w3 fused as ``w13``."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, sequence_parallel: bool, device=None, dtype=None,
                 fuse_output_collective: bool = True):
        super().__init__()
        hidden = cfg.ffn_hidden
        self.w13 = ColumnParallelLinear(cfg.dim, 2 * hidden, ctx, chunks=(hidden, hidden),
                                        sequence_parallel=sequence_parallel, device=device, dtype=dtype)
        self.w2 = RowParallelLinear(hidden, cfg.dim, ctx, sequence_parallel=sequence_parallel,
                                    fuse_collective=fuse_output_collective, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(_SwiGLUFunction.apply(self.w13(x)))


# ----------------------------------------------------------------------------- block

# kept by selective recompute: matmuls, every SDPA backend a device may pick (cuDNN's exists from
# torch 2.5 on; GPUs can choose it) and the tensor-parallel linears, single ops with their
# collectives inside, so that recomputing a block re-runs no collective
_ATTENTION_KERNELS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                      "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
_EXPENSIVE = ({torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}
              | {getattr(torch.ops.aten, name).default for name in _ATTENTION_KERNELS if hasattr(torch.ops.aten, name)}
              | SAVE_IN_RECOMPUTE | MATMUL_OPS)


def _save_matmuls_policy(ctx, op, *args, **kwargs):
    """Selective recompute (the paper's section 2.4): keep the expensive activations (outputs
    of linear layers and of attention), recompute the cheap element-wise ones."""
    return CheckpointPolicy.MUST_SAVE if op in _EXPENSIVE else CheckpointPolicy.PREFER_RECOMPUTE


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, cfg: ModelConfig, ctx: ParallelContext, sequence_parallel: bool = False,
                 checkpointing: str = "none", device=None, dtype=None):
        super().__init__()
        self.layer_id = layer_id
        self.checkpointing = checkpointing
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps, ctx, sequence_parallel, device, dtype)
        self.attention = Attention(cfg, ctx, sequence_parallel, layer_id, device, dtype)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps, ctx, sequence_parallel, device, dtype)
        # a full recomputation needs nothing after w2's input: unfused, it stops before w2's collective
        self.feed_forward = FeedForward(cfg, ctx, sequence_parallel, device, dtype,
                                        fuse_output_collective=checkpointing != "full")

    def _forward(self, x: torch.Tensor, start_pos: int = 0, kv_cache: Optional[KVCache] = None,
                 doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), start_pos, kv_cache, doc_ids)
        return h + self.feed_forward(self.ffn_norm(h))

    def forward(self, x, start_pos: int = 0, kv_cache: Optional[KVCache] = None,
                doc_ids: Optional[torch.Tensor] = None):
        if isinstance(x, tuple):  # pipeline stage: (hidden, doc_ids) travel together between stages
            hidden, doc_ids = x
            return self.forward(hidden, doc_ids=doc_ids), doc_ids
        if self.checkpointing == "none" or not torch.is_grad_enabled() or kv_cache is not None:
            return self._forward(x, start_pos, kv_cache, doc_ids)
        if self.checkpointing == "full":
            return checkpoint(self._forward, x, 0, None, doc_ids, use_reentrant=False)
        context_fn = partial(create_selective_checkpoint_contexts, _save_matmuls_policy)
        return checkpoint(self._forward, x, 0, None, doc_ids, use_reentrant=False, context_fn=context_fn)


# ----------------------------------------------------------------------------- embedding and head

def embed(tok_embeddings: VocabParallelEmbedding, tokens: torch.Tensor) -> torch.Tensor:
    """Tokens ``[b, s]`` -> hidden states ``[s, b, d]`` (``[s/tp, b, d]`` under SP)."""
    return tok_embeddings(tokens.t())


def _token_weights(loss_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``[s, b]`` weights of each token's loss: None (the plain mean) or the masked mean's."""
    if loss_mask is None:
        return None
    mask = loss_mask.t().float()
    return mask / mask.sum().clamp(min=1.0)


# ----------------------------------------------------------------------------- pipeline stages

class EmbeddingStage(nn.Module):
    """First pipeline layer: tokens ``[b, s]`` -> hidden states; ``(tokens, doc_ids)`` -> ``(hidden, doc_ids)``."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, sequence_parallel: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.tok_embeddings = VocabParallelEmbedding(cfg.padded_vocab_size(ctx.tp_size), cfg.dim, ctx,
                                                     logical_rows=cfg.vocab_size,
                                                     sequence_parallel=sequence_parallel, device=device, dtype=dtype)

    def forward(self, tokens):
        if isinstance(tokens, tuple):  # packed documents: the ids travel with the hidden states
            tokens, doc_ids = tokens
            return embed(self.tok_embeddings, tokens), doc_ids
        return embed(self.tok_embeddings, tokens)


class HeadStage(nn.Module):
    """Last pipeline layer: the final norm -> hidden states ``[s, b, d]``.  It also owns the (untied)
    output projection, which :class:`PipelineLoss` runs fused with the cross-entropy, so the last
    stage never materialises ``[s, b, V/tp]`` logits (as :class:`Transformer` does not)."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, sequence_parallel: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.vocab_size = cfg.vocab_size
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, ctx, sequence_parallel, device, dtype)
        self.output = ColumnParallelLinear(cfg.dim, cfg.padded_vocab_size(ctx.tp_size), ctx,
                                           sequence_parallel=sequence_parallel, device=device, dtype=dtype)
        self.output.weight.logical_rows = cfg.vocab_size

    def forward(self, x) -> torch.Tensor:
        if isinstance(x, tuple):  # (hidden, doc_ids) of packed documents
            x = x[0]
        return self.norm(x)

    def loss(self, h: torch.Tensor, targets: torch.Tensor, loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean next-token loss of normed hidden states ``[s, b, d]`` and targets ``[b, s]``; with
        ``loss_mask`` ``[b, s]`` only masked-in tokens count (e.g. instruction responses)."""
        return self.output(h, targets.t(), _token_weights(loss_mask), self.vocab_size)


class PipelineLoss:
    """``loss_fn(hidden, labels)`` of the last stage; labels are targets or (targets, loss_mask).

    DeepSpeed hands the loss function the last layer's output; the output projection that turns
    it into a loss lives in that layer (:class:`HeadStage`), found by :meth:`bind` once the
    stage is built."""

    def __init__(self):
        self.head: Optional[HeadStage] = None

    def bind(self, stage: nn.Module) -> "PipelineLoss":
        heads = [m for m in stage.modules() if isinstance(m, HeadStage)]
        self.head = heads[0] if heads else None  # only the last stage holds it (and computes the loss)
        return self

    def __call__(self, hidden: torch.Tensor, labels) -> torch.Tensor:
        if self.head is None:
            raise RuntimeError("PipelineLoss called on a stage without the output layer; bind() it to the last stage")
        targets, mask = labels if isinstance(labels, (tuple, list)) else (labels, None)
        return self.head.loss(hidden, targets, mask)


def pipeline_layers(cfg: ModelConfig, ctx: ParallelContext, sequence_parallel: bool, checkpointing: str,
                    balance: str = "parameters"):
    """(LayerSpecs, weights) of the model as a flat list: embedding, blocks, head.

    Weights balance the stages analytically: parameter counts (``balance="parameters"``,
    which balances memory), or training FLOPs per token (``"flops"``, which balances time:
    the embedding is a lookup, the output layer the largest matmul; attention at
    ``cfg.max_seq_len``).  ``"uniform"`` ignores them.
    """
    from parallel.pipeline import LayerSpec

    sp = sequence_parallel and ctx.tp_size > 1
    specs = [LayerSpec(EmbeddingStage, cfg, ctx, sp)]
    specs += [LayerSpec(TransformerBlock, i, cfg, ctx, sp, checkpointing) for i in range(cfg.n_layers)]
    specs.append(LayerSpec(HeadStage, cfg, ctx, sp))
    vocab_params = cfg.vocab_size * cfg.dim
    block_params = (cfg.num_parameters(include_embedding=False) - cfg.dim) // cfg.n_layers
    if balance == "flops":  # forward + backward: 6 per weight, 12·d·s for attention scores and values
        block_flops = 6 * block_params + 12 * cfg.dim * cfg.max_seq_len
        return specs, [0] + [block_flops] * cfg.n_layers + [6 * vocab_params]
    return specs, [vocab_params] + [block_params] * cfg.n_layers + [vocab_params + cfg.dim]


def canonical_name(pipeline_name: str, n_layers: int) -> str:
    """Pipeline-module parameter name (``"<layer index>.<rest>"``) -> the full model's name."""
    index, rest = pipeline_name.split(".", 1)
    i = int(index)
    if i == 0 or i == n_layers + 1:  # EmbeddingStage / HeadStage keep the full model's attribute names
        return rest
    return f"layers.{i - 1}.{rest}"


# ----------------------------------------------------------------------------- model

class Transformer(nn.Module):
    """The whole model on one pipeline stage (pp=1); :mod:`megallama.pipeline` splits it."""

    def __init__(self, cfg: ModelConfig, ctx: Optional[ParallelContext] = None, *,
                 sequence_parallel: bool = False, checkpointing: str = "none", device=None, dtype=None):
        super().__init__()
        ctx = ctx or ParallelContext.single()
        self.cfg, self.ctx = cfg, ctx
        self.sequence_parallel = sequence_parallel and ctx.tp_size > 1
        sp = self.sequence_parallel
        # the same modules the pipeline stages hold, so both share one construction and one naming
        self.tok_embeddings = EmbeddingStage(cfg, ctx, sp, device, dtype).tok_embeddings
        self.layers = nn.ModuleList(TransformerBlock(i, cfg, ctx, sp, checkpointing, device, dtype)
                                    for i in range(cfg.n_layers))
        head = HeadStage(cfg, ctx, sp, device, dtype)
        self.norm, self.output = head.norm, head.output

    def forward(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None,
                loss_mask: Optional[torch.Tensor] = None, start_pos: int = 0,
                kv_cache: Optional[KVCache] = None, doc_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tokens ``[b, s]`` -> mean loss if ``targets`` is given, else logits ``[b, s, V_padded]``
        (gathered over TP; columns >= ``cfg.vocab_size`` are padding).  ``doc_ids`` ``[b, s]``
        marks packed documents (see :func:`document_layout`); None = one causal sequence."""
        x = embed(self.tok_embeddings, tokens)
        for layer in self.layers:
            x = layer(x, start_pos, kv_cache, doc_ids)
        h = self.norm(x)
        if targets is not None:  # output projection fused with the loss: no [s, b, V] logits
            return self.output(h, targets.t(), _token_weights(loss_mask), self.cfg.vocab_size)
        logits = self.output(h)  # [s, b, V/tp]
        return gather_from_tp(logits, self.ctx.tp_group).transpose(0, 1)

    def new_kv_cache(self, batch_size: int, max_seq_len: Optional[int] = None, dtype=None, device=None) -> KVCache:
        cfg = self.cfg
        return KVCache(cfg.n_layers, batch_size, cfg.kv_heads // self.ctx.tp_size, max_seq_len or cfg.max_seq_len,
                       cfg.head_dim, dtype or self.output.weight.dtype, device or self.output.weight.device)

    def init_weights(self, seed: int) -> "Transformer":
        init_parameters(self.named_parameters(), self.cfg, seed, self.ctx)
        return self


def init_parameters(named_params: Iterable[tuple[str, nn.Parameter]], cfg: ModelConfig, seed: int,
                    ctx: ParallelContext) -> None:
    """Layout-independent init by canonical name: N(0, init_std) for embeddings and input
    projections, N(0, init_std/sqrt(2L)) for the residual outputs (wo, w2), ones for norms."""
    out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    for name, p in named_params:
        if name.endswith("norm.weight"):
            with torch.no_grad():
                p.fill_(1.0)
            continue
        std = out_std if name.endswith(("wo.weight", "w2.weight")) else cfg.init_std
        init_normal_(p, name, seed, std, ctx.tp_rank, ctx.tp_size)


def build_model(cfg: ModelConfig, ctx: Optional[ParallelContext] = None, seed: int = 1234, **kwargs) -> Transformer:
    """A model with layout-independent initial weights."""
    return Transformer(cfg, ctx, **kwargs).init_weights(seed)
