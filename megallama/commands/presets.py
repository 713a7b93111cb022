"""`megallama presets`: the model presets with exact parameter counts (computed from the config)."""

from __future__ import annotations

import json

from megallama.config import PRESETS, preset_config


def add_arguments(p):
    p.add_argument("--json", action="store_true", help="print one JSON object per preset")


def rows():
    for name in PRESETS:
        c = preset_config(name)
        m, t = c.model, c.train
        yield dict(
            preset=name, params=m.num_parameters(), dim=m.dim, n_heads=m.n_heads, n_layers=m.n_layers,
            ffn_hidden=m.ffn_hidden, vocab=m.vocab_size, seq_len=t.seq_len, lr=c.optim.lr,
            batch_tokens=t.global_batch_size * t.seq_len, tokens=t.total_tokens(),
        )


def run(args) -> int:
    table = list(rows())
    if args.json:
        for r in table:
            print(json.dumps(r))
        return 0
    head = f"{'preset':<12}{'params':>16}{'dim':>7}{'heads':>7}{'layers':>8}{'ffn':>7}{'vocab':>7}" \
           f"{'seq':>6}{'lr':>9}{'batch tok':>11}{'tokens':>10}"
    print(head)
    print("-" * len(head))
    for r in table:
        print(f"{r['preset']:<12}{r['params']:>16,}{r['dim']:>7}{r['n_heads']:>7}{r['n_layers']:>8}"
              f"{r['ffn_hidden']:>7}{r['vocab']:>7}{r['seq_len']:>6}{r['lr']:>9.1e}"
              f"{_si(r['batch_tokens']):>11}{_si(r['tokens']):>10}")
    return 0


def _si(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(int(n))
