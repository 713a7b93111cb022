"""The fused output projection + cross-entropy equals ``F.cross_entropy`` on materialised logits:
loss and the gradients of input and weight, for any chunking, padded vocabulary rows, token
weights (masked means), bf16, no-grad evaluation, and split over 2 tensor-parallel ranks."""

import pytest
import torch
import torch.nn.functional as F

from parallel.cross_entropy import linear_cross_entropy, vocab_parallel_cross_entropy
from tests.distributed import run_ranks

TOKENS, DIM, VOCAB, PADDED = 37, 16, 50, 52  # two padded rows beyond the real vocabulary


def _inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, DIM, generator=g).to(dtype)
    w = (torch.randn(PADDED, DIM, generator=g) * 0.5).to(dtype)
    target = torch.randint(0, VOCAB, (TOKENS,), generator=g)
    mask = (torch.rand(TOKENS, generator=g) > 0.3).float()
    return x, w, target, mask


def _reference(x, w, target, mask=None):
    """The unfused computation in fp64: logits, padded columns dropped, (masked) mean loss."""
    x, w = x.double().requires_grad_(), w.double().requires_grad_()
    losses = F.cross_entropy((x @ w.t())[:, :VOCAB], target, reduction="none")
    loss = losses.mean() if mask is None else (losses * mask).sum() / mask.sum()
    loss.backward()
    return loss.detach(), x.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 5, TOKENS, 1000])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_loss_and_gradients_equal_unfused(chunk, masked):
    x, w, target, mask = _inputs()
    ref_loss, ref_gx, ref_gw = _reference(x, w, target, mask if masked else None)
    x.requires_grad_(), w.requires_grad_()
    weights = mask / mask.sum() if masked else None
    loss = linear_cross_entropy(x, w, target, weights, vocab_size=VOCAB, chunk=chunk)
    (loss * 3.0).backward()  # the stored gradients scale with the incoming one
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), 3.0 * ref_gx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), 3.0 * ref_gw, rtol=1e-5, atol=1e-6)
    assert w.grad[VOCAB:].abs().max() == 0  # padded rows never receive gradient


def test_fused_matches_unfused_vocab_parallel_form():
    x, w, target, _ = _inputs(seed=1)
    a = linear_cross_entropy(x, w, target, vocab_size=VOCAB, chunk=7)
    b = vocab_parallel_cross_entropy(x @ w.t(), target, vocab_size=VOCAB).mean()
    torch.testing.assert_close(a, b)


def test_bf16_inputs_give_fp32_accurate_loss_and_bf16_gradients():
    x, w, target, _ = _inputs(torch.bfloat16, seed=2)
    ref_loss, ref_gx, ref_gw = _reference(x, w, target)
    x.requires_grad_(), w.requires_grad_()
    loss = linear_cross_entropy(x, w, target, vocab_size=VOCAB, chunk=8)
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == w.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(w.grad.double(), ref_gw, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(x.grad.double(), ref_gx, rtol=2e-2, atol=2e-3)


def test_no_grad_evaluation_returns_the_same_loss():
    x, w, target, _ = _inputs(seed=3)
    with torch.no_grad():
        loss = linear_cross_entropy(x, w.requires_grad_(), target, vocab_size=VOCAB)
    assert not loss.requires_grad
    torch.testing.assert_close(loss.double(), _reference(x.detach(), w.detach(), target)[0])


def _tp_case(rank, world):
    import torch.distributed as dist

    x, w, target, mask = _inputs(seed=4)
    ref = _reference(x, w, target, mask)
    rows = PADDED // world
    local = w[rank * rows:(rank + 1) * rows].clone().requires_grad_()
    x = x.clone().requires_grad_()
    loss = linear_cross_entropy(x, local, target, mask / mask.sum(), group=dist.group.WORLD, vocab_size=VOCAB,
                                chunk=6)
    loss.backward()
    # each rank holds the full loss, the gradient of its weight rows, and its part of the input gradient
    grad_x = x.grad.clone()
    dist.all_reduce(grad_x)
    return {"loss": (loss.item(), ref[0].item()),
            "gx": (grad_x - ref[1]).abs().max().item(),
            "gw": (local.grad.double() - ref[2][rank * rows:(rank + 1) * rows]).abs().max().item()}


def test_vocab_parallel_fused_loss_equals_single_process():
    for res in run_ranks(_tp_case, 2, timeout=120):
        assert res["loss"][0] == pytest.approx(res["loss"][1], rel=1e-6)
        assert res["gx"] < 1e-6 and res["gw"] < 1e-6


def test_default_chunk_follows_the_device():
    """8 MiB of fp32 logits on CPU (fastest there); 256 MiB on a GPU, where each chunk's pass over
    the fp32 weight-gradient accumulator is what costs (LLaMA's vocabulary: 65 vs 2097 tokens)."""
    from parallel.cross_entropy import chunk_rows

    assert chunk_rows(32000, torch.device("cpu")) == 65
    assert chunk_rows(32000, torch.device("cuda")) == 2097
    assert chunk_rows(16000, torch.device("cuda")) == 4194  # a TP=2 shard: twice the tokens
    assert chunk_rows(1 << 30, torch.device("cpu")) == 1  # never zero
