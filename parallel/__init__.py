"""Model-agnostic tensor, sequence and pipeline parallelism on torch.distributed.

Nothing here knows about LLaMA: process-group topology (:mod:`parallel.topology`),
communication regions as autograd functions (:mod:`parallel.comm`), tensor-parallel
layers (:mod:`parallel.layers`), their matrix products on the faster CPU GEMM
(:mod:`parallel.gemm`), vocab-parallel cross-entropy
(:mod:`parallel.cross_entropy`), layout-independent initialisation
(:mod:`parallel.init`), a DeepSpeed-compatible ``mpu`` (:mod:`parallel.mpu`) and
pipeline-stage building (:mod:`parallel.pipeline`).
"""
