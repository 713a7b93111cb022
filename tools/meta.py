"""Meta's original LLaMA release format: `megallama import-meta` and `megallama export-meta`.

A release directory holds ``params.json`` and ``consolidated.NN.pth``, one file per
model-parallel rank (7B: 1, 13B: 2, 33B: 4, 65B: 8), each a plain state dict of tensors
(loaded with ``torch.load(weights_only=True, mmap=True)``: no pickled code runs, no copy in
memory until used).  Each parameter kind is cut across the shards as in Meta's
fairscale model (:data:`CONCAT_DIM`): column-parallel weights along dim 0, row-parallel
weights and the embedding along dim 1, norms replicated.  Names are Meta's; the fused
``wqkv``/``w13`` and vocabulary padding are :mod:`megallama.convert`'s business.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

from megallama.atomic import building
from megallama.checkpoint import TOKENIZER_FILE
from megallama.checkpoint.stream import StreamingReader, write_run_checkpoint_from
from megallama.config import ModelConfig
from megallama.convert import meta_to_ours, ours_to_meta
from megallama.errors import CheckpointError
from tools.checkpoint_io import (check_new_output, check_not_source, commit_directory, imported_config, import_source,
                                source_number)

# suffix of a Meta parameter name -> dimension its model-parallel shards are concatenated on
# (None: replicated, every shard holds the full tensor)
CONCAT_DIM: dict[str, Optional[int]] = {
    "attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0,
    "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0, "output.weight": 0,
    "attention.wo.weight": 1, "feed_forward.w2.weight": 1, "tok_embeddings.weight": 1,
    "attention_norm.weight": None, "ffn_norm.weight": None, "norm.weight": None, "rope.freqs": None,
}
SHARD = re.compile(r"consolidated\.(\d+)\.pth$")


def concat_dim(name: str, where: str) -> Optional[int]:
    for suffix, dim in CONCAT_DIM.items():
        if name == suffix or name.endswith("." + suffix):
            return dim
    raise CheckpointError(f"{where} holds tensor '{name}', which a LLaMA model does not have; "
                          "this is not a Meta LLaMA release")


# ----------------------------------------------------------------------------- import


def model_config_from_params(path: Path, vocab_rows: int) -> ModelConfig:
    try:
        p = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise CheckpointError(f"'{path}' is missing or not JSON; pass a Meta LLaMA release directory") from None
    if not isinstance(p, dict):
        raise CheckpointError(f"'{path}' is not a JSON object; pass a Meta LLaMA release directory")
    for key in ("dim", "n_layers", "n_heads"):
        if not isinstance(p.get(key), int) or isinstance(p.get(key), bool):
            raise CheckpointError(f"'{path}' has no integer '{key}'; pass the params.json of a Meta LLaMA release")
    if p.get("use_scaled_rope"):
        raise CheckpointError(f"'{path}': use_scaled_rope (Llama 3.1 rope scaling) is not supported; "
                              "convert a plain LLaMA model")
    vocab = source_number(p, "vocab_size", -1, path, integer=True)
    return ModelConfig(dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"],
                       n_kv_heads=source_number(p, "n_kv_heads", None, path, integer=True),
                       vocab_size=vocab if vocab and vocab > 0 else vocab_rows,  # -1 in the 2023 release
                       multiple_of=source_number(p, "multiple_of", 256, path, integer=True),
                       ffn_dim_multiplier=source_number(p, "ffn_dim_multiplier", None, path),
                       norm_eps=source_number(p, "norm_eps", 1e-6, path),
                       rope_theta=source_number(p, "rope_theta", 10000.0, path),
                       max_seq_len=source_number(p, "max_seq_len", 2048, path, integer=True))


def shard_paths(directory: Path) -> list[Path]:
    found = {int(m.group(1)): f for f in directory.glob("consolidated.*.pth") if (m := SHARD.search(f.name))}
    if not found:
        raise CheckpointError(f"'{directory}' has no consolidated.NN.pth; pass a Meta LLaMA release directory")
    for i in range(max(found) + 1):
        if i not in found:
            raise CheckpointError(f"shard '{directory / f'consolidated.{i:02d}.pth'}' is missing; "
                                  "download the complete release")
    return [found[i] for i in range(len(found))]


def _load_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad zip/pickle data
        raise CheckpointError(f"'{path}' is truncated, corrupt or not a plain tensor file "
                              f"({type(exc).__name__}); download it again") from None


def meta_shapes(paths: list[Path]) -> dict[str, torch.Tensor]:
    """Meta name -> meta-device tensor of its full (concatenated) shape, from the shards' headers."""
    shards = [{k: v.shape for k, v in _load_shard(p).items()} for p in paths]  # mmap: no data read
    names = list(shards[0])
    for p, s in zip(paths[1:], shards[1:]):
        if set(s) != set(names):
            raise CheckpointError(f"'{p}' holds other tensors than '{paths[0]}'; the shards are of different models")
    out = {}
    for name in names:
        dim = concat_dim(name, f"'{paths[0]}'")
        shape = list(shards[0][name])
        if dim is not None:
            shape[dim] = sum(s[name][dim] for s in shards)
        out[name] = torch.empty(shape, device="meta")
    return out


def read_meta_tensors(paths: list[Path], names: list[str]) -> dict[str, torch.Tensor]:
    """Full Meta-named fp32 tensors ``names``, concatenating the model-parallel shards per parameter
    kind; each shard is mapped (``mmap=True``) for this call only."""
    parts: dict[str, list] = {n: [] for n in names}
    for p in paths:
        shard = _load_shard(p)
        for n in names:
            parts[n].append(shard[n])
        del shard
    out = {}
    for name in names:
        dim = concat_dim(name, f"'{paths[0]}'")
        out[name] = (parts[name][0] if dim is None else torch.cat(parts[name], dim)).float()
    return out


def import_meta(directory, out, tp: int = 1, pp: int = 1) -> Path:
    """Tensor by tensor: each canonical tensor is made from only the Meta tensors it needs."""
    directory = Path(directory)
    check_new_output(out)
    paths = shard_paths(directory)
    shapes = meta_shapes(paths)
    if "tok_embeddings.weight" not in shapes:
        raise CheckpointError(f"'{directory}' has no tok_embeddings.weight; this is not a LLaMA release")
    model_cfg = model_config_from_params(directory / "params.json", shapes["tok_embeddings.weight"].shape[0])
    cfg = imported_config(model_cfg, tp, pp)
    source = import_source(shapes, lambda sd: meta_to_ours(sd, model_cfg), lambda n: n,
                           lambda names: read_meta_tensors(paths, names))
    tok = directory / "tokenizer.model"
    if not tok.is_file():
        tok = directory.parent / "tokenizer.model"  # the release keeps it next to the size directories
    return write_run_checkpoint_from(out, cfg, source, tokenizer_path=str(tok) if tok.is_file() else None,
                                     extra_meta={"imported_from": {"format": "meta", "path": str(directory)}})


# ----------------------------------------------------------------------------- export


def params_json(cfg: ModelConfig) -> dict:
    out = {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "vocab_size": cfg.vocab_size,
           "multiple_of": cfg.multiple_of, "norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta}
    if cfg.n_kv_heads is not None:
        out["n_kv_heads"] = cfg.n_kv_heads
    if cfg.ffn_dim_multiplier is not None:
        out["ffn_dim_multiplier"] = cfg.ffn_dim_multiplier
    return out


def mp_part(name: str, t: torch.Tensor, rank: int, mp: int) -> torch.Tensor:
    """Model-parallel shard ``rank`` of the Meta tensor ``name``, with its own storage (torch.save
    would write a view's whole base tensor)."""
    dim = concat_dim(name, "the checkpoint")
    if dim is not None and t.shape[dim] % mp:
        raise CheckpointError(f"'{name}' has {t.shape[dim]} rows/columns on dim {dim}, not divisible by "
                              f"--mp {mp}; choose a divisor")
    return (t if dim is None else t.chunk(mp, dim)[rank]).clone()


def export_meta(src, out, mp: int = 1, force: bool = False) -> Path:
    """One ``consolidated.NN.pth`` at a time: each is a torch pickle written whole by ``torch.save``, so
    peak memory is one model-parallel shard (the model / ``mp``) plus one full tensor."""
    out = check_new_output(out, force)
    if mp < 1:
        raise CheckpointError(f"--mp must be >= 1, got {mp}")
    reader = StreamingReader(src)  # each file mapped for one read only: RSS stays one tensor
    check_not_source(out, reader.path)
    model_cfg = reader.config.model
    for name, t in ours_to_meta({n: torch.empty(reader.specs[n].shape, device="meta") for n in reader.names()},
                                model_cfg).items():
        mp_part(name, t, 0, mp)  # refuse an --mp that does not divide, before anything is read or written
    with building(out) as tmp:
        for i in range(mp):
            shard = {}
            for n in reader.names():
                for name, t in ours_to_meta({n: reader.full(n)}, model_cfg).items():
                    shard[name] = mp_part(name, t, i, mp)
            torch.save(shard, tmp / f"consolidated.{i:02d}.pth")
            del shard
        (tmp / "params.json").write_text(json.dumps(params_json(model_cfg)) + "\n")
        if (reader.path / TOKENIZER_FILE).is_file():
            shutil.copyfile(reader.path / TOKENIZER_FILE, tmp / "tokenizer.model")
        commit_directory(tmp, out)
    return out
