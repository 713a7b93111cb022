"""`megallama eval` / `megallama generate` end to end, and generation-scored tasks against a reference."""

import json
import os
import subprocess
import sys

import pytest
import torch

from megallama.eval import harness
from megallama.eval.formats import FORMATS
from megallama.eval.harness import EvalOptions, TaskSpec, fewshot_prefix
from megallama.eval.lm import load_model
from megallama.eval import metrics
from megallama.eval.tiny import build_tiny_checkpoint
from megallama.generation import SamplingParams, generate

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "eval")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = "import sys; from megallama import cli; sys.exit(cli.main())"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def lm(ckpt):
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)  # tiny matrices: extra threads only spin on the shared CI cores
    return load_model(ckpt)


def cli(*args):
    return subprocess.run([sys.executable, "-c", RUNNER, *args], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize("name,path,fewshot,shots", [
    ("naturalquestions", "NQ-open.dev.jsonl", "NQ-open.train.jsonl", 1),
    ("triviaqa", "unfiltered-web-dev.json", "", 0),
    ("gsm8k", "gsm8k_test.jsonl", "gsm8k_test.jsonl", 1),
    ("math", "MATH/test", "", 0),
])
def test_generation_tasks_score_the_greedy_completion(lm, name, path, fewshot, shots):
    spec = TaskSpec(name, os.path.join(FIX, path), os.path.join(FIX, fewshot) if fewshot else "")
    opts = EvalOptions(shots=shots, max_new_tokens=6, batch_size=2)
    result = harness.evaluate_task(lm, spec, opts)
    fmt = FORMATS[name]
    examples = fmt.reader(spec.path)
    pool = fmt.reader(spec.fewshot_path) if shots else []
    for ex, rec in zip(examples, result.records):
        prompt = fewshot_prefix(ex, pool, shots, fmt.separator, opts.seed) + ex.context
        if pool:
            assert ex.demo not in prompt  # drawn from the same file, but never the question itself
        want = generate(lm, [prompt], SamplingParams(max_new_tokens=6, stop=fmt.stop))[0].text
        assert rec["samples"] == [want]
        if fmt.answer is None:
            assert rec["correct"] == metrics.exact_match(want, ex.answers)
        else:
            assert rec["correct"] == (fmt.answer(want) == ex.answers[0])


def test_readers_extract_gold_answers():
    assert [e.answers[0] for e in FORMATS["gsm8k"].reader(os.path.join(FIX, "gsm8k_test.jsonl"))] == ["72", "10"]
    assert [e.answers[0] for e in FORMATS["math"].reader(os.path.join(FIX, "MATH/test"))] == ["5", "\\frac{1}{2}"]
    tqa = FORMATS["triviaqa"].reader(os.path.join(FIX, "unfiltered-web-dev.json"))
    assert tqa[0].answers[:2] == ["Sinclair Lewis", "Sinclair Lewis"] and tqa[0].context.endswith("1930?\nA:")
    wg = FORMATS["winogender"].reader(os.path.join(FIX, "all_sentences.tsv"))
    assert wg[0].context.endswith("Here, 'he' refers to the") and wg[0].choices == [" technician", " customer"]
    assert wg[0].gold == 1 and wg[0].group == "his/him/he" and wg[2].group == "their/them/someone"
    hs = FORMATS["hellaswag"].reader(os.path.join(FIX, "hellaswag_val.jsonl"))
    assert hs[0].context == "Roof shingle removal: A man is sitting on a roof. He" and "[" not in hs[2].context


@pytest.mark.slow
def test_eval_cli_writes_json_and_markdown(ckpt, tmp_path):
    out = tmp_path / "results.json"
    r = cli("eval", "--checkpoint", ckpt, "--task", f"boolq={FIX}/boolq_dev.jsonl", "--task", f"mmlu={FIX}/mmlu/test",
            "--fewshot", f"mmlu={FIX}/mmlu/dev", "--shots", "mmlu=2", "--task", "humaneval", "--limit", "2",
            "--max-new-tokens", "4", "--output", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"boolq", "mmlu", "humaneval"}
    assert data["results"]["boolq"]["n"] == 2 and len(data["results"]["boolq"]["records"]) == 2
    assert data["results"]["humaneval"]["metrics"]["pass@1"] == 0.0
    table = (tmp_path / "results.md").read_text()
    assert "| boolq | acc |" in table and "| humaneval | pass@1 | 0.0 | 2 |" in table
    assert "| Model | boolq | mmlu | humaneval |" in table
    again = cli("eval", "--checkpoint", ckpt, "--task", f"boolq={FIX}/boolq_dev.jsonl", "--output", str(out))
    assert again.returncode == 2 and "already exists" in again.stderr and "--force" in again.stderr


@pytest.mark.parametrize("args,message", [
    (["--task", "squad=x.jsonl"], "unknown task 'squad'"),
    (["--task", "boolq=/nonexistent.jsonl"], "/nonexistent.jsonl not found"),
    (["--task", "boolq"], "task boolq needs a file"),
    (["--task", f"boolq={FIX}/boolq_dev.jsonl", "--shots", "1"], "--fewshot boolq=PATH"),
    (["--task", f"boolq={FIX}/boolq_dev.jsonl", "--shots", "x=1"], "--shots x=... names no --task"),
    (["--task", f"boolq={FIX}/piqa_valid.jsonl"], "has neither 'answer' nor 'label'"),
    (["--task", "humaneval", "--samples", "2", "--pass-k", "5"], "--pass-k"),
    (["--task", f"boolq={FIX}/boolq_dev.jsonl", "--output", "/nonexistent-dir/results.json"],
     "directory /nonexistent-dir does not exist"),
])
def test_eval_cli_errors_exit_2(ckpt, args, message):
    r = cli("eval", "--checkpoint", ckpt, *args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_mmlu_subject_without_dev_file_is_refused(tmp_path):
    """A test subject with no dev questions gets no shots from other subjects: a one-line error naming
    the subject and its missing dev file, before the model loads (it silently used other subjects)."""
    import shutil

    test, dev = tmp_path / "test", tmp_path / "dev"
    shutil.copytree(os.path.join(FIX, "mmlu", "test"), test)
    shutil.copytree(os.path.join(FIX, "mmlu", "dev"), dev)
    shutil.copy(test / "high_school_physics_test.csv", test / "astronomy_test.csv")
    r = cli("eval", "--checkpoint", str(tmp_path / "no-such-checkpoint"), "--task", f"mmlu={test}",
            "--fewshot", f"mmlu={dev}", "--shots", "2")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "'astronomy'" in r.stderr and "astronomy_dev.csv" in r.stderr and str(dev) in r.stderr, r.stderr
    ok = harness.prepare_task(TaskSpec("mmlu", str(test / "high_school_physics_test.csv"), str(dev), 2), EvalOptions())
    assert all("Light travels" in p and "unit of force" in p for p in ok.prefixes)  # its own subject's shots still work


@pytest.mark.parametrize("args,message", [
    (["--task", f"boolq={FIX}/boolq_dev.jsonl", "--norm", "bogus"], "unknown --norm 'bogus'"),
    (["--task", "humaneval", "--norm", "bogus"], "unknown --norm 'bogus'"),  # was silently ignored
    (["--task", "humaneval", "--norm", "char"], "--norm char only applies to multiple-choice tasks"),
])
def test_eval_norm_is_checked_before_the_model_loads(tmp_path, args, message):
    """--norm is checked up front: a missing checkpoint would be reported first if it loaded before."""
    r = cli("eval", "--checkpoint", str(tmp_path / "no-such-checkpoint"), *args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.slow
def test_generate_cli(ckpt, lm):
    r = cli("generate", "--checkpoint", ckpt, "--prompt", "def foo(x):", "--prompt", "x = 1",
            "--max-new-tokens", "5", "--json")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    want = generate(lm, ["def foo(x):", "x = 1"], SamplingParams(max_new_tokens=5))
    assert [x["completion"] for x in lines] == [w.text for w in want]
    bad = cli("generate", "--checkpoint", ckpt, "--prompt", "a", "--top-p", "0")
    assert bad.returncode == 2 and "--top-p" in bad.stderr
    missing = cli("generate", "--checkpoint", "/nonexistent", "--prompt", "a")
    assert missing.returncode == 2 and "checkpoint /nonexistent not found" in missing.stderr


def test_majority_vote_over_samples(lm):
    spec = TaskSpec("gsm8k", os.path.join(FIX, "gsm8k_test.jsonl"))
    opts = EvalOptions(samples=3, temperature=0.8, top_p=0.95, max_new_tokens=5, batch_size=4)
    result = harness.evaluate_task(lm, spec, opts)
    again = harness.evaluate_task(lm, spec, opts)
    assert [r["samples"] for r in result.records] == [r["samples"] for r in again.records]  # seeded
    for rec in result.records:
        assert len(rec["samples"]) == 3
        assert rec["prediction"] == (metrics.majority_vote([metrics.gsm8k_answer(s) for s in rec["samples"]]) or "")
        assert rec["correct"] == (rec["prediction"] == rec["answers"][0])
    assert set(result.metrics) == {"maj1@3"}


def test_samples_do_not_depend_on_batch_size(lm):
    """pass@k / maj1@k samples are seeded per sample, not per batch: --batch-size changes no sample."""
    spec = TaskSpec("gsm8k", os.path.join(FIX, "gsm8k_test.jsonl"))
    runs = [harness.evaluate_task(lm, spec, EvalOptions(samples=3, temperature=1.0, top_p=0.95, max_new_tokens=5,
                                                       batch_size=bs)) for bs in (1, 4, 64)]
    assert any(len(set(r["samples"])) > 1 for r in runs[0].records)  # the draws of one prompt differ
    assert [r["samples"] for r in runs[0].records] == [r["samples"] for r in runs[1].records] \
        == [r["samples"] for r in runs[2].records]


def test_markdown_and_tensorboard_logging(lm, tmp_path):
    results = [harness.TaskResult("boolq", {"acc": 0.5, "acc_none": 0.25}, [], 2),
               harness.TaskResult("perplexity", {"perplexity": 12.345}, [], 1)]
    assert harness.markdown_table(results).splitlines()[2:] == ["| boolq | acc | 50.0 | 2 |",
                                                                "| perplexity | perplexity | 12.35 | 1 |"]

    class Writer:
        def __init__(self):
            self.calls = []

        def add_scalar(self, tag, value, step):
            self.calls.append((tag, value, step))

    w = Writer()
    harness.log_to_tensorboard(w, results, 100)
    assert w.calls == [("eval/boolq/acc", 0.5, 100), ("eval/perplexity/perplexity", 12.345, 100)]
    out = tmp_path / "r.json"
    harness.write_results(results, str(out), {"x": 1})
    assert json.loads(out.read_text())["results"]["boolq"]["metrics"]["acc"] == 0.5
    with pytest.raises(Exception, match="already exists"):
        harness.write_results(results, str(out), {})
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("name,content,message", [
    ("piqa", '{"goal": "g"}\n', "missing field 'sol1'"),
    ("arc_easy", '{"question": {"stem": "s"}, "answerKey": "A"}\n', "missing field 'choices'"),
    ("winogrande", '{"sentence": "a _ b", "option1": "x", "answer": "1"}\n', "missing field 'option2'"),
    ("naturalquestions", '{"question": "q", "answer": []}\n', "not a valid naturalquestions file"),
    ("triviaqa", '{"question": "q"}\n', "not a valid triviaqa file"),
    ("hellaswag", '{"ctx_b": "x", "endings": ["a"], "label": 3}\n', "not a valid hellaswag file"),
    ("choice", '{"context": "c", "choices": ["a", "b"], "gold": -1}\n', "answer index -1 but 2 choices"),
    ("truthfulqa_mc", "[]", "has no truthfulqa_mc examples"),
])
def test_malformed_task_records_are_one_line_errors(ckpt, tmp_path, name, content, message):
    path = tmp_path / ("task.json" if name == "truthfulqa_mc" else "task.jsonl")
    path.write_text(content)
    if name == "piqa":
        (tmp_path / "task-labels.lst").write_text("0\n")
    r = cli("eval", "--checkpoint", ckpt, "--task", f"{name}={path}")
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_tasks_sharing_a_name_keep_distinct_keys_in_results(lm, tmp_path):
    """Two `choice` files (and the same file twice) in one run: results.json keeps every task."""
    other = tmp_path / "other.jsonl"
    other.write_text('{"context": "1 + 1 =", "choices": [" 2", " 3"], "gold": 0}\n')
    generic = os.path.join(FIX, "generic_choice.jsonl")
    specs = [TaskSpec("choice", generic), TaskSpec("choice", str(other)), TaskSpec("choice", generic, shots=0),
             TaskSpec("perplexity", os.path.join(FIX, "text.txt"))]
    results = harness.evaluate(lm, specs, EvalOptions())
    keys = ["choice:generic_choice.jsonl", "choice:other.jsonl", "choice:generic_choice.jsonl#2", "perplexity"]
    assert [r.task for r in results] == keys == harness.task_keys(specs)
    out = tmp_path / "r.json"
    harness.write_results(results, str(out), {})
    saved = json.loads(out.read_text())["results"]
    assert list(saved) == keys and saved["choice:other.jsonl"]["n"] == 1
    assert saved["choice:generic_choice.jsonl"] == saved["choice:generic_choice.jsonl#2"]


def test_a_tokenizer_larger_than_the_models_vocabulary_is_one_line(ckpt, tmp_path):
    """A tokenizer of another model (more pieces than the embedding has rows) next to the weights used
    to fail as an index error in the first forward of eval/generate."""
    import shutil

    other = build_tiny_checkpoint(str(tmp_path / "other"), vocab_size=640, n_layers=1)
    model_dir = tmp_path / "model"
    shutil.copytree(ckpt, model_dir)
    shutil.copy(os.path.join(other, "tokenizer.model"), model_dir / "tokenizer.model")
    r = cli("generate", "--checkpoint", str(model_dir), "--prompt", "x = 1", "--max-new-tokens", "2")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "has 640 pieces but the model" in r.stderr and "vocabulary of 512" in r.stderr, r.stderr
