"""Hugging Face conversion: `megallama export-hf` and `megallama import-hf`.

Export writes a directory that ``transformers`` loads as ``LlamaForCausalLM`` with its
tokenizer: ``config.json`` (:func:`megallama.convert.hf_config`), ``model.safetensors`` or
``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``,
``tokenizer.model`` (our SentencePiece model), ``tokenizer_config.json``,
``special_tokens_map.json`` and ``generation_config.json``.  Import reads safetensors (or
``pytorch_model*.bin`` through ``torch.load(weights_only=True)``: no pickled code runs) and
``config.json``, refusing architectures we do not implement.  Weight mapping (names, rotary
permutation, vocabulary padding) is :mod:`megallama.convert`'s.
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
from pathlib import Path

import torch

from megallama.atomic import building
from megallama.checkpoint import TOKENIZER_FILE, CheckpointReader
from megallama.checkpoint.stream import SafetensorsWriter, StreamingReader, write_run_checkpoint_from
from megallama.config import ModelConfig
from megallama.convert import hf_config, hf_to_meta, hf_to_ours, ours_to_hf
from megallama.errors import CheckpointError, UserError
from megallama.hf_safe import check_no_remote_code
from tools.checkpoint_io import (check_new_output, check_not_source, commit_directory, ffn_settings, imported_config,
                                import_source, source_number)

# ----------------------------------------------------------------------------- export


def _shards(tensors: dict[str, torch.Tensor], max_bytes: float) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = t, size + nbytes
    return shards + [current] if current else shards


def _tokenizer_files(tok_path: Path) -> dict[str, dict]:
    """tokenizer_config.json and special_tokens_map.json for transformers' LlamaTokenizer."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(tok_path.read_bytes())

    def piece(i: int):
        return sp.IdToPiece(i) if 0 <= i < sp.GetPieceSize() else None

    special = {"bos_token": piece(sp.bos_id()), "eos_token": piece(sp.eos_id()), "unk_token": piece(sp.unk_id())}
    special = {k: v for k, v in special.items() if v is not None}
    # megallama's tokenizers add no dummy prefix ("hello" is not "▁hello"); say so, or transformers adds one
    dummy_prefix = sp.EncodeAsPieces("a")[0].startswith("\u2581")
    config = {"tokenizer_class": "LlamaTokenizer", **special, "add_bos_token": True, "add_eos_token": False,
              "add_prefix_space": dummy_prefix, "legacy": True, "clean_up_tokenization_spaces": False, "sp_model_kwargs": {},
              "model_max_length": 1_000_000_000}
    return {"tokenizer_config.json": config, "special_tokens_map.json": special}


def _hf_layout(reader: CheckpointReader, model_cfg: ModelConfig) -> tuple[dict, dict]:
    """HF name -> meta-device tensor (its shape), in :func:`ours_to_hf`'s order, and HF name -> the
    canonical tensor it is made of: the mapping run on shapes only, no data read."""
    shapes, source = {}, {}
    for n in reader.names():
        for h, t in ours_to_hf({n: torch.empty(reader.specs[n].shape, device="meta")}, model_cfg).items():
            shapes[h], source[h] = t, n
    return shapes, source


class _Converted:
    """HF tensors made from one canonical tensor at a time (:func:`ours_to_hf` on it alone), each kept
    only until every HF tensor made from it was taken: a file's tensors are written in name order
    (k_proj, o_proj, q_proj, v_proj), not in the order the mapping makes them."""

    def __init__(self, reader: CheckpointReader, model_cfg: ModelConfig, source: dict):
        self.reader, self.cfg, self.source = reader, model_cfg, source
        self.left = {}
        for h, n in source.items():
            self.left[n] = self.left.get(n, 0) + 1
        self.made = {}

    def take(self, h: str) -> torch.Tensor:
        n = self.source[h]
        if n not in self.made:
            self.made[n] = ours_to_hf({n: self.reader.full(n)}, self.cfg)
        out = self.made[n].pop(h)
        self.left[n] -= 1
        if not self.left[n]:
            del self.made[n]
        return out


def export_hf(src, out, max_shard_mb: float = 5000.0, force: bool = False) -> Path:
    """Tensor by tensor: each canonical tensor is read, mapped (:func:`ours_to_hf`) and streamed into
    its shard; peak memory is a few tensors, never the model."""
    if not (math.isfinite(max_shard_mb) and max_shard_mb > 0):  # 0 or less: a shard per tensor
        raise UserError(f"--max-shard-mb must be a positive number of megabytes (e.g. 5000, the default), "
                        f"got {max_shard_mb:g}")
    out = check_new_output(out, force)
    reader = StreamingReader(src)  # each file mapped for one read only: RSS stays one tensor
    check_not_source(out, reader.path)
    model_cfg: ModelConfig = reader.config.model
    shapes, source = _hf_layout(reader, model_cfg)
    tensors = _Converted(reader, model_cfg, source)
    tok = reader.path / TOKENIZER_FILE
    bos, eos = 1, 2
    with building(out) as tmp:
        shards = _shards(shapes, max_shard_mb * 2**20)

        def write(part: dict, name: str) -> None:
            w = SafetensorsWriter(tmp / name, [(k, t.dtype, t.shape) for k, t in part.items()], {"format": "pt"})
            try:
                for k, _, _ in w.order:
                    w.write(k, tensors.take(k))
                w.close()
            except BaseException:
                w.abort()
                raise

        if len(shards) == 1:
            write(shards[0], "model.safetensors")
        else:
            weight_map = {}
            for i, part in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                write(part, name)
                weight_map.update({k: name for k in part})
            total = sum(t.numel() * t.element_size() for t in shapes.values())
            _write_json(tmp / "model.safetensors.index.json", {"metadata": {"total_size": total},
                                                                 "weight_map": weight_map})
        if tok.is_file():
            shutil.copyfile(tok, tmp / "tokenizer.model")
            for name, content in _tokenizer_files(tok).items():
                _write_json(tmp / name, content)
            from megallama.data.tokenizer import Tokenizer

            t = Tokenizer(str(tok))
            bos, eos = t.bos_id, t.eos_id
        _write_json(tmp / "config.json", hf_config(model_cfg, bos, eos))
        _write_json(tmp / "generation_config.json", {"bos_token_id": bos, "eos_token_id": eos})
        commit_directory(tmp, out)
    return out


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


# ----------------------------------------------------------------------------- import


def model_config_from_hf(path: Path) -> ModelConfig:
    """Our :class:`ModelConfig` from ``config.json``; one-line errors for what we do not implement."""
    try:
        c = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise CheckpointError(f"'{path}' is missing or not JSON; pass a Hugging Face model directory") from None

    if not isinstance(c, dict):
        raise CheckpointError(f"'{path}' is not a JSON object; pass a Hugging Face model directory")
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size"):
        if not isinstance(c.get(key), int) or isinstance(c.get(key), bool):
            raise CheckpointError(f"'{path}' has no integer '{key}'; pass the config.json of a Hugging Face "
                                  "LLaMA model")

    def refuse(cond: bool, what: str) -> None:
        if cond:
            raise CheckpointError(f"'{path}': {what} is not supported by megallama's LLaMA; "
                                  "convert a plain LLaMA model")

    refuse(c.get("model_type") != "llama", f"model_type '{c.get('model_type')}'")
    refuse(bool(c.get("rope_scaling")), "rope_scaling")
    # transformers >= 5 writes rope settings as "rope_parameters": {"rope_theta", "rope_type", ...}
    # instead of a top-level rope_theta (and rope_scaling)
    rope = c.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"'{path}': 'rope_parameters' must be a JSON object; pass the config.json of a "
                              "Hugging Face LLaMA model")
    refuse(rope.get("rope_type", rope.get("type", "default")) != "default",
           f"rope_parameters rope_type '{rope.get('rope_type', rope.get('type'))}' (rope scaling)")
    theta = source_number(c, "rope_theta", source_number(rope, "rope_theta", 10000.0, path), path)
    refuse(bool(c.get("attention_bias")) or bool(c.get("mlp_bias")), "attention_bias/mlp_bias (biases)")
    refuse(c.get("hidden_act", "silu") != "silu", f"hidden_act '{c.get('hidden_act')}'")
    dim, heads = c["hidden_size"], c["num_attention_heads"]
    refuse(c.get("head_dim") not in (None, dim // heads), f"head_dim {c.get('head_dim')} != hidden/heads")
    kv = source_number(c, "num_key_value_heads", heads, path, integer=True) or heads
    multiple, mult = ffn_settings(dim, c["intermediate_size"])
    return ModelConfig(dim=dim, n_layers=c["num_hidden_layers"], n_heads=heads, n_kv_heads=None if kv == heads else kv,
                       vocab_size=c["vocab_size"], multiple_of=multiple, ffn_dim_multiplier=mult,
                       norm_eps=source_number(c, "rms_norm_eps", 1e-6, path), rope_theta=theta,
                       max_seq_len=source_number(c, "max_position_embeddings", 2048, path, integer=True))


def hf_weight_files(directory: Path) -> list[Path]:
    """The weight files of a HF directory (``*.safetensors``, else ``pytorch_model*.bin``), all there."""
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise CheckpointError(f"'{directory}' has no *.safetensors or pytorch_model*.bin; "
                              "pass a Hugging Face model directory")
    index = next(iter(directory.glob("*.index.json")), None)
    if index is not None:
        wanted = set(json.loads(index.read_text())["weight_map"].values())
        missing = sorted(wanted - {f.name for f in files})
        if missing:
            raise CheckpointError(f"shard '{directory / missing[0]}' named in {index.name} is missing; "
                                  "download the complete model")
    return files


def read_hf_file(f: Path, names=None) -> dict[str, torch.Tensor]:
    """Tensors ``names`` of one HF weights file, or (``names`` None) all of them as meta-device tensors
    of their shapes: a safetensors file is opened per call (its mapping, and the pages it read, go
    with it); a ``.bin`` through ``torch.load(weights_only=True, mmap=True)``: no pickled code runs."""
    from safetensors import SafetensorError, safe_open

    try:
        if f.suffix != ".bin":
            with safe_open(str(f), framework="pt") as h:
                if names is None:
                    return {k: torch.empty(h.get_slice(k).get_shape(), device="meta") for k in h.keys()}
                return {k: h.get_tensor(k) for k in names}
        part = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as exc:
        if f.suffix != ".bin":
            raise CheckpointError(f"'{f}' is truncated or corrupt ({type(exc).__name__}); "
                                  "download it again") from None
        # a zip of something else, a plain pickle, or one that would run code
        raise CheckpointError(f"'{f}' is not PyTorch weights that load without running pickled code "
                              f"({type(exc).__name__}); use the model's *.safetensors, or convert it to "
                              "safetensors where you trust it") from None
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"'{f}' is truncated or corrupt ({type(exc).__name__}); "
                              "download it again") from None
    if not isinstance(part, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                             for k, v in part.items()):
        raise CheckpointError(f"'{f}' holds a {type(part).__name__}, not a state dict of named tensors; "
                              "use the model's *.safetensors, or convert it to safetensors")
    if names is None:
        return {k: torch.empty(v.shape, device="meta") for k, v in part.items()}
    return {k: part[k] for k in names}


def import_hf(directory, out, tp: int = 1, pp: int = 1) -> Path:
    directory = Path(directory)
    check_new_output(out)
    check_no_remote_code(directory)  # its weights are read as data, but a custom architecture is refused up front
    model_cfg = model_config_from_hf(directory / "config.json")
    cfg = imported_config(model_cfg, tp, pp)
    file_of, shapes = {}, {}
    for f in hf_weight_files(directory):  # names and shapes only: each tensor is read when written
        for k, t in read_hf_file(f).items():
            file_of[k], shapes[k] = f, t
    config = json.loads((directory / "config.json").read_text())
    if not config.get("tie_word_embeddings", False) and "lm_head.weight" not in shapes:
        raise CheckpointError(f"'{directory}' has no lm_head.weight but config.json says the embeddings are "
                              "not tied; the model files are incomplete")

    def load(names: list) -> dict:
        got = {}
        for f in dict.fromkeys(file_of[n] for n in names):
            got.update(read_hf_file(f, [n for n in names if file_of[n] == f]))
        return got

    try:
        source = import_source(shapes, lambda sd: hf_to_ours(sd, model_cfg),
                               lambda n: next(iter(hf_to_meta({n: shapes[n]}, model_cfg)), None), load)
    except KeyError as exc:
        raise CheckpointError(f"'{directory}' holds tensor {exc} that a LLaMA model does not have; "
                              "this architecture is not supported") from None
    tok = directory / "tokenizer.model"
    return write_run_checkpoint_from(out, cfg, source, tokenizer_path=str(tok) if tok.is_file() else None,
                                     extra_meta={"imported_from": {"format": "huggingface", "path": str(directory)}})
