"""megallama: pretrain LLaMA-architecture models with 3D parallelism on DeepSpeed."""

__version__ = "0.1.0"
