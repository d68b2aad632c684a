"""Which kernels fuse the decoder's elementwise work (residual add + RMSNorm, SiLU-mul, RoPE + K/V
writes) for tensors like a given one: norm_cpu.c for bf16 CPU rows, Triton on CUDA; None: torch ops."""

from __future__ import annotations

from typing import Optional, Union

import torch

from server.kernels.fused_triton import TritonKernels, cuda_kernels
from server.kernels.native import NormKernels, norm_kernels

ElementwiseKernels = Union[NormKernels, TritonKernels]

ENABLED = True  # False: torch ops everywhere (bench/gpu_decode.py measures both in one run)


def fused_kernels(x: torch.Tensor) -> Optional[ElementwiseKernels]:
    if not ENABLED:
        return None
    if x.is_cuda:
        return cuda_kernels()
    return norm_kernels() if x.is_cpu and x.dtype == torch.bfloat16 else None
