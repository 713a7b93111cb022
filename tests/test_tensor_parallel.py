"""TP (and TP+SP) forward, loss and every gradient equal the single-process model."""

from dataclasses import replace

import pytest
import torch

from tests.distributed import run_ranks


def _pad_to(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if t.shape[dim] == size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim)


def _expected_shard(ref: torch.Tensor, p: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    from parallel.init import full_shape, is_sharded, shard

    if not is_sharded(p):
        return ref
    dim = p.partition_dim
    return shard(_pad_to(ref, dim, full_shape(p, world)[dim]), dim, rank, world, p.partition_chunks)


def _tp_case(rank, world, sequence_parallel, vocab, n_kv_heads, checkpointing="none"):
    from megallama.config import preset_config
    from megallama.model import build_model
    from parallel.topology import ParallelContext

    cfg = replace(preset_config("tiny").model, vocab_size=vocab, n_kv_heads=n_kv_heads)
    ref = build_model(cfg, seed=3)  # TP=1 reference, identical on every rank
    ctx = ParallelContext.from_distributed(tp=world)
    model = build_model(cfg, ctx, seed=3, sequence_parallel=sequence_parallel, checkpointing=checkpointing)

    tokens = torch.randint(0, vocab, (3, 17), generator=torch.Generator().manual_seed(5))
    inp, tgt = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        logit_err = (ref(inp)[..., :vocab] - model(inp)[..., :vocab]).abs().max().item()
    ref_loss = ref(inp, tgt)
    ref_loss.backward()
    loss = model(inp, tgt)
    loss.backward()

    init_err, grad_err, worst = 0.0, 0.0, ""
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        rp = ref_params[name]
        init_err = max(init_err, (p.detach() - _expected_shard(rp.detach(), p, rank, world)).abs().max().item())
        err = (p.grad - _expected_shard(rp.grad, p, rank, world)).abs().max().item()
        if err >= grad_err:
            grad_err, worst = err, name
    # the replica's gradient norm (what ZeRO-0 and pipeline runs clip by): each TP shard counted
    # once, a TP-replicated norm weight once, not once per TP rank
    from parallel.grad import global_grad_norm

    ref_norm = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in ref.parameters())).item()
    norm = global_grad_norm(model.parameters(), ctx)
    return dict(logits=logit_err, loss=abs(loss.item() - ref_loss.item()), init=init_err, grad=grad_err,
                worst=worst, n_params=len(ref_params), norm=abs(norm - ref_norm) / ref_norm)


@pytest.mark.parametrize("world,sp,vocab,kv,checkpointing", [
    (1, False, 512, None, "none"),
    (2, False, 512, None, "none"),
    (2, True, 500, None, "none"),   # vocabulary padding: 500 -> 512 rows
    (2, True, 512, 2, "none"),      # grouped-query attention
    # recomputation replays the parallel linears' kept outputs (selective) or re-runs them (full)
    (2, False, 512, None, "selective"),
    (2, True, 512, None, "selective"),
    (2, True, 512, None, "full"),
    pytest.param(4, False, 512, None, "none", marks=pytest.mark.slow),
    pytest.param(4, True, 500, None, "none", marks=pytest.mark.slow),
])
def test_tp_matches_single_process(world, sp, vocab, kv, checkpointing):
    for rank, r in enumerate(run_ranks(_tp_case, world, sp, vocab, kv, checkpointing, timeout=120)):
        assert r["init"] == 0.0, f"rank {rank}: TP shards are not slices of the TP=1 init"
        assert r["logits"] < 1e-5, r
        assert r["loss"] < 1e-5, r
        assert r["grad"] < 1e-5, f"rank {rank}: gradient of {r['worst']} differs by {r['grad']}"
        assert r["norm"] < 1e-6, f"rank {rank}: global gradient norm differs by {r['norm']:.3g} (relative)"


def _tp_autocast_case(rank, world, sequence_parallel):
    """The same model under ``torch.autocast(bfloat16)`` at TP=1 and TP=``world``: the custom
    parallel-linear ops must see what ``F.linear`` sees under autocast (both operands in bf16),
    forward and backward (which runs outside the autocast region)."""
    from megallama.config import preset_config
    from megallama.model import build_model
    from parallel.topology import ParallelContext

    cfg = preset_config("tiny").model
    ref = build_model(cfg, seed=3)
    model = build_model(cfg, ParallelContext.from_distributed(tp=world), seed=3, sequence_parallel=sequence_parallel)
    tokens = torch.randint(0, cfg.vocab_size, (4, 17), generator=torch.Generator().manual_seed(6))
    losses = []
    for m in (ref, model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        losses.append(loss.item())
    ref_params = dict(ref.named_parameters())
    worst, err = "", 0.0
    for name, p in model.named_parameters():
        expected = _expected_shard(ref_params[name].grad, p, rank, world)
        assert p.grad.dtype == torch.float32  # the parameters' own dtype, as under F.linear
        e = ((p.grad - expected).abs().max() / expected.abs().max()).item()
        if e >= err:
            worst, err = name, e
    return dict(loss=abs(losses[1] - losses[0]) / losses[0], grad=err, worst=worst)


@pytest.mark.parametrize("sp", [False, True])
def test_tp_under_bf16_autocast_matches_single_process(sp):
    for rank, r in enumerate(run_ranks(_tp_autocast_case, 2, sp, timeout=120)):
        assert r["loss"] < 1e-3, r  # bf16: the partial sums are rounded before they are reduced
        assert r["grad"] < 3e-2, f"rank {rank}: gradient of {r['worst']} differs by {r['grad']:.3g} (relative)"
