"""The C kernels of lora_cpu.c: compiled once per machine and CPU with the system C compiler
(`cc -O3 -march=native`) into loraserve's home, loaded with ctypes, and checked against torch
before first use. Without a compiler, or if the build or the check fails, `lora_kernel()` is None
and callers keep their torch path (the server logs why once). LORASERVE_NATIVE_KERNELS=0 turns
them off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch

from server.model.default_model import loraserve_home

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("lora_cpu.c")
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c11", "-shared", "-fPIC")
MAX_WIDTH = 1024  # lora_cpu.c's bound on one token's columns
BuildError = (OSError, subprocess.SubprocessError)

LoraKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def _cpu_fingerprint() -> str:
    """-march=native code runs only where these flags are: a home shared between machines gets one
    build per CPU kind."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        flags = next((line for line in info.splitlines() if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {flags}"


def _build(compiler: str) -> Path:
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join((compiler, *FLAGS, _cpu_fingerprint())).encode()).hexdigest()[:16]
    target = loraserve_home() / "kernels" / f"lora_cpu-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # built aside, then renamed: atomic
        built = Path(tmp) / target.name
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], check=True, capture_output=True,
                       timeout=120)
        os.replace(built, target)
    return target


def _bind(library: ctypes.CDLL) -> dict[torch.dtype, Callable[..., int]]:
    functions = {torch.bfloat16: library.lora_bgmv_uint16_t, torch.float32: library.lora_bgmv_float}
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for fn in functions.values():
        fn.argtypes = (i64, i64, i64, i64, ptr, i64, ptr, ptr, ptr, ptr, ptr, i64)
        fn.restype = ctypes.c_int
    return functions


def _bgmv(functions: dict[torch.dtype, Callable[..., int]]) -> LoraKernel:
    def lora_bgmv(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor,
                  lo: torch.Tensor, width: torch.Tensor) -> None:
        """y [tokens, out] += each token's delta from its columns [lo, lo + width) of a [cols, in]
        and b_t [cols, out]; lo and width int32 [tokens]. y may be a column slice."""
        if not (x.dtype == y.dtype == a.dtype == b_t.dtype and x.device.type == "cpu"
                and a.is_contiguous() and b_t.is_contiguous() and x.stride(1) == 1 and y.stride(1) == 1
                and lo.dtype == width.dtype == torch.int32 and lo.is_contiguous() and width.is_contiguous()
                and x.shape[0] == y.shape[0] == lo.shape[0] == width.shape[0]
                and a.shape[1] == x.shape[1] and b_t.shape[1] == y.shape[1]):
            raise ValueError("lora_bgmv: tensors of the wrong dtype, device or layout")
        rc = functions[x.dtype](x.shape[0], x.shape[1], y.shape[1], min(a.shape[0], b_t.shape[0]), x.data_ptr(),
                                x.stride(0), a.data_ptr(), b_t.data_ptr(), lo.data_ptr(), width.data_ptr(),
                                y.data_ptr(), y.stride(0))
        if rc != 0:
            raise ValueError(f"lora_bgmv: a token is wider than {MAX_WIDTH} columns" if rc == -1 else
                             "lora_bgmv: a token's columns are outside the packed buffers")

    return lora_bgmv


def _agrees(kernel: LoraKernel) -> bool:
    """The kernel against torch on a small mixed batch (widths 0, 8 and 16, a strided y), per dtype."""
    generator = torch.Generator().manual_seed(0)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        x = torch.randn(5, 40, generator=generator).to(dtype)
        a, b_t = torch.randn(32, 40, generator=generator).to(dtype), torch.randn(32, 70, generator=generator).to(dtype)
        lo = torch.tensor([0, 8, 0, 16, 8], dtype=torch.int32)
        width = torch.tensor([8, 16, 0, 16, 8], dtype=torch.int32)
        y = torch.randn(5, 100, generator=generator).to(dtype)
        expected = y.float().clone()
        for t in range(5):
            cols = slice(int(lo[t]), int(lo[t] + width[t]))
            expected[t, 10:80] += (a[cols].float() @ x[t].float()) @ b_t[cols].float()
        kernel(y[:, 10:80], x, a, b_t, lo, width)
        if not torch.allclose(y.float(), expected, atol=tolerance, rtol=tolerance):
            return False
    return True


@functools.cache
def lora_kernel() -> Optional[LoraKernel]:
    """The per-token LoRA kernel, or None (and the reason logged once) where it can't be had."""
    if os.environ.get("LORASERVE_NATIVE_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler (cc): CPU LoRA steps use torch ops (slower with several adapters in a step)")
        return None
    try:
        kernel = _bgmv(_bind(ctypes.CDLL(str(_build(compiler)))))
    except BuildError as exc:
        detail = getattr(exc, "stderr", b"") or b""
        log.warning("could not build the CPU LoRA kernel (%s%s): torch ops are used instead", exc,
                    f"; {detail.decode(errors='replace')[-500:]}" if detail else "")
        return None
    if not _agrees(kernel):
        log.warning("the CPU LoRA kernel disagrees with torch on its check: torch ops are used instead")
        return None
    return kernel
