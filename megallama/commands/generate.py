"""`megallama generate`: sample completions from a checkpoint (greedy when --temperature 0)."""

from __future__ import annotations

import json
import os


def add_arguments(p):
    p.add_argument("--checkpoint", required=True, help="megallama checkpoint or Hugging Face model directory")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    p.add_argument("--prompt-file", default="", help="one prompt per line (JSON strings allowed for multi-line prompts)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: as stored)")


def _prompts(args) -> list[str]:
    from megallama.errors import UserError

    prompts = list(args.prompt)
    if args.prompt_file:
        if not os.path.isfile(args.prompt_file):
            raise UserError(f"--prompt-file {args.prompt_file} not found")
        with open(args.prompt_file, encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\n")
                if line.strip():
                    prompts.append(json.loads(line) if line.startswith('"') else line)
    if not prompts:
        raise UserError("no prompt given; pass --prompt TEXT or --prompt-file FILE")
    return prompts


def run(args) -> int:
    from megallama.distributed import launched_group
    from megallama.eval.lm import load_model
    from megallama.generation import SamplingParams, generate

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, stop=tuple(args.stop)).validate()
    prompts = _prompts(args)
    with launched_group():  # under a launcher: one tensor-parallel group over all ranks
        lm = load_model(args.checkpoint, device=args.device, dtype=args.dtype)
        outputs = generate(lm, prompts, params)
    if int(os.environ.get("RANK", "0")) == 0:  # every rank computes the same tokens; one prints
        for prompt, out in zip(prompts, outputs):
            if args.json:
                print(json.dumps({"prompt": prompt, "completion": out.text, "finish_reason": out.finish_reason}))
            else:
                print(prompt + out.text)
    return 0
