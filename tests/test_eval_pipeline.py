"""Benchmark tasks scored during training at pp > 1: the last stage computes down the pipeline and
broadcasts the results; every rank gets the figures the whole model gives at pp=1."""

import os

import pytest

from tests.distributed import run_ranks

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "eval")
SETTINGS = ["parallel.pp=2", "model.vocab_size=400", "model.init_std=0.2", "train.global_batch_size=4"]


def _figures(results):
    return [(r.task, {k: v for k, v in r.metrics.items()}, r.records) for r in results]


def _pp_vs_whole(rank, world, tok_path, layout):
    import torch

    from megallama.config import load_config, validate
    from megallama.eval.harness import EvalOptions, TaskSpec, evaluate, evaluate_during_training, prepare_task
    from megallama.eval.lm import MegallamaAdapter, load_tokenizer
    from megallama.model import Transformer, init_parameters
    from tests.synthetic import synthetic_engine

    cfg = validate(load_config(None, SETTINGS + layout, preset="tiny"), world)
    env = synthetic_engine(cfg, world)  # this rank's stage, built and initialised as `megallama train` does
    tok = load_tokenizer(tok_path)
    opts = EvalOptions(max_new_tokens=4, batch_size=3)
    tasks = [prepare_task(TaskSpec(*t), opts) for t in (
        ("boolq", os.path.join(FIX, "boolq_dev.jsonl")),  # shared contexts and "Answer:" requests
        ("naturalquestions", os.path.join(FIX, "NQ-open.dev.jsonl")),  # cached greedy generation
        ("perplexity", os.path.join(FIX, "text.txt")))]
    got = evaluate_during_training(env.engine.module, cfg.model, tok, tasks, opts, None, 1, env.ctx)
    whole = Transformer(cfg.model)  # pp=1: the layout-independent init of the same seed
    init_parameters(whole.named_parameters(), cfg.model, cfg.train.seed, whole.ctx)
    with torch.no_grad():
        want = evaluate(MegallamaAdapter(whole, cfg.model, tok), tasks, opts)
    assert env.engine.module.training  # put back in training mode
    return (env.ctx.pp_rank, env.ctx.tp_rank, env.ctx.dp_rank), _figures(got), _figures(want)


@pytest.mark.slow
@pytest.mark.parametrize("world,layout", [(2, []), (4, ["parallel.tp=2"]), (4, ["parallel.dp=2"])],
                         ids=["pp2", "pp2-tp2", "pp2-dp2"])
def test_task_evaluation_at_pp2_equals_pp1(tmp_path, world, layout):
    from tests.synthetic import meta_style_tokenizer

    tok = meta_style_tokenizer(tmp_path / "tok.model")
    out = run_ranks(_pp_vs_whole, world, tok, layout, timeout=240)
    assert sorted(o[0][0] for o in out) == [0] * (world // 2) + [1] * (world // 2)
    assert len({o[0] for o in out}) == world
    for _, got, want in out:
        assert [g[0] for g in got] == [w[0] for w in want] == ["boolq", "naturalquestions", "perplexity"]
        for (_, gm, gr), (_, wm, wr) in zip(got, want):
            assert gm.keys() == wm.keys()
            for k in gm:
                assert gm[k] == (pytest.approx(wm[k], rel=1e-5) if isinstance(wm[k], float) else wm[k]), k
            for a, b in zip(gr, wr):
                assert a.keys() == b.keys()
                for k in a:
                    assert a[k] == (pytest.approx(b[k], abs=1e-4) if k in ("logprobs", "mc2") else b[k]), k
    assert all(o[1] == out[0][1] for o in out)  # the broadcast: every stage returns the same results


def test_task_evaluation_is_accepted_with_pipeline_stages():
    from megallama.config import load_config, validate

    cfg = validate(load_config(None, SETTINGS + ["train.eval_tasks=[boolq=x.jsonl]", "train.task_eval_interval=5"],
                               preset="tiny"), 2)
    assert cfg.parallel.pp == 2 and cfg.train.eval_tasks == ["boolq=x.jsonl"]
