"""Our model equals Hugging Face transformers' LlamaForCausalLM with the same weights."""

from dataclasses import replace

import pytest
import torch

from megallama.config import preset_config
from megallama.convert import hf_config, hf_to_ours, ours_to_hf, meta_to_ours, ours_to_meta
from megallama.model import build_model, Transformer


def _hf_model(cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = {k: v for k, v in hf_config(cfg).items() if k not in ("architectures", "model_type", "torch_dtype")}
    return LlamaForCausalLM(LlamaConfig(**kw)).eval()


# the defaults, and Llama 3's rope_theta with LLaMA 2's norm_eps: a model that ignored either
# setting (or a config mapping that dropped it) agreed with HF at the defaults alone
@pytest.mark.parametrize("kv_heads,rope_theta,norm_eps", [(None, 10000.0, 1e-6), (2, 500000.0, 1e-5)])
def test_logits_equal_hf(kv_heads, rope_theta, norm_eps):
    cfg = replace(preset_config("tiny").model, n_kv_heads=kv_heads, vocab_size=500,  # 500: padded rows
                  rope_theta=rope_theta, norm_eps=norm_eps)
    ours = build_model(cfg, seed=7).eval()
    hf = _hf_model(cfg)
    hf.load_state_dict(ours_to_hf(ours.state_dict(), cfg), strict=True)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ours(tokens)[..., : cfg.vocab_size]
        b = hf(tokens).logits
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < 1e-5


def test_loss_equals_hf():
    cfg = preset_config("tiny").model
    ours = build_model(cfg, seed=1)
    hf = _hf_model(cfg)
    hf.load_state_dict(ours_to_hf(ours.state_dict(), cfg), strict=True)
    tokens = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    ours_loss = ours(tokens[:, :-1], tokens[:, 1:])
    with torch.no_grad():
        hf_loss = hf(tokens, labels=tokens).loss  # HF shifts labels itself
    assert abs(ours_loss.item() - hf_loss.item()) < 1e-5


def test_mapping_round_trips_exactly():
    cfg = replace(preset_config("tiny").model, n_kv_heads=2, vocab_size=500)
    sd = build_model(cfg, seed=2).state_dict()
    back = hf_to_ours(ours_to_hf(sd, cfg), cfg)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    meta = ours_to_meta(sd, cfg)
    assert {"layers.0.attention.wq.weight", "layers.0.feed_forward.w3.weight"} <= meta.keys()
    assert all(torch.equal(meta_to_ours(meta, cfg)[k], sd[k]) for k in sd)


def test_kv_cache_matches_full_forward():
    cfg = preset_config("tiny").model
    model = build_model(cfg, seed=4).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 14), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_kv_cache(2, 32)
        parts = [model(tokens[:, :9], start_pos=0, kv_cache=cache),     # prompt
                 model(tokens[:, 9:12], start_pos=9, kv_cache=cache),   # a chunk
                 model(tokens[:, 12:13], start_pos=12, kv_cache=cache), # single tokens
                 model(tokens[:, 13:14], start_pos=13, kv_cache=cache)]
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-5


def test_architecture_of_the_paper():
    cfg = preset_config("llama-7b").model
    assert cfg.ffn_hidden == 11008 and cfg.head_dim == 128
    with torch.device("meta"):
        m = Transformer(cfg)
    assert not any(name.endswith("bias") for name, _ in m.named_parameters())  # no biases
    assert m.output.weight is not m.tok_embeddings.weight  # untied output
