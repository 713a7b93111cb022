"""Finetuning: document-aware attention, instruction data with a loss mask, bad-data errors,
``--init-from`` / ``--resume``, and (slow) the shipped example lifting a held-out metric."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from megallama.data.instruct import (InstructDataset, InstructionSet, pack_rows, preprocess_instruct, render_prompt,
                                     split_instruct_batch, tokenize_example)
from megallama.data.tokenizer import Tokenizer, train_tokenizer
from megallama.errors import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = "import sys; from megallama import cli; sys.exit(cli.main())"


def cli(*args, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, "-c", RUNNER, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    """A 512-piece tokenizer trained on standard-library text (as a pretrained model's would be)."""
    from megallama.data.pipeline import stdlib_files

    out = tmp_path_factory.mktemp("tok")
    texts = [p.read_text() for p in stdlib_files(200_000)]
    return str(train_tokenizer(texts, 512, str(out / "tok"), sample_mb=0.3, threads=1))


@pytest.fixture(scope="module")
def tok(tokenizer_path):
    return Tokenizer(tokenizer_path)


# ----------------------------------------------------------------------------- attention over packed documents

def test_document_layout_restarts_positions_and_masks_across_documents():
    from megallama.model import document_layout

    positions, mask = document_layout(torch.tensor([[0, 0, 1, 1, 1, 2]]))
    assert positions.tolist() == [[0, 1, 0, 1, 2, 0]]
    doc = [0, 0, 1, 1, 1, 2]
    expected = [[doc[q] == doc[k] and k <= q for k in range(6)] for q in range(6)]
    assert mask.shape == (1, 1, 6, 6) and mask[0, 0].tolist() == expected


def test_packed_examples_compute_exactly_what_they_compute_alone():
    from megallama.config import preset_config
    from megallama.model import build_model

    model = build_model(preset_config("tiny").model).eval()
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randint(3, 500, (1, 10), generator=gen), torch.randint(3, 500, (1, 7), generator=gen)
    packed = torch.cat([a, b, torch.full((1, 3), 2)], dim=1)
    docs = torch.tensor([[0] * 10 + [1] * 7 + [2] * 3])
    with torch.no_grad():
        out = model(packed, doc_ids=docs)
        torch.testing.assert_close(out[:, :10], model(a), rtol=0, atol=1e-5)
        torch.testing.assert_close(out[:, 10:17], model(b), rtol=0, atol=1e-5)
        # one document is the plain causal model, bit for bit
        assert torch.equal(model(packed, doc_ids=torch.zeros_like(docs)), model(packed))


@pytest.mark.parametrize("checkpointing", ["full", "selective"])
def test_activation_checkpointing_recomputes_packed_attention_exactly(checkpointing):
    from megallama.config import preset_config
    from megallama.model import Transformer

    cfg = preset_config("tiny").model
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, 500, (2, 16), generator=gen)
    docs = torch.tensor([[0] * 5 + [1] * 11, [0] * 9 + [1] * 4 + [2] * 3])
    mask = (torch.rand(2, 16, generator=gen) > 0.5).long()
    grads = []
    for mode in ("none", checkpointing):
        model = Transformer(cfg, checkpointing=mode).init_weights(7)
        model(tokens, torch.roll(tokens, -1, 1), mask, doc_ids=docs).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- rendering and the loss mask

def test_conversation_tokens_and_mask_cover_exactly_the_responses(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Sum 2 3"},
                {"role": "assistant", "content": "5"}]
    ids, mask = tokenize_example(messages, tok, "alpaca")
    parts = [([tok.bos_id], 0), (tok.encode("Be brief.\n\n"), 0), (tok.encode("### Instruction:\nHi?\n\n### Response:\n"), 0),
             (tok.encode("Hello.") + [tok.eos_id], 1), (tok.encode("### Instruction:\nSum 2 3\n\n### Response:\n"), 0),
             (tok.encode("5") + [tok.eos_id], 1)]
    assert ids.tolist() == [i for p, _ in parts for i in p]
    assert mask.tolist() == [m for p, m in parts for _ in p]
    # the eval context of a prompt is exactly the untrained text before its response
    assert tok.encode(render_prompt("Hi?", system="Be brief.")) == tok.encode("Be brief.\n\n") + parts[2][0]


def test_pieces_after_the_first_get_no_dummy_prefix(tmp_path, tok):
    """With a Meta-style tokenizer (dummy prefix) an example decodes to its rendered text: a response
    (or a later turn) is tokenized as it continues the text, without a space put in front of it."""
    from tests.synthetic import meta_style_tokenizer

    meta = Tokenizer(meta_style_tokenizer(tmp_path / "meta.model"))
    messages = [{"role": "user", "content": "Name a loop."}, {"role": "assistant", "content": "for x in y:"},
                {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "while True:"}]
    ids, mask = tokenize_example(messages, meta, "alpaca")
    first, response = render_prompt("Name a loop."), "for x in y:"
    text = first + response + "### Instruction:\nAnother?\n\n### Response:\n" + "while True:"
    assert meta.decode([i for i in ids.tolist() if i not in (meta.bos_id, meta.eos_id)]) == text
    trained = [i for i, m in zip(ids.tolist(), mask.tolist()) if m and i != meta.eos_id]
    assert meta.decode(trained[:len(meta.encode_continuation(response))]) == response  # not " for x in y:"
    assert meta.encode(response) != meta.encode_continuation(response)  # the dummy prefix is real here
    # megallama's own tokenizers have no dummy prefix: there a continuation encodes as a start does
    assert tok.encode_continuation(" for x in y:") == tok.encode(" for x in y:")


def test_preprocess_reads_back_and_packs_whole_examples(tmp_path, tok, tokenizer_path):
    rows = [{"prompt": f"Is {n} even or odd?", "response": ["even", "odd"][n % 2]} for n in range(40)]
    rows[3] = {"instruction": "Add", "input": "2 and 3", "output": "5"}
    rows[5] = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    write_jsonl(tmp_path / "d.jsonl", rows)
    report = preprocess_instruct([str(tmp_path / "d.jsonl")], tokenizer_path, str(tmp_path / "p"), seq_len=128)
    examples = InstructionSet(str(tmp_path / "p"))
    assert report.examples == len(examples) == 40 and examples.where(7) == f"{tmp_path / 'd.jsonl'}:8"
    from megallama.data.instruct import parse_example

    for i, row in enumerate(rows):
        ids, mask = tokenize_example(parse_example(row, "x"), tok, "alpaca")
        got = examples.example(i)
        assert got[0].tolist() == ids.tolist() and got[1].tolist() == mask.tolist()

    lengths = examples.lengths
    order = np.random.default_rng(0).permutation(40)
    packed = pack_rows(lengths, order, 129, packing=True)
    assert np.concatenate(packed).tolist() == order.tolist()  # every example once, whole, in order
    assert all(lengths[r].sum() <= 129 for r in packed) and max(len(r) for r in packed) > 1
    assert all(len(r) == 1 for r in pack_rows(lengths, order, 129, packing=False))

    ds = InstructDataset(examples, np.arange(40), 128, num_samples=30, packing=True, seed=(1,), pad_id=tok.eos_id)
    for i in range(len(ds)):
        row, at = ds[i], 0
        assert row.shape == (3, 129)
        for doc, e in enumerate(ds.rows[i].tolist()):
            ids, mask = examples.example(e)
            assert row[0, at:at + len(ids)].tolist() == ids.tolist() and row[1, at:at + len(ids)].tolist() == mask.tolist()
            assert (row[2, at:at + len(ids)] == doc).all()
            at += len(ids)
        assert (row[0, at:] == tok.eos_id).all() and (row[1, at:] == 0).all() and (row[2, at:] == len(ds.rows[i])).all()

    (inputs, docs), (targets, loss_mask) = split_instruct_batch(torch.from_numpy(np.stack([ds[0], ds[1]])))
    assert torch.equal(targets[:, :-1], inputs[:, 1:]) and torch.equal(loss_mask, torch.from_numpy(np.stack([ds[0][1, 1:], ds[1][1, 1:]])))
    assert torch.equal(docs, torch.from_numpy(np.stack([ds[0][2, :-1], ds[1][2, :-1]])))

    with pytest.raises(DataError, match=rf"{tmp_path / 'd.jsonl'}:\d+: example is \d+ tokens, longer than train.seq_len"):
        InstructDataset(examples, np.arange(40), 8, num_samples=4, packing=True, seed=(1,), pad_id=tok.eos_id)


# ----------------------------------------------------------------------------- bad data: one line, file:line, exit 2

GOOD = {"prompt": "Is 4 even or odd?", "response": "even"}


@pytest.mark.parametrize("bad,message", [
    ('{"prompt": "hi"}', "missing field 'response'"),
    ('{"prompt": "hi", "response": "  "}', "empty response"),
    ('{"prompt": "hi", "response"', "not valid JSON"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "must end with an 'assistant' message"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}',
     "messages[1]: empty response"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}',
     "messages[1]: expected the 'assistant' turn"),
    (json.dumps({"prompt": "Is 4 even or odd? " * 20, "response": "even"}),
     "example is %d tokens, longer than --seq-len + 1 = 65"),
    ('{"prompt": "cut \\udc00 off", "response": "even"}',
     "field 'prompt' holds a lone surrogate \\udc00 at character 4, not valid Unicode"),
], ids=["missing", "empty", "json", "no-response", "empty-turn", "alternation", "too-long", "surrogate"])
def test_bad_instruction_data_fails_in_one_line_naming_file_and_line(tmp_path, tok, tokenizer_path, bad, message):
    data = write_jsonl(tmp_path / "bad.jsonl", [GOOD, bad])
    if "%d" in message:
        message = message % (len(tokenize_example([{"role": "user", "content": json.loads(bad)["prompt"]},
                                                    {"role": "assistant", "content": "even"}], tok, "alpaca")[0]))
    r = cli("preprocess-instruct", "--input", data, "--tokenizer", tokenizer_path, "--output-prefix",
            tmp_path / "out", "--seq-len", 64)
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and line.startswith(f"megallama preprocess-instruct: error: {data}:2: ")
    assert message in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # nothing partially written


def test_truncate_cuts_over_long_examples_and_drops_those_left_without_response(tmp_path, tokenizer_path):
    long_prompt = {"prompt": "Is 4 even or odd? " * 20, "response": "even"}
    long_response = {"prompt": "Count", "response": "1 2 3 4 5 6 7 8 9 " * 10}
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD, long_prompt, long_response])
    r = cli("preprocess-instruct", "--input", data, "--tokenizer", tokenizer_path, "--output-prefix",
            tmp_path / "out", "--seq-len", 64, "--truncate")
    assert r.returncode == 0, r.stderr
    assert "2 examples" in r.stdout and "2 truncated, 1 dropped" in r.stdout
    examples = InstructionSet(str(tmp_path / "out"))
    assert examples.lengths.tolist()[1] == 65 and examples.where(1) == f"{data}:3"
    r = cli("preprocess-instruct", "--input", data, "--tokenizer", tokenizer_path, "--output-prefix",
            tmp_path / "out", "--seq-len", 64)
    assert r.returncode == 2 and "already exists; pass --force" in r.stderr


def test_train_refuses_resume_without_a_run_and_a_missing_init_checkpoint(tmp_path):
    r = cli("train", "--preset", "tiny", "--set", f"train.run_dir={tmp_path / 'run'}", "--resume")
    assert r.returncode == 2 and "--resume: train.run_dir" in r.stderr and "holds no checkpoint" in r.stderr
    r = cli("train", "--preset", "tiny", "--set", f"train.run_dir={tmp_path / 'run'}", "--init-from", tmp_path / "nope")
    assert r.returncode == 2 and f"no checkpoint at '{tmp_path / 'nope'}'" in r.stderr
    assert not (tmp_path / "run").exists()


def test_init_from_refuses_another_model_shape_or_tokenizer_before_starting(tmp_path, tokenizer_path):
    from megallama.checkpoint import write_checkpoint
    from megallama.config import load_config
    from megallama.model import build_model

    cfg = load_config(None, [], preset="tiny")
    ckpt = write_checkpoint(tmp_path / "ckpt", cfg, build_model(cfg.model).state_dict(),
                            extra_meta={"tokenizer_fingerprint": "0123456789abcdef"})
    run = ["train", "--preset", "tiny", "--set", f"train.run_dir={tmp_path / 'run'}", "--init-from", ckpt]
    r = cli(*run, "--set", "model.n_layers=2")
    assert r.returncode == 2 and "has model.n_layers=4 but the config says 2" in r.stderr, r.stderr
    r = cli(*run, "--set", "data.instruction=true", "--set", f"data.tokenizer={tokenizer_path}",
            "--set", f"data.sources=[{{path: {tmp_path / 'sft'}}}]")
    assert r.returncode == 2 and "was trained with another tokenizer (fingerprint 0123456789abcdef)" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_resume_refuses_data_of_another_tokenizer_before_starting(tmp_path, tokenizer_path):
    """Resuming a run whose checkpoint was trained with another tokenizer than data.tokenizer
    (same vocabulary size, other token ids) used to continue silently on mismatched ids."""
    import torch

    from megallama.checkpoint import MOMENTS, write_run_checkpoint
    from megallama.config import load_config
    from megallama.model import build_model

    cfg = load_config(None, [], preset="tiny")
    weights = build_model(cfg.model).state_dict()
    moments = {f"{n}/{k}": torch.zeros_like(w) for n, w in weights.items() for k in MOMENTS}
    run_dir = tmp_path / "run"
    write_run_checkpoint(run_dir, cfg, weights, moments, step=2, consumed_samples=16,
                         extra_meta={"tokenizer_fingerprint": "0123456789abcdef"})
    before = sorted(str(p) for p in run_dir.rglob("*"))
    r = cli("train", "--preset", "tiny", "--set", f"train.run_dir={run_dir}", "--set", f"data.tokenizer={tokenizer_path}",
            "--set", f"data.sources=[{{path: {tmp_path / 'data'}}}]")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "was trained with another tokenizer (fingerprint 0123456789abcdef)" in r.stderr, r.stderr
    assert sorted(str(p) for p in run_dir.rglob("*")) == before


# ----------------------------------------------------------------------------- the shipped example, end to end

def _accuracy(results_json):
    return json.loads(open(results_json).read())["results"]["choice"]["metrics"]["acc"]


@pytest.mark.slow
def test_finetune_demo_lifts_the_heldout_accuracy(tmp_path, tokenizer_path):
    """Pretrain briefly on plain text, eval, finetune with the shipped config (--init-from), eval again."""
    from megallama.data.pipeline import stdlib_files
    from tests.instruct_demo import write_parity_set

    files = write_parity_set(str(tmp_path / "parity"), n_train=800, n_heldout=200)
    write_jsonl(tmp_path / "base.jsonl", [{"text": p.read_text()} for p in stdlib_files(300_000)])
    small = ["--preset", "tiny", "--set", "train.seq_len=128", "--set", "model.max_seq_len=128",
             "--set", "train.tensorboard=false", "--set", f"data.tokenizer={tokenizer_path}"]
    steps = [
        ("preprocess", "--input", tmp_path / "base.jsonl", "--tokenizer", tokenizer_path, "--output-prefix", tmp_path / "base"),
        ("train", *small, "--set", "train.steps=30", "--set", f"train.run_dir={tmp_path / 'base_run'}",
         "--set", f"data.sources=[{{path: {tmp_path / 'base'}}}]"),
        ("preprocess-instruct", "--input", files["train"], "--tokenizer", tokenizer_path, "--seq-len", 128,
         "--output-prefix", tmp_path / "parity" / "train"),
        ("eval", "--checkpoint", tmp_path / "base_run", "--task", f"choice={files['heldout_choice']}",
         "--output", tmp_path / "before.json"),
        ("train", "--config", os.path.join(ROOT, "megallama/configs/finetune_demo.yaml"), *small,
         "--set", "train.steps=120", "--set", "train.global_batch_size=8", "--set", "optim.lr=3e-3",
         "--set", f"train.run_dir={tmp_path / 'ft_run'}", "--init-from", tmp_path / "base_run",
         "--set", f"data.sources=[{{path: {tmp_path / 'parity' / 'train'}}}]"),
        ("eval", "--checkpoint", tmp_path / "ft_run", "--task", f"choice={files['heldout_choice']}",
         "--output", tmp_path / "after.json"),
    ]
    for step in steps:
        r = cli(*step)
        assert r.returncode == 0, f"{step[0]} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        if step[0] == "train" and "--init-from" in step:
            assert "initialised weights from" in r.stdout and "step   1/120" in r.stdout  # a new run from step 0
    before, after = _accuracy(tmp_path / "before.json"), _accuracy(tmp_path / "after.json")
    print(f"held-out accuracy before finetuning {before:.1%}, after {after:.1%}")
    assert before < 0.7 and after >= 0.95, (before, after)


def test_failed_force_run_keeps_the_old_instruction_dataset(tmp_path, tokenizer_path):
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD, {"prompt": "Is 3 even or odd?", "response": "odd"}])
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD, '{"prompt": "hi", "response"'])
    preprocess_instruct([str(good)], tokenizer_path, str(tmp_path / "out"), seq_len=64)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("out")}
    with pytest.raises(DataError, match="not valid JSON"):
        preprocess_instruct([str(bad)], tokenizer_path, str(tmp_path / "out"), seq_len=64, force=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("out")} == before
    assert len(InstructionSet(str(tmp_path / "out"))) == 2
