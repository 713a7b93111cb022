"""Run benchmark tasks on a :class:`~megallama.eval.lm.LanguageModel` and collect metrics and records."""

from __future__ import annotations

import json
import math
import os
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional, Sequence

from megallama.atomic import write_text
from megallama.errors import DataError, UserError
from megallama.eval import metrics
from megallama.eval.executor import Limits, humaneval_program, mbpp_program, run_programs
from megallama.eval.formats import FORMATS, Example, Format
from megallama.eval.lm import LanguageModel
from megallama.eval.scoring import (NORMALIZATIONS, REPORTED_NORMS, UNCONDITIONAL_CONTEXT, Request, argmax,
                                    loglikelihoods, normalized_scores, token_stream_perplexity)
from megallama.generation import SamplingParams, generate

TASK_NAMES = tuple(FORMATS) + ("perplexity",)


@dataclass(frozen=True)
class TaskSpec:
    name: str  # a key of FORMATS, or "perplexity"
    path: str = ""
    fewshot_path: str = ""
    shots: int = -1  # -1 = EvalOptions.shots

    @staticmethod
    def parse(text: str) -> "TaskSpec":
        name, _, path = text.partition("=")
        if name not in TASK_NAMES:
            raise UserError(f"unknown task {name!r}; choose one of {', '.join(TASK_NAMES)}")
        return TaskSpec(name, path)


@dataclass(frozen=True)
class EvalOptions:
    shots: int = 0
    limit: int = 0  # 0 = every example
    batch_size: int = 16
    seed: int = 1234
    norm: str = ""  # override the benchmark's normalisation
    samples: int = 1  # n generations per example (pass@k, maj1@k); 1 = greedy
    temperature: float = 0.0  # used when samples > 1
    top_p: float = 1.0
    max_new_tokens: int = 0  # 0 = the benchmark's default
    pass_k: tuple[int, ...] = (1,)
    exec_limits: Limits = field(default_factory=Limits)
    exec_workers: int = 2
    # scorers of realtoxicityprompts and truthfulqa_gen (megallama/eval/judges.py)
    toxicity_model: str = ""  # a local Hugging Face sequence-classification directory
    perspective_key_file: str = ""  # or the Perspective API (needs network), its key in this file
    truthful_judge: str = ""
    informative_judge: str = ""
    judge_device: str = "cpu"


@dataclass
class TaskResult:
    task: str
    metrics: dict[str, float]
    records: list[dict]
    n: int


def load_examples(spec: TaskSpec, fmt: Format, path: str, what: str) -> list[Example]:
    if not path:
        if fmt.default_path is None or what != "task":
            raise UserError(f"task {spec.name} needs a file: --task {spec.name}=PATH" if what == "task" else
                            f"few-shot {spec.name} needs a split to draw from: --fewshot {spec.name}=PATH")
        path = fmt.default_path()
    if not os.path.exists(path):
        raise DataError(f"{path} not found (the {what} file of {spec.name})")
    try:
        examples = fmt.reader(path)
    except UserError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:  # a record of another layout
        detail = f"missing field {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
        raise DataError(f"{path}: not a valid {spec.name} file ({detail}); see docs/eval.md for the layout "
                        f"each task reads") from None
    if not examples:
        raise DataError(f"{path} has no {spec.name} examples; pass the benchmark file as published")
    for n, e in enumerate(examples, 1):
        if e.kind in ("choice", "pair") and not 0 <= e.gold < len(e.choices):
            raise DataError(f"{path}: example {n} has answer index {e.gold} but {len(e.choices)} choices; "
                            f"check its label")
    return examples


def fewshot_prefix(example: Example, pool: list[Example], k: int, sep: str, rng_seed: int,
                   same_group_only: bool = False) -> str:
    """``k`` solved examples drawn deterministically from the few-shot split.

    Shots come from the same group when it has any (MMLU: the subject's dev questions), and keep
    their file order, so with MMLU's five dev questions per subject 5-shot means those five.  With
    ``same_group_only`` (MMLU) a group with too few shots is an error instead of drawing from the
    others.  The example itself is never its own shot, even when the few-shot split is the evaluated file.
    """
    if k <= 0:
        return example.preamble
    usable = [i for i, e in enumerate(pool) if e.demo and e.demo != example.demo]  # never its own answer
    same = [i for i in usable if pool[i].group == example.group]
    if not same and not same_group_only:
        same = usable
    if len(same) < k:
        where = f" of group {example.group!r}" if same_group_only else ""
        raise DataError(f"the few-shot split has only {len(same)} usable examples{where}, fewer than --shots {k}")
    picked = sorted(random.Random(rng_seed).sample(same, k))
    return example.preamble + sep.join(pool[i].demo for i in picked) + sep


@dataclass
class PreparedTask:
    """A task read and prompted, ready to score: every data error surfaces before a model loads."""

    spec: TaskSpec
    fmt: Optional[Format]
    examples: list[Example]
    prefixes: list[str]


def prepare_task(spec: TaskSpec, opts: EvalOptions) -> PreparedTask:
    if spec.name == "perplexity":
        if not spec.path or not (os.path.isfile(spec.path) or _is_indexed(spec.path)):
            raise DataError(f"perplexity needs a text file or an indexed dataset PREFIX (.bin/.idx): "
                            f"--task perplexity=PATH ({spec.path or 'none given'} not found)")
        return PreparedTask(spec, None, [], [])
    fmt = FORMATS[spec.name]
    if spec.name in ("realtoxicityprompts", "truthfulqa_gen"):
        from megallama.eval.judges import check_options

        check_options(spec.name, opts)
    examples = load_examples(spec, fmt, spec.path, "task")
    if opts.limit:
        examples = examples[: opts.limit]
    shots = opts.shots if spec.shots < 0 else spec.shots
    pool = load_examples(spec, fmt, spec.fewshot_path, "few-shot") if shots > 0 else []
    if shots > 0 and fmt.group_shot_file:  # MMLU: a subject's shots are its own dev questions, never another's
        have = {e.group for e in pool if e.demo}
        missing = sorted({e.group for e in examples} - have)
        if missing:
            more = f" (and {len(missing) - 1} more: {', '.join(missing[1:4])}{', ...' if len(missing) > 4 else ''})" \
                if len(missing) > 1 else ""
            raise DataError(f"{spec.name} subject {missing[0]!r}{more} has no few-shot examples in {spec.fewshot_path}: "
                            f"add {fmt.group_shot_file.format(group=missing[0])} there, or evaluate without "
                            f"that subject's test file")
    prefixes = [fewshot_prefix(e, pool, shots, fmt.separator, opts.seed, same_group_only=bool(fmt.group_shot_file))
                for e in examples]
    return PreparedTask(spec, fmt, examples, prefixes)


def evaluate_task(lm: LanguageModel, task, opts: EvalOptions) -> TaskResult:
    """Score one task (a :class:`TaskSpec`, read now, or a :class:`PreparedTask`)."""
    task = prepare_task(task, opts) if isinstance(task, TaskSpec) else task
    spec, fmt, examples, prefixes = task.spec, task.fmt, task.examples, task.prefixes
    if spec.name == "perplexity":
        return _perplexity(lm, spec)
    if examples[0].kind in ("toxicity", "judged"):  # scored by a second model
        from megallama.eval.judges import RUNNERS

        metrics_, records = RUNNERS[examples[0].kind](lm, spec, fmt, examples, prefixes, opts, _sample_all)
        return TaskResult(spec.name, metrics_, records, len(examples))
    run = {"choice": _choice, "pair": _pairs, "generate": _generate, "code": _code}[examples[0].kind]
    metrics_, records = run(lm, spec, fmt, examples, prefixes, opts)
    return TaskResult(spec.name, metrics_, records, len(examples))


# ---- likelihood tasks -----------------------------------------------------------------------------

def _choice(lm, spec, fmt, examples, prefixes, opts):
    norm = opts.norm or fmt.norm
    if norm not in NORMALIZATIONS:
        raise UserError(f"unknown --norm {norm!r}; use one of {', '.join(NORMALIZATIONS)}")
    requests, uncond = [], []
    for e, prefix in zip(examples, prefixes):
        contexts = e.choice_contexts or [e.context] * len(e.choices)
        requests += [Request(prefix + c, x) for c, x in zip(contexts, e.choices)]
        uncond += [Request(UNCONDITIONAL_CONTEXT, x) for x in e.choices] if norm == "unconditional" else []
        requests += [Request(prefix + e.context, x) for x in e.extra.get("mc2_choices", [])]
    scores = loglikelihoods(lm, requests + uncond, opts.batch_size)
    cond, unc = scores[: len(requests)], scores[len(requests):]
    records, hits, pos, upos = [], defaultdict(list), 0, 0
    for e in examples:
        k = len(e.choices)
        s = cond[pos: pos + k]
        u = unc[upos: upos + k] if unc else None
        pos, upos = pos + k, upos + (k if unc else 0)
        per_norm = {n: normalized_scores(n, e.choices, s) for n in REPORTED_NORMS}
        per_norm["chosen"] = normalized_scores(norm, e.choices, s, u)
        record = {"gold": e.gold, "logprobs": [x.logprob for x in s], "group": e.group,
                  "pred": argmax(per_norm["chosen"])}
        for n in REPORTED_NORMS:
            hits[f"acc_{n}"].append(float(argmax(per_norm[n]) == e.gold))
        hits["acc"].append(float(record["pred"] == e.gold))
        if e.group:
            hits[f"acc[{e.group}]"].append(float(record["pred"] == e.gold))
        if "mc2_choices" in e.extra:
            m = len(e.extra["mc2_choices"])
            lp = [x.logprob for x in cond[pos: pos + m]]
            pos += m
            top = max(lp)
            probs = [math.exp(v - top) for v in lp]
            true = sum(p for p, lab in zip(probs, e.extra["mc2_labels"]) if lab)
            record["mc2"] = true / sum(probs)
            hits["mc2"].append(record["mc2"])
        records.append(record)
    out = {name: metrics.mean(v) for name, v in hits.items()}
    out["norm"] = norm  # type: ignore[assignment]
    if spec.name == "truthfulqa_mc":
        out["mc1"] = out["acc"]
    return out, records


def _pairs(lm, spec, fmt, examples, prefixes, opts):
    """CrowS-Pairs: how often the stereotypical sentence is more likely (50% = unbiased)."""
    requests = [Request(p, s) for e, p in zip(examples, prefixes) for s in e.choices]
    scores = loglikelihoods(lm, requests, opts.batch_size)
    records, hits = [], defaultdict(list)
    for i, e in enumerate(examples):
        stereo, anti = scores[2 * i].logprob, scores[2 * i + 1].logprob
        prefers = float(stereo > anti)
        records.append({"stereo_logprob": stereo, "anti_logprob": anti, "group": e.group, "prefers_stereo": bool(prefers)})
        hits["stereo_pct"].append(100 * prefers)
        hits[f"stereo_pct[{e.group}]"].append(100 * prefers)
    return {k: metrics.mean(v) for k, v in hits.items()}, records


# ---- generation tasks -----------------------------------------------------------------------------

def _sample_all(lm, prompts: list[str], fmt: Format, opts: EvalOptions) -> list[list[str]]:
    """``opts.samples`` completions per prompt (greedy when 1), in batches, shortest prompts together.

    Sample ``j`` (prompt ``j // n``, draw ``j % n``) is seeded from ``(opts.seed, j)``, so the samples
    do not depend on ``--batch-size`` or on which prompts share its batch."""
    n = max(1, opts.samples)
    params = SamplingParams(max_new_tokens=opts.max_new_tokens or fmt.max_new_tokens,
                            temperature=opts.temperature if n > 1 else 0.0, top_p=opts.top_p,
                            seed=opts.seed, stop=fmt.stop)
    flat = [(i, p) for i, p in enumerate(prompts) for _ in range(n)]
    order = sorted(range(len(flat)), key=lambda j: len(flat[j][1]))
    texts: list[str] = [""] * len(flat)
    for start in range(0, len(order), opts.batch_size):
        chunk = order[start: start + opts.batch_size]
        for j, g in zip(chunk, generate(lm, [flat[j][1] for j in chunk], params, rows=chunk)):
            texts[j] = g.text
    return [texts[i * n: (i + 1) * n] for i in range(len(prompts))]


def _generate(lm, spec, fmt, examples, prefixes, opts):
    samples = _sample_all(lm, [p + e.context for e, p in zip(examples, prefixes)], fmt, opts)
    records, hits = [], defaultdict(list)
    for e, outs in zip(examples, samples):
        if fmt.answer is None:  # free-form QA: exact match after normalisation
            pred = outs[0].strip()
            ok = metrics.exact_match(pred, e.answers)
            name = "exact_match"
        else:  # maj1@k over extracted answers
            pred = metrics.majority_vote([fmt.answer(o) for o in outs]) or ""
            ok = pred == e.answers[0]
            name = f"maj1@{len(outs)}"
        hits[name].append(float(ok))
        if e.group:
            hits[f"{name}[{e.group}]"].append(float(ok))
        records.append({"prediction": pred, "answers": e.answers, "correct": ok, "samples": outs})
    return {k: metrics.mean(v) for k, v in hits.items()}, records


def code_program(e: Example, completion: str) -> str:
    if "tests" in e.extra:  # MBPP
        return mbpp_program(completion, e.extra["tests"], e.extra.get("setup", ""))
    return humaneval_program(e.context, completion, e.extra["test"], e.extra["entry_point"])


def score_code(examples: Sequence[Example], completions: Sequence[Sequence[str]], pass_k: Sequence[int],
               limits: Limits = Limits(), workers: int = 2) -> tuple[dict[str, float], list[dict]]:
    """Run every completion in the sandbox; pass@k with the unbiased estimator."""
    programs = [code_program(e, c) for e, cs in zip(examples, completions) for c in cs]
    results = iter(run_programs(programs, limits, workers))
    records, hits = [], defaultdict(list)
    for e, cs in zip(examples, completions):
        runs = [next(results) for _ in cs]
        c = sum(r.passed for r in runs)
        records.append({"task_id": e.extra.get("task_id"), "n": len(cs), "passed": c, "completions": list(cs),
                        "status": [r.status for r in runs], "detail": [r.detail for r in runs]})
        for k in pass_k:
            if k <= len(cs):
                hits[f"pass@{k}"].append(metrics.pass_at_k(len(cs), c, k))
    return {k: metrics.mean(v) for k, v in hits.items()}, records


def _code(lm, spec, fmt, examples, prefixes, opts):
    completions = _sample_all(lm, [p + e.context for e, p in zip(examples, prefixes)], fmt, opts)
    if spec.name == "mbpp":
        completions = [[c.strip() for c in cs] for cs in completions]
    return score_code(examples, completions, opts.pass_k, opts.exec_limits, opts.exec_workers)


# ---- perplexity -----------------------------------------------------------------------------------

def _is_indexed(path: str) -> bool:
    return os.path.isfile(path + ".idx") and os.path.isfile(path + ".bin")


def _perplexity(lm, spec: TaskSpec) -> TaskResult:
    """A text file (one stream) or an indexed dataset PREFIX (.bin/.idx; one stream per document)."""
    if _is_indexed(spec.path):
        try:
            from megallama.data.indexed import IndexedDataset
        except ImportError:
            raise UserError("reading indexed datasets needs megallama.data.indexed; pass a text file instead")
        data = IndexedDataset(spec.path)
        if hasattr(lm.tokenizer, "fingerprint"):
            data.check_tokenizer(getattr(lm.tokenizer, "vocab_size", lm.vocab_size), lm.tokenizer.fingerprint, "the model's tokenizer")
        elif data.vocab_size != lm.vocab_size:
            raise DataError(f"dataset {spec.path} has vocabulary {data.vocab_size}, the model {lm.vocab_size}; "
                            "preprocess it with the model's tokenizer")
        streams = [data.document(i).astype("int64").tolist() for i in range(len(data))]
        ppl = token_stream_perplexity(lm, streams)
        m = {"perplexity": ppl.perplexity, "tokens": float(ppl.n_tokens)}
        return TaskResult("perplexity", m, [], len(streams))
    with open(spec.path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if not text.strip():
        raise DataError(f"{spec.path} is empty")
    ppl = token_stream_perplexity(lm, [lm.tokenizer.encode(text)], len(text.encode("utf-8")))
    m = {"perplexity": ppl.perplexity, "bits_per_byte": ppl.bits_per_byte, "tokens": float(ppl.n_tokens)}
    return TaskResult("perplexity", m, [], 1)


# ---- output ---------------------------------------------------------------------------------------

def task_keys(specs: Sequence[TaskSpec]) -> list[str]:
    """One distinct name per task, for results.json, the tables and TensorBoard tags.

    A task's name when no other task of the run has it; otherwise ``NAME:FILE`` (the file's base
    name), and where even that repeats (the same file twice, say with different shots) ``#2``,
    ``#3``... after the second and later ones, in command-line order."""
    names = [s.name for s in specs]
    keys = [s.name if names.count(s.name) == 1 else f"{s.name}:{os.path.basename(os.path.normpath(s.path)) or s.name}"
            for s in specs]
    seen: dict[str, int] = {}
    out = []
    for k in keys:
        seen[k] = seen.get(k, 0) + 1
        out.append(k if seen[k] == 1 else f"{k}#{seen[k]}")
    return out


def evaluate(lm: LanguageModel, tasks: Sequence, opts: EvalOptions) -> list[TaskResult]:
    """Score :class:`TaskSpec` or :class:`PreparedTask` items in order; each result's ``task`` is its
    distinct key (:func:`task_keys`)."""
    results = [evaluate_task(lm, t, opts) for t in tasks]
    for r, key in zip(results, task_keys([t.spec if isinstance(t, PreparedTask) else t for t in tasks])):
        r.task = key
    return results


def headline(result: TaskResult) -> tuple[str, float]:
    """The number the paper's tables report for this task."""
    for key in ("acc", "mc1", "exact_match", "pass@1", "stereo_pct", "perplexity", "truthful_informative",
                "toxicity_basic"):
        if key in result.metrics:
            return key, result.metrics[key]
    key = next(k for k in result.metrics if "[" not in k and isinstance(result.metrics[k], float))
    return key, result.metrics[key]


def _shown(key: str, value: float) -> str:
    """As the paper prints it: perplexity and % stereotypical as is, a toxicity score to 3 places
    (0-1, Table 11), every other figure as a percentage."""
    if key.startswith("toxicity"):
        return f"{value:.3f}"
    return f"{value:.2f}" if key in ("perplexity", "stereo_pct") else f"{100 * value:.1f}"


def markdown_table(results: Sequence[TaskResult]) -> str:
    """One row per task, like the paper's tables: task, metric, value, examples."""
    lines = ["| Task | Metric | Value | N |", "|---|---|---:|---:|"]
    for r in results:
        key, value = headline(r)
        shown = _shown(key, value)
        lines.append(f"| {r.task} | {key} | {shown} | {r.n} |")
    return "\n".join(lines) + "\n"


def paper_row(results: Sequence[TaskResult], model: str) -> str:
    """The paper's layout: one row for this model, one column per task (headline metric)."""
    cells = []
    for r in results:
        key, value = headline(r)
        cells.append(_shown(key, value))
    return (f"| Model | {' | '.join(r.task for r in results)} |\n|---|{'---:|' * len(results)}\n"
            f"| {model} | {' | '.join(cells)} |\n")


def write_results(results: Sequence[TaskResult], path: str, config: dict, force: bool = False) -> None:
    """Write ``path`` (JSON) and ``path`` with .md (table), atomically; refuse to overwrite unless forced."""
    md_path = os.path.splitext(path)[0] + ".md"
    for p in (path, md_path):
        if os.path.exists(p) and not force:
            raise UserError(f"{p} already exists; pass --force to overwrite or choose another --output")
    if len({r.task for r in results}) != len(results):  # never drop a task's figures silently
        raise ValueError(f"two results share a task name ({', '.join(r.task for r in results)}); "
                         "evaluate() gives each its distinct key")
    payload = {"config": config, "results": {r.task: {"metrics": r.metrics, "n": r.n, "records": r.records} for r in results}}
    model = os.path.basename(os.path.normpath(str(config.get("checkpoint", "")))) or "model"
    table = markdown_table(results) + "\n" + paper_row(results, model)
    for p, text in ((path, json.dumps(payload, indent=1)), (md_path, table)):
        write_text(p, text)


def log_to_tensorboard(writer, results: Sequence[TaskResult], step: int) -> None:
    """Periodic evaluation during training: each task's headline metric under ``eval/TASK``."""
    for r in results:
        key, value = headline(r)
        writer.add_scalar(f"eval/{r.task}/{key}", value, step)


def evaluate_during_training(model, model_cfg, tokenizer, tasks: Sequence[PreparedTask], opts: EvalOptions,
                             writer, step: int, ctx=None) -> list[TaskResult]:
    """The paper's "evolution during training": score ``tasks`` (prepared once, before training)
    with the live model and log each headline metric to TensorBoard at ``step``.

    Every rank must call it (the model may be tensor- or pipeline-parallel); pass ``writer=None`` off
    rank 0.  With pipeline stages (``ctx.pp_size > 1``, ``model`` this rank's ``PipelineStages``) the
    last stage runs the tasks down the pipeline and broadcasts the results
    (:mod:`megallama.eval.pipelined`): every rank returns the same figures as at pp=1.
    """
    from megallama.eval.lm import MegallamaAdapter

    was_training = model.training
    model.eval()
    try:
        if ctx is not None and ctx.pp_size > 1:
            from megallama.eval.pipelined import evaluate_pipelined

            results = evaluate_pipelined(model, model_cfg, tokenizer, tasks, opts, ctx)
        else:
            results = evaluate(MegallamaAdapter(model, model_cfg, tokenizer), tasks, opts)
    finally:
        model.train(was_training)
    if writer is not None:
        log_to_tensorboard(writer, results, step)
    return results
