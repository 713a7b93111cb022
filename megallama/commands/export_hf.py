"""`megallama export-hf`: write a checkpoint as a Hugging Face LlamaForCausalLM directory (see tools/hf.py)."""

from __future__ import annotations

from tools.hf import export_hf


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, metavar="SRC", help="checkpoint (step_N) or run directory")
    p.add_argument("--output", required=True, metavar="DIR", help="directory to write")
    p.add_argument("--max-shard-mb", type=float, default=5000.0,
                   help="largest safetensors shard (default: 5000 MB, as transformers writes them)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")


def run(args) -> int:
    out = export_hf(args.checkpoint, args.output, args.max_shard_mb, args.force)
    print(f"wrote {out} (load with transformers.LlamaForCausalLM.from_pretrained)")
    return 0
