"""The C kernels (lora_cpu.c, attention_cpu.c, linear_cpu.c, norm_cpu.c, greedy_cpu.c, and decoder_cpu.c
driving the others through a decode step's layers): compiled once per machine and CPU with
the system C compiler (`cc -O3 -march=native`) into loraserve's home, loaded with ctypes, and checked
against torch before first use. Without a compiler, or if a build or a check fails, `lora_kernel()`,
`attention_kernel()` or `linear_kernel()` is None and callers keep their torch path (the server logs
why once). LORASERVE_NATIVE_KERNELS=0 turns them off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from server.model.default_model import loraserve_home

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c11", "-shared", "-fPIC")
MAX_WIDTH = 1024  # lora_cpu.c's bound on one token's columns
MAX_DIM, MAX_GROUP = 256, 16  # attention_cpu.c's bounds: head size, query heads per KV head
BuildError = (OSError, subprocess.SubprocessError)

AttentionKernel = Callable[..., torch.Tensor]


def _cpu_fingerprint() -> str:
    """-march=native code runs only where these flags are: a home shared between machines gets one
    build per CPU kind."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        flags = next((line for line in info.splitlines() if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {flags}"


def _build(compiler: list[str], source: Path, extra: tuple[str, ...] = ()) -> Path:
    code = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(HERE.glob("*.h")))  # (the headers)
    flags = (*FLAGS, *extra)
    key = hashlib.sha256(code + " ".join((*compiler, *flags, _cpu_fingerprint())).encode()).hexdigest()[:16]
    target = loraserve_home() / "kernels" / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # built aside, then renamed: atomic
        built = Path(tmp) / target.name
        subprocess.run([*compiler, *flags, str(source), "-o", str(built), "-lm"], check=True, capture_output=True,
                       timeout=120)
        os.replace(built, target)
    return target


def _library(source: str, what: str, openmp: bool = False) -> Optional[ctypes.CDLL]:
    """The built library of HERE/source, or None with the reason logged (`what` it would have sped up).
    `openmp`: built with -fopenmp where the compiler can (its libgomp.so.1 is then torch's, already
    loaded: one thread team, the engine's count), else without (one thread)."""
    if os.environ.get("LORASERVE_NATIVE_KERNELS", "1") == "0":
        return None
    compiler = shlex.split(os.environ.get("CC", "")) or [c for c in (shutil.which("cc") or shutil.which("gcc"),) if c]
    if not compiler:
        log.warning("no C compiler (cc): %s use torch ops", what)
        return None
    try:
        if openmp:
            try:
                return ctypes.CDLL(str(_build(compiler, HERE / source, ("-fopenmp",))))
            except BuildError as exc:
                log.warning("could not build %s with OpenMP (%s): it runs on one thread", source, exc)
        return ctypes.CDLL(str(_build(compiler, HERE / source)))
    except BuildError as exc:
        detail = getattr(exc, "stderr", b"") or b""
        log.warning("could not build %s (%s%s): %s use torch ops", source, exc,
                    f"; {detail.decode(errors='replace')[-500:]}" if detail else "", what)
        return None


def _bind_lora(library: ctypes.CDLL) -> dict[torch.dtype, Callable[..., int]]:
    functions = {torch.bfloat16: library.lora_bgmv_uint16_t, torch.float32: library.lora_bgmv_float}
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for fn in functions.values():
        fn.argtypes = (i64, i64, i64, i64, ptr, i64, ptr, i64, ptr, i64, ptr, ptr, ptr, ptr, i64)
        fn.restype = ctypes.c_int
    return functions


def _on_cpu(*tensors: tuple[torch.Tensor, int]) -> bool:
    """Each (tensor, dims) a CPU tensor of exactly that many dimensions. (With more, a zero-sized
    trailing one would leave no storage behind shapes the C code reads; with these, a zero-sized
    dimension is a zero loop bound there.)"""
    return all(t.is_cpu and t.dim() == dims for t, dims in tensors)


class LoraStep:
    """One step's token columns for the LoRA kernel, checked once: every projection's call of the
    step then checks only its own tensors (each call costs ~5.7 µs of Python otherwise; a step at 32
    rows makes 210)."""

    def __init__(self, functions: dict[torch.dtype, Callable[..., int]], lo: torch.Tensor, width: torch.Tensor,
                 order: torch.Tensor) -> None:
        if not (_on_cpu((lo, 1), (width, 1), (order, 1)) and lo.dtype == width.dtype == order.dtype == torch.int32
                and lo.is_contiguous() and width.is_contiguous() and order.is_contiguous()
                and lo.shape[0] == width.shape[0] == order.shape[0]):
            raise ValueError("lora_bgmv: lo, width and order must be int32 vectors of one length on the CPU")
        self.functions, self.tokens = functions, lo.shape[0]
        self.held = (lo, width, order)  # alive as long as their pointers are used
        self.pointers = (lo.data_ptr(), width.data_ptr(), order.data_ptr())

    def __call__(self, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor) -> None:
        """y [tokens, out] += each token's delta from its columns of a [cols, in] and b_t [cols, out]
        (rows of each may be apart: a part's view of a fused projection's pool)."""
        if not (_on_cpu((x, 2), (y, 2), (a, 2), (b_t, 2)) and x.dtype == y.dtype == a.dtype == b_t.dtype
                and x.dtype in self.functions and a.stride(1) == 1 and b_t.stride(1) == 1
                and x.stride(1) == 1 and y.stride(1) == 1 and x.shape[0] == y.shape[0] == self.tokens
                and a.shape[1] == x.shape[1] and b_t.shape[1] == y.shape[1]):
            raise ValueError("lora_bgmv: tensors of the wrong dtype, device or layout")
        lo, width, order = self.pointers
        rc = self.functions[x.dtype](self.tokens, x.shape[1], y.shape[1], min(a.shape[0], b_t.shape[0]),
                                     x.data_ptr(), x.stride(0), a.data_ptr(), a.stride(0), b_t.data_ptr(),
                                     b_t.stride(0), lo, width, order, y.data_ptr(), y.stride(0))
        if rc != 0:
            raise ValueError({-1: f"lora_bgmv: a token wider than {MAX_WIDTH} columns, or an order naming no token",
                              -2: "lora_bgmv: a token's columns are outside the packed buffers"}.get(
                                  rc, "lora_bgmv: too many output features, a row stride too short, or no memory"))


class LoraKernel:
    """lora_cpu.c's BGMV: `step(lo, width, order)` once per step, then the step per projection; or
    the whole call at once (tests, benchmarks)."""

    def __init__(self, functions: dict[torch.dtype, Callable[..., int]]) -> None:
        self.functions = functions

    def step(self, lo: torch.Tensor, width: torch.Tensor, order: torch.Tensor) -> LoraStep:
        """lo, width int32 [tokens]: each token's first column and how many (0: the base model);
        order int32 [tokens]: the tokens in the order to take them, those of one adapter next to each
        other, each once (not checked: a token named twice gets its delta twice)."""
        return LoraStep(self.functions, lo, width, order)

    def __call__(self, y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor, lo: torch.Tensor,
                 width: torch.Tensor, order: torch.Tensor) -> None:
        """y [tokens, out] += each token's delta from its columns [lo, lo + width) of a [cols, in]
        and b_t [cols, out]; y may be a column slice."""
        self.step(lo, width, order)(y, x, a, b_t)


def _agrees(kernel: LoraKernel) -> bool:
    """The kernel against torch on a small mixed batch (widths 0, 8 and 16, a strided y, three tokens
    of one adapter taken together), per dtype."""
    generator = torch.Generator().manual_seed(0)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        x = torch.randn(7, 40, generator=generator).to(dtype)
        a, b_t = torch.randn(32, 40, generator=generator).to(dtype), torch.randn(32, 70, generator=generator).to(dtype)
        lo = torch.tensor([0, 8, 0, 16, 8, 8, 8], dtype=torch.int32)  # a run of three for one adapter
        width = torch.tensor([8, 16, 0, 16, 8, 16, 16], dtype=torch.int32)
        order = torch.tensor([2, 0, 4, 1, 5, 6, 3], dtype=torch.int32)
        y = torch.randn(7, 100, generator=generator).to(dtype)
        expected = y.float().clone()
        for t in range(7):
            cols = slice(int(lo[t]), int(lo[t] + width[t]))
            expected[t, 10:80] += (a[cols].float() @ x[t].float()) @ b_t[cols].float()
        kernel(y[:, 10:80], x, a, b_t, lo, width, order)
        if not torch.allclose(y.float(), expected, atol=tolerance, rtol=tolerance):
            return False
    return True


def _checked(source: str, what: str, bind: Callable[[ctypes.CDLL], Callable], agrees: Callable[[Callable], bool],
             openmp: bool = False):
    """The kernel `bind` makes from HERE/source's library if it passes `agrees`, else None (and why,
    logged once): `what` keeps its torch ops."""
    library = _library(source, what, openmp)
    if library is None:
        return None
    try:
        kernel = bind(library)
        agreed = agrees(kernel)
    except Exception as exc:  # a library without the expected symbols, a check that raised
        log.warning("%s failed its check (%s): %s use torch ops", source, exc, what)
        return None
    if not agreed:
        log.warning("%s disagrees with torch on its check: %s use torch ops", source, what)
        return None
    return kernel


@functools.cache
def lora_kernel() -> Optional[LoraKernel]:
    """The per-token LoRA kernel, or None where it can't be had."""
    return _checked("lora_cpu.c", "CPU LoRA steps (slower with several adapters in a step)",
                    lambda library: LoraKernel(_bind_lora(library)), _agrees)


def _attention(library: ctypes.CDLL) -> AttentionKernel:
    functions = {torch.bfloat16: library.paged_decode_attention_bf16_avx512,  # (the generic one without AVX512-BF16)
                 torch.float32: library.paged_decode_attention_float}
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for fn in functions.values():
        fn.argtypes = (i64, i64, i64, i64, ptr, i64, ptr, ptr, i64, ptr, i64, ptr, i64, ctypes.c_float, ptr, ptr)
        fn.restype = ctypes.c_int

    def paged_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gather: torch.Tensor,
                               lens: torch.Tensor, window: Optional[int], scale: float) -> torch.Tensor:
        """q [seqs, heads, dim] (rows may be apart: a slice of the fused q/k/v); k, v [slots, kv_heads,
        dim]; gather [seqs, attend_len] int64 slots; lens [seqs] int64. Returns [seqs, heads, dim]."""
        if not _on_cpu((q, 3), (k, 3), (v, 3), (gather, 2), (lens, 1)) or k.shape[1] == 0:
            raise ValueError("paged_decode_attention: tensors of the wrong shape or device")
        seqs, heads, dim = q.shape
        kv_heads = k.shape[1]
        if not (q.dtype == k.dtype == v.dtype and q.dtype in functions and q.stride(2) == 1
                and q.stride(1) == dim and k.is_contiguous() and v.is_contiguous() and k.shape == v.shape
                and k.shape[2] == dim and gather.dtype == lens.dtype == torch.int64 and gather.is_contiguous()
                and lens.is_contiguous() and gather.shape[0] == lens.shape[0] == seqs):
            raise ValueError("paged_decode_attention: tensors of the wrong dtype, device or layout")
        out = torch.empty(seqs, heads, dim, dtype=q.dtype)
        scratch = torch.empty(max(1, heads // kv_heads) * gather.shape[1], dtype=torch.float32)
        rc = functions[q.dtype](seqs, heads, kv_heads, dim, q.data_ptr(), q.stride(0), k.data_ptr(), v.data_ptr(),
                                k.shape[0], gather.data_ptr(), gather.shape[1], lens.data_ptr(), window or 0,
                                scale, out.data_ptr(), scratch.data_ptr())
        if rc != 0:
            raise ValueError("paged_decode_attention: " + ("a shape it does not handle" if rc == -1 else
                                                           "a slot or length out of bounds"))
        return out

    return paged_decode_attention


def _attention_agrees(kernel: AttentionKernel) -> bool:
    """The kernel against SDPA in float64 over gathered keys, with GQA, ragged lengths and a window
    (head size 64: the AVX512-BF16 path where there is one; 16: the generic one)."""
    generator = torch.Generator().manual_seed(0)
    for (dtype, tolerance), dim in itertools.product(((torch.float32, 1e-5), (torch.bfloat16, 2e-2)), (16, 64)):
        seqs, heads, kv_heads, slots, attend = 3, 6, 2, 40, 9
        k, v = (torch.randn(slots, kv_heads, dim, generator=generator).to(dtype) for _ in range(2))
        q = torch.randn(seqs, heads + 2, dim, generator=generator).to(dtype)[:, :heads]  # rows apart, as served
        gather = torch.randperm(slots, generator=generator)[: seqs * attend].view(seqs, attend).contiguous()
        lens = torch.tensor([9, 4, 7])
        for window in (None, 3):
            got = kernel(q, k, v, gather, lens, window, 0.25)
            for s in range(seqs):
                first = 0 if window is None else max(0, int(lens[s]) - window)
                keys, values = (t[gather[s, first : lens[s]]].double().transpose(0, 1) for t in (k, v))
                want = torch.nn.functional.scaled_dot_product_attention(
                    q[s].double().unsqueeze(1), keys.repeat_interleave(heads // kv_heads, 0),
                    values.repeat_interleave(heads // kv_heads, 0), scale=0.25).squeeze(1)
                if not torch.allclose(got[s].double(), want, atol=tolerance, rtol=tolerance):
                    return False
    return True


@functools.cache
def attention_kernel() -> Optional[AttentionKernel]:
    """The paged decode attention kernel, or None where it can't be had."""
    return _checked("attention_cpu.c", "CPU decode attention steps (gathered copies and SDPA)", _attention,
                    _attention_agrees)



GROUP = 64  # linear_cpu.c: outputs per weight block
# linear_lora: parts of a fused projection, each a multiple of 16 outputs; packed columns per slot of its pool
FOLD_PARTS, FOLD_ALIGN, FOLD_SLOT = 4, 16, 8


@dataclass(frozen=True)
class BlockedWeight:
    """A bf16 weight [out, in] in linear_cpu.c's layout, and its bias as padded fp32."""

    blocks: torch.Tensor  # [groups, in_pairs, 64, 2] bf16
    bias: Optional[torch.Tensor]  # [groups * 64] float32, or None
    in_features: int
    out_features: int

    @property
    def nbytes(self) -> int:
        return self.blocks.numel() * 2 + (0 if self.bias is None else self.bias.numel() * 4)


@dataclass(frozen=True)
class BlockedInt8:
    """A weight-only int8 copy [out, in] in linear_int8's layout, one fp32 scale per output."""

    blocks: torch.Tensor  # [groups, in, 64] int8
    scales: torch.Tensor  # [groups * 64] float32
    bias: Optional[torch.Tensor]  # [groups * 64] float32, or None
    in_features: int
    out_features: int

    @property
    def nbytes(self) -> int:
        return self.blocks.numel() + self.scales.numel() * 4 + (0 if self.bias is None else self.bias.numel() * 4)


def _padded(values: Optional[torch.Tensor], size: int) -> Optional[torch.Tensor]:
    if values is None:
        return None
    padded = torch.zeros(size, dtype=torch.float32)
    padded[: values.shape[0]] = values.detach().float()
    return padded


class LinearKernel:
    """linear_cpu.c: bf16 projections on CPUs with AVX512-BF16, from weights blocked once at load,
    and their weight-only int8 copies for small steps."""

    def __init__(self, function: Callable[..., int], int8_function: Callable[..., int],
                 lora_function: Callable[..., int]) -> None:
        self.function, self.int8_function, self.lora_function = function, int8_function, lora_function

    @staticmethod
    def block_int8(values: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor]) -> BlockedInt8:
        """values [out, in] int8 with scales [out] (weight ~ values * scales)."""
        out, in_ = values.shape
        groups = -(-out // GROUP)
        padded = torch.zeros(groups * GROUP, in_, dtype=torch.int8)
        padded[:out] = values
        blocks = padded.view(groups, GROUP, in_).transpose(1, 2).contiguous()
        return BlockedInt8(blocks, _padded(scales, groups * GROUP), _padded(bias, groups * GROUP), in_, out)

    def int8(self, x: torch.Tensor, weight: BlockedInt8) -> torch.Tensor:
        """x [rows, in] bf16 on CPU -> [rows, out] bf16, through the int8 copy."""
        x, y = self._io(x, weight.in_features, weight.out_features)
        rc = self.int8_function(x.shape[0], x.shape[1], weight.out_features, x.data_ptr(), x.stride(0),
                                weight.blocks.data_ptr(), weight.scales.data_ptr(),
                                0 if weight.bias is None else weight.bias.data_ptr(), y.data_ptr(), y.stride(0))
        if rc != 0:
            raise ValueError("linear_int8: " + ("bad sizes" if rc == -1 else "not built for this CPU"))
        return y

    @staticmethod
    def _io(x: torch.Tensor, in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not (x.is_cpu and x.dim() == 2 and x.dtype == torch.bfloat16 and x.shape[1] == in_features):
            raise ValueError("linear: x must be a [rows, in] bf16 CPU tensor")
        if x.stride(1) != 1 or x.stride(0) < x.shape[1]:
            x = x.contiguous()
        return x, torch.empty(x.shape[0], out_features, dtype=torch.bfloat16)

    @staticmethod
    def block(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> BlockedWeight:
        out, in_ = weight.shape
        groups, pairs = -(-out // GROUP), -(-in_ // 2)
        padded = torch.zeros(groups * GROUP, pairs * 2, dtype=torch.bfloat16)
        padded[:out, :in_] = weight.detach()
        blocks = padded.view(groups, GROUP, pairs, 2).permute(0, 2, 1, 3).contiguous()
        return BlockedWeight(blocks, _padded(bias, groups * GROUP), in_, out)

    def __call__(self, x: torch.Tensor, weight: BlockedWeight) -> torch.Tensor:
        """x [rows, in] bf16 on CPU -> [rows, out] bf16."""
        x, y = self._io(x, weight.in_features, weight.out_features)
        bias = 0 if weight.bias is None else weight.bias.data_ptr()
        rc = self.function(x.shape[0], x.shape[1], weight.out_features, x.data_ptr(), x.stride(0),
                           weight.blocks.data_ptr(), bias, y.data_ptr(), y.stride(0))
        if rc != 0:
            raise ValueError("linear_bf16: " + ("bad sizes" if rc == -1 else "not built for this CPU"))
        return y

    def with_lora(self, x: torch.Tensor, weight: "BlockedWeight | BlockedInt8", pool: "LoraPool",
                  step: LoraStep) -> torch.Tensor:
        """x [rows, in] bf16 -> [rows, out] bf16 through the bf16 or int8 blocked weight, with each row's
        LoRA delta from `pool` (a fused projection's packed adapters) added before y is rounded, in the
        projection's own pass; step: each row's columns (lora_cpu's LoraStep, checked once per step)."""
        x, y = self._io(x, weight.in_features, weight.out_features)
        if not (pool.in_features == x.shape[1] and pool.out_features == y.shape[1] and step.tokens == x.shape[0]):
            raise ValueError("linear_lora: the pool, the weight or the step is for another shape")
        scales = weight.scales.data_ptr() if isinstance(weight, BlockedInt8) else 0
        bias = 0 if weight.bias is None else weight.bias.data_ptr()
        lo, width, order = step.pointers
        rc = self.lora_function(x.shape[0], x.shape[1], weight.out_features, x.data_ptr(), x.stride(0),
                                weight.blocks.data_ptr(), scales, bias, y.data_ptr(), y.stride(0),
                                ctypes.addressof(pool), lo, width, order)
        if rc != 0:
            raise ValueError({-1: "linear_lora: bad sizes", -2: "linear_lora: not built for this CPU",
                              -3: "linear_lora: a token's columns are not whole slots inside the pool, or the order "
                                  "is no permutation of the rows"}.get(rc, "linear_lora: no memory"))
        return y


class LoraPool(ctypes.Structure):
    """linear_cpu.c's lora_pool: a fused projection's packed adapters, a [cols, parts, in] and B^T in
    lora_b_blocks' layout (bf16, contiguous), and each part's end in the output. Made by `lora_pool`,
    which checks the tensors once and keeps them."""

    _fields_ = [("a", ctypes.c_void_p), ("b", ctypes.c_void_p), ("cols", ctypes.c_int64),
                ("parts", ctypes.c_int64), ("in_features", ctypes.c_int64), ("out_features", ctypes.c_int64),
                ("ends", ctypes.c_int64 * FOLD_PARTS)]


def foldable(sizes: tuple[int, ...]) -> bool:
    """Whether a fused projection of parts this wide can take its LoRA inside linear_lora."""
    return len(sizes) <= FOLD_PARTS and all(size % FOLD_ALIGN == 0 for size in sizes)


def lora_b_blocks(columns: int, out_features: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Zeroed B^T blocks for `columns` packed columns: [slots, groups, SLOT / 2, 64, 2], each slot's B^T
    laid out like a weight of SLOT inputs (LinearKernel.block), so the expand is one AVX512-BF16
    instruction per 16 outputs and pair of columns, and an adapter's blocks are one run of memory in
    the order the tiles read them."""
    return torch.zeros(columns // FOLD_SLOT, -(-out_features // GROUP), FOLD_SLOT // 2, GROUP, 2,
                       dtype=torch.bfloat16, device=device)


def block_lora_b(b_t: torch.Tensor) -> torch.Tensor:
    """b_t [columns, out] (whole slots of columns) in lora_b_blocks' layout."""
    columns, out = b_t.shape
    groups = -(-out // GROUP)
    padded = torch.zeros(columns, groups * GROUP, dtype=b_t.dtype, device=b_t.device)
    padded[:, :out] = b_t
    return padded.view(columns // FOLD_SLOT, FOLD_SLOT // 2, 2, groups, GROUP).permute(0, 3, 1, 4, 2).contiguous()


def lora_pool(a: torch.Tensor, b_blocks: torch.Tensor, sizes: tuple[int, ...]) -> LoraPool:
    """The pool of a fused projection whose parts are `sizes` wide (foldable): a [cols, parts, in] and
    b_blocks from lora_b_blocks(cols, sum(sizes)), bf16 CPU tensors."""
    cols, out = a.shape[0], sum(sizes)
    if not (_on_cpu((a, 3), (b_blocks, 5)) and a.dtype == b_blocks.dtype == torch.bfloat16 and a.is_contiguous()
            and b_blocks.is_contiguous() and a.shape[1] == len(sizes) and cols % FOLD_SLOT == 0
            and b_blocks.shape == (cols // FOLD_SLOT, -(-out // GROUP), FOLD_SLOT // 2, GROUP, 2) and foldable(sizes)):
        raise ValueError("lora_pool: a [cols, parts, in] and b_blocks (lora_b_blocks) must be contiguous bf16 CPU "
                         "tensors of whole slots, for at most 4 parts each a multiple of 16 wide")
    ends = (ctypes.c_int64 * FOLD_PARTS)(*itertools.accumulate(sizes))
    pool = LoraPool(a.data_ptr(), b_blocks.data_ptr(), cols, a.shape[1], a.shape[2], out, ends)
    pool.tensors = (a, b_blocks)  # alive as long as their pointers are
    return pool


def _bind_linear(library: ctypes.CDLL) -> LinearKernel:
    fn, int8, lora = library.linear_bf16, library.linear_int8, library.linear_lora
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = (i64, i64, i64, ptr, i64, ptr, ptr, ptr, i64)
    int8.argtypes = (i64, i64, i64, ptr, i64, ptr, ptr, ptr, ptr, i64)
    lora.argtypes = (i64, i64, i64, ptr, i64, ptr, ptr, ptr, ptr, i64, ptr, ptr, ptr, ptr)
    fn.restype = int8.restype = lora.restype = ctypes.c_int
    return LinearKernel(fn, int8, lora)


def _linear_agrees(kernel: LinearKernel) -> bool:
    """The kernel against float64 matmuls: rows 1-9 (whole tiles and a ragged one), an output count
    that is no multiple of 64, an odd input count, a bias, rows apart."""
    generator = torch.Generator().manual_seed(0)
    for out, in_, bias in ((70, 41, True), (128, 64, False)):
        weight = torch.randn(out, in_, generator=generator).to(torch.bfloat16)
        b = torch.randn(out, generator=generator).to(torch.bfloat16) if bias else None
        blocked = kernel.block(weight, b)
        for rows in (1, 3, 4, 9):
            x = torch.randn(rows, in_ + 5, generator=generator).to(torch.bfloat16)[:, :in_]
            want = x.double() @ weight.double().T + (0 if b is None else b.double())
            got = kernel(x, blocked).double()
            if not torch.allclose(got, want, atol=0.05, rtol=1e-2):
                return False
            values = torch.randint(-127, 128, (out, in_), generator=generator, dtype=torch.int8)
            scales = torch.rand(out, generator=generator) / 100
            want = x.double() @ (values.double() * scales.double()[:, None]).T + (0 if b is None else b.double())
            got = kernel.int8(x, kernel.block_int8(values, scales, b)).double()
            if not torch.allclose(got, want, atol=0.05, rtol=1e-2):
                return False
    return _lora_agrees(kernel, generator)


def lora_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], a: torch.Tensor,
                   b_t: torch.Tensor, sizes: tuple[int, ...], lo: list[int], width: list[int]) -> torch.Tensor:
    """linear_lora's result in float64: x @ weight.T + bias, plus each row's delta from its columns of a
    [cols, parts, in] and b_t [cols, out] (part p's outputs take part p's shrink, rounded to bf16 as the
    kernel and peft's bf16 lora_A do)."""
    y = x.double() @ weight.double().T + (0 if bias is None else bias.double())
    ends = list(itertools.accumulate(sizes))
    for t, (start, w) in enumerate(zip(lo, width)):
        for p, (first, end) in enumerate(zip([0, *ends[:-1]], ends)):
            xa = (a[start : start + w, p].double() @ x[t].double()).to(torch.bfloat16).double()
            y[t, first:end] += xa @ b_t[start : start + w, first:end].double()
    return y


def _lora_agrees(kernel: LinearKernel, generator: torch.Generator) -> bool:
    """linear_lora on three parts (an odd input count, a bias), 9 rows of widths 0, 8 and 16 in an order
    that groups them by adapter, through the bf16 and the int8 weights, against lora_reference."""
    sizes, in_ = (64, 16, 48), 41
    weight = torch.randn(sum(sizes), in_, generator=generator).to(torch.bfloat16)
    bias = torch.randn(sum(sizes), generator=generator).to(torch.bfloat16)
    a = torch.randn(40, len(sizes), in_, generator=generator).to(torch.bfloat16)
    b_t = torch.randn(40, sum(sizes), generator=generator).to(torch.bfloat16)
    lo, width = [0, 8, 0, 24, 8, 8, 24, 0, 8], [8, 16, 0, 16, 16, 16, 16, 0, 16]
    x = torch.randn(9, in_, generator=generator).to(torch.bfloat16)
    as_int32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    step = LoraStep({}, as_int32(lo), as_int32(width), as_int32(sorted(range(9), key=lambda t: (lo[t], width[t]))))
    pool = lora_pool(a, block_lora_b(b_t), sizes)
    got = kernel.with_lora(x, kernel.block(weight, bias), pool, step).double()
    if not torch.allclose(got, lora_reference(x, weight, bias, a, b_t, sizes, lo, width), atol=0.1, rtol=1e-2):
        return False
    values = torch.randint(-127, 128, weight.shape, generator=generator, dtype=torch.int8)
    scales = torch.rand(weight.shape[0], generator=generator) / 100
    dequantized = (values.double() * scales.double()[:, None])
    got = kernel.with_lora(x, kernel.block_int8(values, scales, bias), pool, step).double()
    return torch.allclose(got, lora_reference(x, dequantized, bias, a, b_t, sizes, lo, width), atol=0.1, rtol=1e-2)


@functools.cache
def linear_kernel() -> Optional[LinearKernel]:
    """The bf16 projection kernel, or None where it can't be had (no AVX512-BF16: oneDNN's packed weights)."""
    try:
        if not torch.cpu._is_avx512_bf16_supported():
            return None
    except AttributeError:  # (a private probe)
        return None
    return _checked("linear_cpu.c", "bf16 CPU projections (oneDNN's packed weights)", _bind_linear, _linear_agrees,
                    openmp=True)


class NormKernels:
    """norm_cpu.c on bf16 CPU rows: the residual add with RMSNorm, SiLU(gate) * up, and RoPE with the
    paged cache's K/V writes."""

    def __init__(self, library: ctypes.CDLL) -> None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self._add_norm, self._silu_mul = library.add_rms_norm_bf16, library.silu_mul_bf16
        self._rope_store = library.rope_store_bf16
        self._add_norm.argtypes = (i64, i64, ptr, i64, ptr, i64, ptr, ctypes.c_float, ptr, i64)
        self._silu_mul.argtypes = (i64, i64, ptr, i64, ptr, i64)
        self._rope_store.argtypes = (i64, i64, i64, i64, ptr, i64, ptr, ptr, ptr, ptr, i64, ptr)
        self._add_norm.restype = self._silu_mul.restype = self._rope_store.restype = ctypes.c_int

    @staticmethod
    def takes(x: torch.Tensor) -> bool:
        """Whether x is rows of bf16 values these kernels read: 2-D, on CPU, each row contiguous."""
        return x.is_cpu and x.dtype == torch.bfloat16 and x.dim() == 2 and x.stride(1) == 1 and x.shape[1] > 0

    def add_rms_norm(self, x: torch.Tensor, delta: Optional[torch.Tensor], weight: torch.Tensor,
                     eps: float) -> torch.Tensor:
        """x += delta in place (when given); returns rms_norm(x) * weight, a new [rows, dim] tensor."""
        rows, dim = x.shape
        if not (self.takes(x) and weight.is_cpu and weight.dtype == torch.bfloat16 and weight.is_contiguous()
                and weight.shape == (dim,) and (delta is None or (self.takes(delta) and delta.shape == x.shape))):
            raise ValueError("add_rms_norm: bf16 CPU rows of one width, and a bf16 weight of that width")
        out = torch.empty(rows, dim, dtype=torch.bfloat16)
        rc = self._add_norm(rows, dim, x.data_ptr(), x.stride(0), 0 if delta is None else delta.data_ptr(),
                            dim if delta is None else delta.stride(0), weight.data_ptr(), eps, out.data_ptr(), dim)
        if rc != 0:
            raise ValueError("add_rms_norm: bad sizes")
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up [rows, 2 * dim] (gate, then up) -> silu(gate) * up [rows, dim]."""
        if not (self.takes(gate_up) and gate_up.shape[1] % 2 == 0):
            raise ValueError("silu_mul: bf16 CPU rows of an even width")
        rows, dim = gate_up.shape[0], gate_up.shape[1] // 2
        out = torch.empty(rows, dim, dtype=torch.bfloat16)
        if self._silu_mul(rows, dim, gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), dim) != 0:
            raise ValueError("silu_mul: bad sizes")
        return out


    supports_dense = False  # rope_store: paged caches only, and no q/k norms
    supports_head_norms = False

    def rope_store(self, qkv: torch.Tensor, heads: int, kv_heads: int, cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   positions: None = None, norms: None = None) -> torch.Tensor:
        """qkv [tokens, (heads + 2 kv_heads) * dim] bf16: q and k rotated in place (cos, sin [tokens,
        1, dim]), k and v written to slot_mapping's slots of k_cache and v_cache [slots, kv_heads,
        dim]. Returns q, a [tokens, heads, dim] view of qkv."""
        if positions is not None or norms is not None:
            raise ValueError("rope_store: norm_cpu.c writes paged caches and has no q/k norms")
        tokens, dim = qkv.shape[0], k_cache.shape[-1] if k_cache.dim() == 3 else 0
        ok = (self.takes(qkv) and dim > 0 and dim % 2 == 0 and qkv.shape[1] == (heads + 2 * kv_heads) * dim
              and all(t.is_cpu and t.dtype == torch.bfloat16 and t.is_contiguous() and t.shape == (tokens, 1, dim)
                      for t in (cos, sin))
              and all(t.is_cpu and t.dtype == torch.bfloat16 and t.is_contiguous() and t.dim() == 3
                      and t.shape[1:] == (kv_heads, dim) for t in (k_cache, v_cache))
              and k_cache.shape == v_cache.shape and slot_mapping.dtype == torch.int64 and slot_mapping.is_cpu
              and slot_mapping.is_contiguous() and slot_mapping.shape == (tokens,))
        if not ok:
            raise ValueError("rope_store: bf16 CPU q/k/v rows, [tokens, 1, dim] tables, [slots, kv_heads, dim] caches")
        rc = self._rope_store(tokens, heads, kv_heads, dim, qkv.data_ptr(), qkv.stride(0), cos.data_ptr(),
                              sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.shape[0],
                              slot_mapping.data_ptr())
        if rc != 0:
            raise ValueError("rope_store: " + ("a slot outside the cache" if rc == -2 else "bad sizes"))
        return qkv.view(tokens, heads + 2 * kv_heads, dim)[:, :heads]


def _rope_agrees(kernels: NormKernels) -> bool:
    """rope_store against torch's rotate-half RoPE (as server/model/rope.py computes it) and
    index_copy_, bit for bit."""
    generator = torch.Generator().manual_seed(0)
    tokens, heads, kv_heads, dim = 5, 6, 2, 16
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * dim + 8, generator=generator) * 3).to(torch.bfloat16)
    qkv = qkv[:, : (heads + 2 * kv_heads) * dim]  # rows apart
    angles = torch.randn(tokens, 1, dim, generator=generator)
    cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
    slots = torch.tensor([7, 0, 3, 9, 4])
    shaped = qkv.reshape(tokens, heads + 2 * kv_heads, dim)
    qk = shaped[:, : heads + kv_heads]
    want_qk = qk * cos + torch.cat([-qk[..., dim // 2 :], qk[..., : dim // 2]], dim=-1) * sin
    want_k, want_v = (torch.zeros(10, kv_heads, dim, dtype=torch.bfloat16) for _ in range(2))
    want_k.index_copy_(0, slots, want_qk[:, heads:])
    want_v.index_copy_(0, slots, shaped[:, heads + kv_heads :])
    k_cache, v_cache = (torch.zeros(10, kv_heads, dim, dtype=torch.bfloat16) for _ in range(2))
    got = qkv.clone()
    q = kernels.rope_store(got, heads, kv_heads, cos, sin, k_cache, v_cache, slots)
    return bool(torch.equal(q, want_qk[:, :heads]) and torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v))


def _norms_agree(kernels: NormKernels) -> bool:
    """Against torch's ops on rows apart, with and without the residual add; all but a few of the
    values (a sum taken in another order can move a rounding) bit for bit."""
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 70, generator=generator) * 3).to(torch.bfloat16)[:, :64]
    delta = torch.randn(5, 64, generator=generator).to(torch.bfloat16)
    weight = torch.randn(64, generator=generator).to(torch.bfloat16)
    for d in (None, delta):
        want_x = x if d is None else x + d
        want = torch.nn.functional.rms_norm(want_x, (64,), weight, 1e-5)
        got_x = x.clone()
        got = kernels.add_rms_norm(got_x, d, weight, 1e-5)
        if not torch.equal(got_x, want_x) or (got != want).float().mean() > 0.02:
            return False
        if not torch.allclose(got.float(), want.float(), atol=0.05, rtol=0.02):
            return False
    gate_up = (torch.randn(5, 200, generator=generator) * 4).to(torch.bfloat16)[:, :128]
    want = torch.nn.functional.silu(gate_up[:, :64]) * gate_up[:, 64:]
    got = kernels.silu_mul(gate_up)
    close = torch.allclose(got.float(), want.float(), atol=0.02, rtol=0.02)
    return bool(close and (got != want).float().mean() <= 0.02)


@functools.cache
def norm_kernels() -> Optional[NormKernels]:
    """The residual-add + RMSNorm and SiLU-mul kernels for bf16 CPU rows, or None where they can't be had."""
    return _checked("norm_cpu.c", "bf16 CPU norms, activations and RoPE", NormKernels,
                    lambda kernels: _norms_agree(kernels) and _rope_agrees(kernels))


class GreedyKernel:
    """greedy_cpu.c: each fp32 logits row's argmax and its log-probability in two vectorized passes."""

    def __init__(self, library: ctypes.CDLL) -> None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self._greedy = library.greedy_rows
        self._greedy.argtypes = (i64, i64, ptr, i64, ptr, ptr)
        self._greedy.restype = ctypes.c_int

    def __call__(self, logits: torch.Tensor) -> Optional[tuple[list[int], list[float]]]:
        """logits [rows, vocab] float32 on CPU -> (tokens, logprobs), or None for a row with a NaN
        (the caller's torch ops decide what that means)."""
        if not (logits.is_cpu and logits.dtype == torch.float32 and logits.dim() == 2 and logits.stride(1) == 1
                and logits.shape[1] > 0):
            raise ValueError("greedy_rows: float32 [rows, vocab] CPU logits, each row contiguous")
        rows = logits.shape[0]
        tokens, logprobs = torch.empty(rows, dtype=torch.int64), torch.empty(rows, dtype=torch.float32)
        rc = self._greedy(rows, logits.shape[1], logits.data_ptr(), logits.stride(0), tokens.data_ptr(),
                          logprobs.data_ptr())
        if rc == -1:
            return None
        if rc != 0:
            raise ValueError("greedy_rows: not built for this CPU")
        return tokens.tolist(), logprobs.tolist()


def _greedy_agrees(kernel: GreedyKernel) -> bool:
    """Against the torch ops it replaces (sampler.greedy_batch's): ragged widths, ties, -inf."""
    generator = torch.Generator().manual_seed(0)
    for vocab in (1, 37, 4096):
        logits = torch.randn(6, vocab + 3, generator=generator)[:, :vocab] * 8
        logits[1] = logits[1].round()  # ties: the first of them
        logits[2, : vocab // 2] = float("-inf")
        got = kernel(logits)
        best, tokens = logits.max(-1)
        logprobs = (logits - best[:, None]).clamp(min=-80.0).exp().sum(-1).log().neg()
        if got is None or got[0] != tokens.tolist() or not torch.allclose(torch.tensor(got[1]), logprobs,
                                                                           atol=1e-5, rtol=1e-5):
            return False
    return kernel(torch.tensor([[0.0, float("nan")]])) is None


@functools.cache
def greedy_kernel() -> Optional[GreedyKernel]:
    """The batched greedy sampling kernel, or None where it can't be had."""
    return _checked("greedy_cpu.c", "CPU greedy sampling", GreedyKernel, _greedy_agrees)


# ---- decoder_cpu.c: a decode step's layers in one call ----


class DecodeKernels(ctypes.Structure):
    """decoder_cpu.c's kernels: the other libraries' entry points, as function pointers."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("linear", "int8", "lora", "norm", "silu", "rope", "attention")]


class DecodeProjection(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("pool", ctypes.c_void_p), ("in_features", ctypes.c_int64), ("out_features", ctypes.c_int64)]


class DecodeLayer(ctypes.Structure):
    _fields_ = [("in_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p), ("qkv", DecodeProjection),
                ("o", DecodeProjection), ("gate_up", DecodeProjection), ("down", DecodeProjection),
                ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p), ("window", ctypes.c_int64)]


class DecodeStep(ctypes.Structure):
    _fields_ = [*((name, ctypes.c_int64) for name in ("rows", "hidden", "heads", "kv_heads", "dim", "intermediate",
                                                      "slots", "attend_len")),
                ("eps", ctypes.c_float), ("scale", ctypes.c_float),
                *((name, ctypes.c_void_p) for name in ("x", "normed", "qkv", "attn", "o_out", "gate_up", "act",
                                                       "down_out", "cos", "sin", "slot_mapping", "gather", "lens",
                                                       "scratch", "lo", "width", "order"))]


DECODE_PLACES = {1: "a projection", 2: "a norm", 3: "RoPE and the K/V store", 4: "SiLU-mul", 5: "attention"}


class DecodeLayersKernel:
    """decoder_cpu.c:decode_layers, with the kernels it calls (their libraries already checked)."""

    def __init__(self, function: Callable[..., int], kernels: DecodeKernels, keep: tuple) -> None:
        self.function, self.kernels, self._keep = function, kernels, keep  # (keep: the libraries stay loaded)

    def __call__(self, step: DecodeStep, layers: ctypes.Array) -> None:
        rc = self.function(ctypes.byref(self.kernels), ctypes.byref(step), layers, len(layers))
        if rc != 0:
            code = -rc
            layer, place, kernel_rc = code // 100, code % 100 // 10, code % 10
            raise ValueError(f"decode_layers: layer {layer}: {DECODE_PLACES.get(place, 'its shapes')} failed "
                             f"(code {-kernel_rc})")


def _address(function: Callable) -> int:
    return ctypes.cast(function, ctypes.c_void_p).value


@functools.cache
def decode_layers_kernel() -> Optional[DecodeLayersKernel]:
    """decode_layers bound to linear_cpu.c's, norm_cpu.c's and attention_cpu.c's kernels (each checked
    against torch on its own), or None where any of them can't be had."""
    linear, norms = linear_kernel(), norm_kernels()
    attention = _library("attention_cpu.c", "CPU decode attention") if attention_kernel() is not None else None
    if linear is None or norms is None or attention is None:
        return None
    library = _library("decoder_cpu.c", "decode steps in one call (a Python loop over the layers)")
    if library is None:
        return None
    function = library.decode_layers
    function.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
    function.restype = ctypes.c_int
    kernels = DecodeKernels(*(_address(f) for f in (linear.function, linear.int8_function, linear.lora_function,
                                                    norms._add_norm, norms._silu_mul, norms._rope_store,
                                                    attention.paged_decode_attention_bf16_avx512)))
    return DecodeLayersKernel(function, kernels, (library, attention))
