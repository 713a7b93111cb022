"""`megallama <subcommand>`: one entry point, one implementation per job.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported lazily so ``megallama --help`` is fast.
A :class:`~megallama.errors.UserError` anywhere becomes a one-line message on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional

from megallama.errors import EXIT_USAGE, UserError, say

# name -> (module, one-line help).  Keep this table the only registry of jobs.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("megallama.commands.train", "pretrain (or finetune) a model; with no config, the demo preset"),
    "presets": ("megallama.commands.presets", "list model presets with exact parameter counts"),
    "show-model": ("megallama.commands.show_model", "print a config's model, layout and parameter count"),
    "tokenizer": ("megallama.commands.tokenizer", "train a SentencePiece BPE tokenizer with the LLaMA settings"),
    "curate": ("megallama.commands.curate", "deduplicate and filter raw text per source (CCNet-style)"),
    "train-classifier": ("megallama.commands.train_classifier",
                         "train the fastText quality classifier of web pages (CCNet) for curate --classifier-model"),
    "lm-cutoffs": ("megallama.commands.lm_cutoffs",
                   "KenLM perplexity percentiles of a sample (CCNet's buckets) for curate --lm-cutoffs"),
    "preprocess": ("megallama.commands.preprocess", "tokenize text into an indexed dataset (PREFIX.bin/.idx)"),
    "preprocess-instruct": ("megallama.commands.preprocess_instruct",
                            "tokenize instruction JSONL into tokens plus a loss mask for finetuning"),
    "mixture": ("megallama.commands.mixture", "report sampling proportions and epochs per source of a mixture"),
    "plan": ("megallama.commands.plan", "estimate memory, throughput and time of a training layout"),
    "carbon": ("megallama.commands.carbon", "energy and CO2 of a training run, the paper's way"),
    "scaling-fit": ("megallama.commands.scaling_fit", "fit L(N, D) scaling laws to sweep results"),
    "sweep": ("megallama.commands.sweep", "train a grid of model sizes x budgets and gather results.csv"),
    "eval": ("megallama.commands.eval", "evaluate a checkpoint on benchmarks with the paper's protocol"),
    "generate": ("megallama.commands.generate", "sample text from a checkpoint (greedy, temperature, top-p)"),
    "reshard": ("megallama.commands.reshard", "move a checkpoint to another TP/PP(/DP) layout (optionally weights only)"),
    "export-hf": ("megallama.commands.export_hf", "export a checkpoint as a Hugging Face LlamaForCausalLM directory"),
    "import-hf": ("megallama.commands.import_hf", "import a Hugging Face LLaMA directory as a megallama checkpoint"),
    "import-meta": ("megallama.commands.import_meta", "import Meta's original release (params.json + consolidated.NN.pth)"),
    "export-meta": ("megallama.commands.export_meta", "export a checkpoint in Meta's original format (--mp shards)"),
}


def _strip_launcher_args(argv: list[str]) -> list[str]:
    """Drop ``--local_rank=N`` / ``--local_rank N`` that launchers insert anywhere."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a.startswith("--local_rank=") or a.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
            continue
        if a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
            continue
        out.append(a)
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse already exits 2; keep its one-line form
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="megallama", description="Pretrain, evaluate and plan LLaMA-architecture models "
                     "with 3D parallelism on DeepSpeed.")
    from megallama import __version__

    parser.add_argument("--version", action="version", version=f"megallama {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<subcommand>", parser_class=_Parser)
    for name, (module, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if only == name:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = _strip_launcher_args(list(sys.argv[1:] if argv is None else argv))
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is not None and command not in SUBCOMMANDS:
        command = None  # let argparse report the unknown choice
    parser = build_parser(only=command)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(importlib.import_module(SUBCOMMANDS[args.command][0]).run(args) or 0)
    except UserError as exc:
        say(f"megallama {args.command}: error: {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def entry() -> None:
    """The console script and ``python -m megallama``: a process that trained or evaluated in a
    process group ends without the interpreter's teardown (see ``distributed.exit_process``)."""
    code = main()
    if "torch" not in sys.modules:  # no process group without torch: skip importing it (2 s per data task)
        sys.exit(code)
    from megallama.distributed import exit_process, used_process_group

    if used_process_group():
        exit_process(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
