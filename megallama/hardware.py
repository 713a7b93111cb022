"""Accelerator facts: peak FLOP/s, memory, link bandwidths and board power.

One table used by the planner (throughput, memory fit), the carbon tool (nominal
power), the energy meter (fallback power) and the trainer (MFU denominator).
Numbers are NVIDIA's published dense (no sparsity) peaks for the SXM parts;
bandwidths are *per GPU, per direction*.  The table is user-extensible: a YAML
file mapping names to :class:`GpuSpec` fields is merged in by
:func:`load_gpu_specs` (``megallama plan --hardware FILE``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from megallama.errors import UserError

GiB = 1024 ** 3
TERA = 1e12


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator model.  Rates in FLOP/s and bytes/s, memory in bytes, power in W."""

    name: str
    peak_bf16: float  # dense tensor-core FLOP/s
    peak_fp16: float
    peak_fp32: float  # plain FP32 (not TF32)
    memory_bytes: float
    hbm_bandwidth: float  # bytes/s
    nvlink_bandwidth: float  # bytes/s per GPU per direction inside a node
    network_bandwidth: float  # bytes/s per GPU per direction between nodes (InfiniBand NICs / GPU)
    gpus_per_node: int = 8
    power_w: float = 400.0  # board power (TDP), the paper's "GPU power" for A100-80GB
    # Fraction of peak that large bf16 GEMMs reach in practice (cuBLAS on
    # transformer-sized shapes); the planner's compute time uses it.
    matmul_efficiency: float = 0.75
    # Fraction of the link rate that NCCL ring collectives reach (nccl-tests busbw).
    comm_efficiency: float = 0.8

    def peak_flops(self, precision: str = "bf16") -> float:
        """Dense peak for a training precision (fp32 | bf16 | fp16)."""
        table = {"bf16": self.peak_bf16, "fp16": self.peak_fp16, "fp32": self.peak_fp32}
        if precision not in table:
            raise UserError(f"unknown precision '{precision}'; choose fp32, bf16 or fp16")
        return table[precision]


_GB = 1e9
GPU_SPECS: dict[str, GpuSpec] = {
    # A100 SXM4: 312 TFLOP/s bf16/fp16, 19.5 fp32; NVLink3 600 GB/s total = 300 per direction;
    # DGX A100: 8 x 200 Gb/s HDR InfiniBand = 25 GB/s per GPU.
    "A100-40GB": GpuSpec("A100-40GB", 312 * TERA, 312 * TERA, 19.5 * TERA, 40 * GiB, 1555 * _GB,
                         300 * _GB, 25 * _GB, power_w=400.0),
    "A100-80GB": GpuSpec("A100-80GB", 312 * TERA, 312 * TERA, 19.5 * TERA, 80 * GiB, 2039 * _GB,
                         300 * _GB, 25 * _GB, power_w=400.0),
    # H100 SXM5: 989 TFLOP/s bf16 dense, 67 fp32; NVLink4 900 GB/s total = 450 per direction;
    # DGX H100: 8 x 400 Gb/s NDR = 50 GB/s per GPU.  Large GEMMs reach a lower fraction of
    # the (much higher) peak than on A100.
    "H100-80GB": GpuSpec("H100-80GB", 989 * TERA, 989 * TERA, 67 * TERA, 79.6 * GiB, 3350 * _GB,
                         450 * _GB, 50 * _GB, power_w=700.0, matmul_efficiency=0.65),
    "H200": GpuSpec("H200", 989 * TERA, 989 * TERA, 67 * TERA, 140.4 * GiB, 4800 * _GB,
                    450 * _GB, 50 * _GB, power_w=700.0, matmul_efficiency=0.65),
}


def gpu_spec(name: str, specs: Optional[dict[str, GpuSpec]] = None) -> GpuSpec:
    """Look up a GPU by name (case-insensitive); one-line error listing the choices."""
    table = GPU_SPECS if specs is None else specs
    for key, spec in table.items():
        if key.lower() == name.lower():
            return spec
    raise UserError(f"unknown GPU '{name}'; choose one of: {', '.join(table)} "
                    "(or add yours with a --hardware YAML file)")


def match_gpu_name(device_name: str) -> Optional[GpuSpec]:
    """Map a CUDA device name (``NVIDIA A100-SXM4-80GB``, ``NVIDIA H100 80GB HBM3``) to a spec."""
    n = device_name.upper()
    if "H200" in n:
        return GPU_SPECS["H200"]
    if "H100" in n:  # the table's H100 is the SXM5 part; PCIe (756 TFLOP/s bf16) and NVL differ: unknown
        return None if "PCIE" in n or "NVL" in n else GPU_SPECS["H100-80GB"]
    if "A100" in n:
        return GPU_SPECS["A100-80GB" if "80G" in n else "A100-40GB"]
    return None


def detect_gpu_spec() -> Optional[GpuSpec]:
    """The spec of ``cuda:0`` if torch sees a GPU in the table, else None (CPU, unknown GPU)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency of training only
        return None
    if not torch.cuda.is_available():
        return None
    return match_gpu_name(torch.cuda.get_device_name(0))


def load_gpu_specs(path: Optional[str]) -> dict[str, GpuSpec]:
    """The built-in table plus the GPUs described in a YAML file (name -> fields).

    Rates in the file are in the units people quote: ``peak_bf16_tflops``,
    ``peak_fp16_tflops``, ``peak_fp32_tflops``, ``memory_gib``, ``hbm_gbps``,
    ``nvlink_gbps`` and ``network_gbps`` (GB/s per GPU per direction), plus any
    plain field of :class:`GpuSpec` (``power_w``, ``gpus_per_node``, ...).
    """
    table = dict(GPU_SPECS)
    if not path:
        return table
    raw = read_yaml_mapping(Path(path), "hardware file", "map GPU names to mappings of fields")
    for name, fields in raw.items():
        table[str(name)] = _spec_from_yaml(str(name), fields, path)
    return table


def read_yaml_mapping(path: Path, what: str, shape: str) -> dict:
    """A YAML file that must hold a mapping; one-line errors naming ``what`` it is and its ``shape``."""
    if not path.is_file():
        raise UserError(f"{what} '{path}' does not exist; pass a YAML file that must {shape}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        raise UserError(f"{what} '{path}' is not valid YAML; fix its syntax") from None
    if not isinstance(raw, dict):
        raise UserError(f"{what} '{path}' must {shape}")
    return raw


_UNITS = {"peak_bf16_tflops": ("peak_bf16", TERA), "peak_fp16_tflops": ("peak_fp16", TERA),
          "peak_fp32_tflops": ("peak_fp32", TERA), "memory_gib": ("memory_bytes", GiB),
          "hbm_gbps": ("hbm_bandwidth", _GB), "nvlink_gbps": ("nvlink_bandwidth", _GB),
          "network_gbps": ("network_bandwidth", _GB)}


def _spec_from_yaml(name: str, fields, path: str) -> GpuSpec:
    if not isinstance(fields, dict):
        raise UserError(f"hardware file '{path}': entry '{name}' must be a mapping of fields")
    plain = {f.name for f in dataclasses.fields(GpuSpec)} - {"name"}
    values = {}
    for key, value in fields.items():
        if key in _UNITS:
            target, scale = _UNITS[key]
        elif key in plain:
            target, scale = key, 1
        else:
            raise UserError(f"hardware file '{path}': unknown field '{name}.{key}'; "
                            f"valid: {', '.join(list(_UNITS) + sorted(plain))}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise UserError(f"hardware file '{path}': '{name}.{key}' must be a positive number, got {value!r}")
        values[target] = int(value) if target == "gpus_per_node" else float(value) * scale
    required = ["peak_bf16", "memory_bytes", "hbm_bandwidth", "nvlink_bandwidth", "network_bandwidth"]
    missing = [k for k in required if k not in values]
    if missing:
        raise UserError(f"hardware file '{path}': GPU '{name}' lacks {', '.join(missing)} "
                        "(give peak_bf16_tflops, memory_gib, hbm_gbps, nvlink_gbps, network_gbps)")
    values.setdefault("peak_fp16", values["peak_bf16"])
    values.setdefault("peak_fp32", values["peak_bf16"] / 16)
    return GpuSpec(name=name, **values)
