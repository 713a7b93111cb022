"""`megallama eval`: benchmark a checkpoint with the paper's protocol (likelihood, generation, code)."""

from __future__ import annotations

import os
import sys

from megallama.errors import UserError


def add_arguments(p):
    p.add_argument("--checkpoint", required=True, help="megallama checkpoint or Hugging Face model directory")
    p.add_argument("--task", action="append", required=True, metavar="NAME[=PATH]",
                   help="benchmark format and its local file (repeatable); 'humaneval' alone uses the packaged data")
    p.add_argument("--fewshot", action="append", default=[], metavar="NAME=PATH",
                   help="split the few-shot examples are drawn from (deterministically), per task")
    p.add_argument("--shots", action="append", default=[], metavar="K|NAME=K",
                   help="few-shot examples per prompt: K for every task, NAME=K for one task (repeatable)")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N examples of each task")
    p.add_argument("--output", default="", help="results JSON (a Markdown table is written next to it as .md)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --output")
    p.add_argument("--norm", default="", help="override the multiple-choice normalisation: none|norm|char|token|unconditional")
    p.add_argument("--samples", type=int, default=1, help="generations per example for pass@k / maj1@k (1 = greedy)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature when --samples > 1")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--pass-k", default="1", help="comma-separated k for pass@k (each k <= --samples)")
    p.add_argument("--max-new-tokens", type=int, default=0, help="0 = the benchmark's default")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--exec-timeout", type=float, default=10.0, help="seconds per generated program")
    p.add_argument("--device", default="cpu")
    p.add_argument("--toxicity-model", default="", metavar="DIR",
                   help="realtoxicityprompts: a local Hugging Face toxicity classifier directory (remote code off)")
    p.add_argument("--perspective-key-file", default="", metavar="FILE",
                   help="realtoxicityprompts: score with the Perspective API instead (needs network); FILE holds the key")
    p.add_argument("--truthful-judge", default="", metavar="DIR",
                   help="truthfulqa_gen: a local classifier of 'Q: .. A: .. True:' (the GPT-judge protocol, docs/eval.md)")
    p.add_argument("--informative-judge", default="", metavar="DIR",
                   help="truthfulqa_gen: a local classifier of 'Q: .. A: .. Helpful:' (the GPT-info judge)")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: as stored)")


def _options(args):
    from megallama.eval.executor import Limits
    from megallama.eval.harness import EvalOptions
    from megallama.eval.scoring import NORMALIZATIONS

    try:
        pass_k = tuple(int(k) for k in args.pass_k.split(","))
    except ValueError:
        raise UserError(f"--pass-k {args.pass_k!r} must be comma-separated integers, e.g. 1,10")
    if args.samples < 1 or any(k < 1 or k > args.samples for k in pass_k):
        raise UserError(f"--pass-k values must be between 1 and --samples ({args.samples})")
    if args.limit < 0:
        raise UserError("--limit must be >= 0")
    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    if args.norm and args.norm not in NORMALIZATIONS:  # found now, not after the model has loaded
        raise UserError(f"unknown --norm {args.norm!r}; use one of {', '.join(NORMALIZATIONS)}")
    limits = Limits(timeout_s=args.exec_timeout, cpu_s=max(1, int(args.exec_timeout)))
    return EvalOptions(shots=_shots(args)[0], limit=args.limit, batch_size=args.batch_size, seed=args.seed,
                       norm=args.norm, samples=args.samples, temperature=args.temperature, top_p=args.top_p,
                       max_new_tokens=args.max_new_tokens, pass_k=pass_k, exec_limits=limits,
                       toxicity_model=args.toxicity_model, perspective_key_file=args.perspective_key_file,
                       truthful_judge=args.truthful_judge, informative_judge=args.informative_judge,
                       judge_device=args.device)


def _shots(args) -> tuple[int, dict[str, int]]:
    """``--shots K`` (every task) and ``--shots NAME=K`` (one task)."""
    default, per_task = 0, {}
    for item in args.shots:
        name, sep, value = item.rpartition("=")
        try:
            k = int(value)
        except ValueError:
            k = -1
        if k < 0:
            raise UserError(f"--shots {item!r} must be K or NAME=K with K >= 0")
        if sep:
            per_task[name] = k
        else:
            default = k
    return default, per_task


def _specs(args):
    from megallama.eval.harness import TaskSpec

    fewshot = {}
    for item in args.fewshot:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise UserError(f"--fewshot {item!r} must be NAME=PATH")
        fewshot[name] = path
    specs = [TaskSpec.parse(t) for t in args.task]
    for name in fewshot:
        if name not in {s.name for s in specs}:
            raise UserError(f"--fewshot {name}=... names no --task")
    default, per_task = _shots(args)
    for name in per_task:
        if name not in {s.name for s in specs}:
            raise UserError(f"--shots {name}=... names no --task")
    out = []
    for s in specs:
        k = per_task.get(s.name, default)
        if k > 0 and s.name not in fewshot:
            raise UserError(f"{k}-shot {s.name} needs a split to draw shots from: --fewshot {s.name}=PATH")
        out.append(TaskSpec(s.name, s.path, fewshot.get(s.name, ""), k))
    return out


def run(args) -> int:
    from megallama.distributed import launched_group
    from megallama.eval import harness
    from megallama.eval.lm import load_model

    specs, opts = _specs(args), _options(args)
    if args.output:
        out_dir = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(out_dir):  # found now, not after the whole evaluation has run
            raise UserError(f"--output {args.output}: directory {out_dir} does not exist; create it or choose "
                            "another --output")
        md = os.path.splitext(args.output)[0] + ".md"
        for p in (args.output, md):
            if os.path.exists(p) and not args.force:
                raise UserError(f"{p} already exists; pass --force to overwrite or choose another --output")
    tasks = [harness.prepare_task(s, opts) for s in specs]  # bad data fails before the model loads
    if args.norm and not any(t.examples and t.examples[0].kind == "choice" for t in tasks):
        raise UserError(f"--norm {args.norm} only applies to multiple-choice tasks and no --task given is one; "
                        "drop --norm")
    with launched_group():  # under a launcher: one tensor-parallel group over all ranks
        lm = load_model(args.checkpoint, device=args.device, dtype=args.dtype)
        results = harness.evaluate(lm, tasks, opts)
    if int(os.environ.get("RANK", "0")) == 0:
        sys.stdout.write(harness.markdown_table(results))
        if args.output:
            config = {k: v for k, v in vars(args).items() if k != "func"}
            harness.write_results(results, args.output, config, force=args.force)
    return 0
