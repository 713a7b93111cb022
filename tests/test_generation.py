"""The KV-cache sampler equals a cache-free reference loop; batching, stops, seeds and top-p behave."""

import pytest
import torch

from megallama.errors import UserError
from megallama.eval.lm import load_model
from megallama.eval.tiny import build_tiny_checkpoint
from megallama.generation import SamplingParams, generate, sample_top_p

PROMPTS = ["def foo(x):", "import os\nimport sys\n\nclass Parser(object):\n    def", "x = 1"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)  # tiny matrices: extra threads only spin on the shared CI cores
    return load_model(build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny"))))


def reference_greedy(lm, prompt, n):
    """No cache, no batch: the full sequence through the model at every step."""
    ids = lm.tokenizer.encode(prompt, bos=True)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(lm.model(input_ids=torch.tensor([ids + out])).logits[0, -1, : lm.vocab_size].argmax())
            if nxt == lm.tokenizer.eos_id:
                break
            out.append(nxt)
    return out


def test_batched_greedy_equals_reference_per_prompt(lm):
    got = generate(lm, PROMPTS, SamplingParams(max_new_tokens=10))
    for prompt, g in zip(PROMPTS, got):
        want = reference_greedy(lm, prompt, 10)
        assert g.tokens == want
        tok = lm.tokenizer
        prompt_text = tok.decode(tok.encode(prompt, bos=True))
        assert g.text == tok.decode(tok.encode(prompt, bos=True) + want)[len(prompt_text):]
        assert g.finish_reason in ("length", "eos")


def test_stop_sequence_cuts_text_and_ends_the_row(lm):
    full = generate(lm, PROMPTS, SamplingParams(max_new_tokens=12))
    stop = full[0].text[3:5]  # a string the greedy completion of the first prompt contains
    got = generate(lm, PROMPTS, SamplingParams(max_new_tokens=12, stop=(stop,)))
    assert got[0].finish_reason == "stop" and got[0].text == full[0].text[: full[0].text.index(stop)]
    for f, g in zip(full[1:], got[1:]):  # other rows are unaffected unless they contain the stop too
        assert g.text == (f.text[: f.text.index(stop)] if stop in f.text else f.text)


def test_sampling_is_reproducible_by_seed_and_top_p_tiny_is_greedy(lm):
    p = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    a, b = generate(lm, PROMPTS, p), generate(lm, PROMPTS, p)
    assert [x.tokens for x in a] == [x.tokens for x in b]
    c = generate(lm, PROMPTS, SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=8))
    assert [x.tokens for x in a] != [x.tokens for x in c]
    nucleus_of_one = generate(lm, PROMPTS, SamplingParams(max_new_tokens=8, temperature=0.7, top_p=1e-6, seed=1))
    greedy = generate(lm, PROMPTS, SamplingParams(max_new_tokens=8))
    assert [x.tokens for x in nucleus_of_one] == [x.tokens for x in greedy]


def test_sampled_row_equals_generating_it_alone(lm):
    """Each row samples from its own generator seeded from (seed, row): the batch around it (other
    prompts, other lengths, a larger batch) does not change it.  With one shared generator it did."""
    p = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=3)
    batch = generate(lm, PROMPTS, p)
    for b, prompt in enumerate(PROMPTS):
        assert generate(lm, [prompt], p, rows=[b])[0].tokens == batch[b].tokens
    wider = generate(lm, ["hello", "a much longer prompt than the others, " * 3] + PROMPTS, p, rows=[7, 8, 0, 1, 2])
    assert [g.tokens for g in wider[2:]] == [g.tokens for g in batch]
    assert len({tuple(g.tokens) for g in generate(lm, [PROMPTS[0]] * 4, p)}) > 1  # rows differ from each other


def test_sample_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    g = torch.Generator().manual_seed(0)
    seen = {int(sample_top_p(probs.clone(), 0.75, [g])) for _ in range(300)}
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.75; 2 and 3 are never drawn


def test_invalid_parameters_are_user_errors(lm):
    with pytest.raises(UserError, match="--top-p"):
        generate(lm, ["a"], SamplingParams(top_p=0))
    with pytest.raises(UserError, match="--temperature"):
        generate(lm, ["a"], SamplingParams(temperature=-1))
    with pytest.raises(UserError, match="no room"):
        generate(lm, ["a"], SamplingParams(max_new_tokens=lm.max_seq_len))


def test_too_long_prompt_keeps_bos_and_its_end(lm):
    long_prompt = "x = 1\n" * 400
    got = generate(lm, [long_prompt], SamplingParams(max_new_tokens=4))[0]
    ids = lm.tokenizer.encode(long_prompt, bos=True)
    kept = ids[:1] + ids[len(ids) - (lm.max_seq_len - 4) + 1:]
    out = []
    with torch.no_grad():
        for _ in range(4):
            out.append(int(lm.model(input_ids=torch.tensor([kept + out])).logits[0, -1, : lm.vocab_size].argmax()))
    if lm.tokenizer.eos_id in out:
        out = out[: out.index(lm.tokenizer.eos_id)]
    assert got.tokens == out


def test_completion_keeps_its_leading_space_with_a_dummy_prefix_tokenizer(tmp_path):
    """Meta's tokenizer (dummy prefix, identity normalisation) drops the leading space of ids decoded
    alone; a completion must read as it does after the prompt, or HumanEval bodies lose indentation."""
    from megallama.eval.lm import load_tokenizer
    from megallama.generation import decode_after
    from tests.synthetic import meta_style_tokenizer

    tok = load_tokenizer(meta_style_tokenizer(tmp_path / "tok.model"))
    prompt = tok.encode('def f(x):\n    """Identity."""\n', bos=True)
    body = tok.encode('def f(x):\n    """Identity."""\n    return x', bos=True)[len(prompt):]
    assert decode_after(tok, prompt, body) == "    return x"

    class Fixed:  # a "model" that always continues with the body's tokens, then EOS
        tokenizer, max_seq_len = tok, 64

        def new_cache(self, b, n):
            return None

        def logits_cached(self, tokens, start, cache):
            pos = start + tokens.shape[1] - len(prompt)
            nxt = body[pos] if 0 <= pos < len(body) else tok.eos_id
            out = torch.full((tokens.shape[0], tokens.shape[1], tok.vocab_size), -1e9)
            out[:, -1, nxt] = 0.0
            return out

    got = generate(Fixed(), [tok.decode(prompt)], SamplingParams(max_new_tokens=len(body) + 1))[0]
    assert got.tokens == body and got.text == "    return x"
