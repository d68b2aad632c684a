"""The decoder's elementwise work on CUDA in three Triton kernels a layer, where torch spends ~15
small ones (the same seams as norm_cpu.c on CPU, server/kernels/native.py), and decode attention:

  add_rms_norm: the residual add and the next RMSNorm in one pass;
  silu_mul:     silu(gate) * up from the fused gate/up projection;
  rope_store:   RoPE of q and k (after Qwen3's per-head norms, where the family has them) in place
                in the fused q/k/v rows, and k and v written to the KV cache (dense or paged);
  decode_attention: each decode row over its own cached positions only, split along them when
                few rows would leave the GPU idle (flash-decoding), the splits then combined.

At batch 1 an 8B model's step is ~870 kernels, each ~2 us of launch and ramp inside a CUDA graph:
a fifth of the step beside ~5 ms of matmuls (docs/benchmarks.md). `TRITON_INTERPRET=1` runs the
same kernels on CPU tensors (the tests do, in fp32).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Optional

import torch

log = logging.getLogger(__name__)

SILU_BLOCK = 1024  # columns per silu_mul program
ATTENTION_BLOCK = 64  # cache positions per decode-attention iteration
MAX_SPLITS = 16  # pieces a decode row's positions may be cut into (flash-decoding), a power of two
HeadNorms = tuple[torch.Tensor, torch.Tensor, float]  # q_norm and k_norm weights [head_dim], eps (Qwen3)


class TritonKernels:
    """The elementwise kernels behind the interface of native.NormKernels (plus dense caches and q/k
    norms), and decode attention over dense caches."""

    supports_dense = supports_head_norms = True

    def __init__(self, jit: object, device_type: str = "cuda") -> None:
        self._jit, self.device_type = jit, device_type  # ("cpu": Triton's interpreter, for the tests)

    def takes(self, x: torch.Tensor) -> bool:
        """Whether x is rows these kernels read: 2-D, on their device, each row contiguous."""
        return x.device.type == self.device_type and x.dim() == 2 and x.stride(1) == 1 and x.shape[1] > 0

    def add_rms_norm(self, x: torch.Tensor, delta: Optional[torch.Tensor], weight: torch.Tensor,
                     eps: float) -> torch.Tensor:
        """x += delta in place (when given); returns rms_norm(x) * weight, a new [rows, dim] tensor."""
        rows, dim = x.shape
        if not (self.takes(x) and _vector(weight, x, dim) and (delta is None or (self.takes(delta)
                                                                               and delta.shape == x.shape))):
            raise ValueError("add_rms_norm: rows of one width on one device, and a weight of that width")
        out = torch.empty(rows, dim, dtype=x.dtype, device=x.device)
        if rows:
            d = x if delta is None else delta
            self._jit.add_rms_norm[(rows,)](x, x.stride(0), d, d.stride(0), weight, out, dim, dim, eps,
                                            HAS_DELTA=delta is not None, BLOCK=_pow2(dim),
                                            num_warps=_warps(dim))
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up [rows, 2 * dim] (gate, then up) -> silu(gate) * up [rows, dim]."""
        if not (self.takes(gate_up) and gate_up.shape[1] % 2 == 0):
            raise ValueError("silu_mul: rows of an even width on the kernels' device")
        rows, dim = gate_up.shape[0], gate_up.shape[1] // 2
        out = torch.empty(rows, dim, dtype=gate_up.dtype, device=gate_up.device)
        if rows:
            self._jit.silu_mul[(rows, -(-dim // SILU_BLOCK))](gate_up, gate_up.stride(0), out, dim, dim,
                                                               BLOCK=SILU_BLOCK, num_warps=4)
        return out

    def rope_store(self, qkv: torch.Tensor, heads: int, kv_heads: int, cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                   positions: Optional[torch.Tensor] = None, norms: Optional[HeadNorms] = None) -> torch.Tensor:
        """qkv [tokens, (heads + 2 kv_heads) * dim]: q and k (normed first with `norms`) rotated in
        place (cos, sin [tokens, 1, dim]), k and v written to the caches. Paged caches [slots,
        kv_heads, dim] take each token's flat slot; dense ones [slots, kv_heads, capacity, dim] its
        slot and position. Returns q, a [tokens, heads, dim] view of qkv."""
        tokens, dim = qkv.shape[0], k_cache.shape[-1]
        if not (self.takes(qkv) and _rope_shapes(qkv, heads, kv_heads, cos, sin, k_cache, v_cache, slots, positions)):
            raise ValueError("rope_store: q/k/v rows, [tokens, 1, dim] tables, [slots, kv_heads, dim] paged or "
                             "[slots, kv_heads, capacity, dim] dense caches, one dtype and device")
        view = qkv.view(tokens, heads + 2 * kv_heads, dim)
        if norms is not None and not all(_vector(w, qkv, dim) for w in norms[:2]):
            raise ValueError("rope_store: q/k norm weights of the head's width on the rows' device")
        if not tokens:
            return view[:, :heads]
        pos, pos_stride = (slots, 0) if positions is None else (positions, k_cache.stride(2))
        q_norm, k_norm, eps = norms if norms is not None else (cos, cos, 0.0)  # (unread without norms)
        self._jit.rope_store[(tokens, heads + 2 * kv_heads)](
            qkv, qkv.stride(0), cos, sin, k_cache, v_cache, slots, k_cache.stride(0), pos, pos_stride,
            k_cache.stride(1), heads, kv_heads, dim // 2, eps, q_norm, k_norm,
            NORMED=norms is not None, HALF=_pow2(dim // 2), num_warps=1)
        return view[:, :heads]

    def decode_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                         lengths: torch.Tensor, window: Optional[int], scale: float) -> torch.Tensor:
        """Each decode row's attention over its own positions [0, lengths[r]) (the last `window` of
        them, where given) of its slot in dense caches [slots, kv_heads, capacity, dim]: q [rows,
        heads, dim] (each row's heads contiguous), slots and lengths [rows] on the device. Returns
        [rows, heads, dim]. Reads no position past a row's length, whatever the cache's capacity
        (a CUDA graph's step attended over all of it under a mask: 4x the time at 1 row)."""
        rows, heads, dim = q.shape
        kv_heads = k_cache.shape[1] if k_cache.dim() == 4 else 0
        if not (q.device.type == self.device_type and q.stride(2) == 1 and q.stride(1) == dim and kv_heads
                and heads % kv_heads == 0 and k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
                and k_cache.shape[-1] == dim and k_cache.stride(-1) == 1
                and all(t.device == q.device and t.dtype == q.dtype for t in (k_cache, v_cache))
                and all(t.device == q.device and t.shape == (rows,) and t.is_contiguous() for t in (slots, lengths))):
            raise ValueError("decode_attention: q [rows, heads, dim], dense [slots, kv_heads, capacity, dim] caches, "
                             "[rows] slots and lengths, one device and dtype")
        out = torch.empty(rows, heads, dim, dtype=q.dtype, device=q.device)
        if not rows:
            return out
        group, splits = heads // kv_heads, self._splits(rows * kv_heads, q.device)
        part = stat = out  # (unread with one split)
        if splits > 1:
            part = torch.empty(rows, heads, splits, dim, dtype=torch.float32, device=q.device)
            stat = torch.empty(rows, heads, splits, 2, dtype=torch.float32, device=q.device)
        self._jit.decode_attention[(rows, kv_heads, splits)](
            q, q.stride(0), k_cache, v_cache, slots, lengths, out, out.stride(0), part, stat, k_cache.stride(0),
            k_cache.stride(1), k_cache.stride(2), heads, dim, scale, window or 0, GROUP=group,
            G_PAD=max(16, _pow2(group)), D_PAD=_pow2(dim), BLOCK_N=ATTENTION_BLOCK, SPLITS=splits,
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4)
        if splits > 1:
            self._jit.combine_splits[(rows, heads)](part, stat, out, out.stride(0), heads, dim, SPLITS=splits,
                                                    D_PAD=_pow2(dim))
        return out

    def _splits(self, programs: int, device: torch.device) -> int:
        """Pieces each row's positions are cut into: enough programs for two per SM, at most MAX_SPLITS."""
        want = max(1, 2 * _multiprocessors(device) // programs)
        return min(MAX_SPLITS, 1 << (want.bit_length() - 1))


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    """The device's SM count (read once: an eager step asks in every layer); 8 for the interpreter."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _warps(dim: int) -> int:
    return max(1, min(16, _pow2(dim) // 512))


def _vector(w: torch.Tensor, like: torch.Tensor, dim: int) -> bool:
    return w.device == like.device and w.dtype == like.dtype and w.is_contiguous() and w.shape == (dim,)


def _rope_shapes(qkv: torch.Tensor, heads: int, kv_heads: int, cos: torch.Tensor, sin: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                 positions: Optional[torch.Tensor]) -> bool:
    tokens, dim = qkv.shape[0], k_cache.shape[-1]
    dense = positions is not None
    index_ok = all(t is not None and t.device == qkv.device and t.dtype in (torch.int32, torch.int64)
                   and t.is_contiguous() and t.shape == (tokens,) for t in (slots, *((positions,) if dense else ())))
    return (qkv.is_contiguous() and dim % 2 == 0
          and qkv.shape[1] == (heads + 2 * kv_heads) * dim and index_ok
          and all(t.device == qkv.device and t.dtype == qkv.dtype and t.is_contiguous()
                  and t.shape == (tokens, 1, dim) for t in (cos, sin))
          and all(t.device == qkv.device and t.dtype == qkv.dtype and t.dim() == (4 if dense else 3)
                  and t.shape[1] == kv_heads and t.stride(-1) == 1 for t in (k_cache, v_cache))
          and k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride())


def _agrees(kernels: TritonKernels, device: torch.device) -> bool:
    """Each kernel against the torch ops it replaces, on small fp32 tensors of this device."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x, d, w = (torch.randn(3, 80, generator=g).to(device) for _ in range(3))
    w = w[0]
    got_x = x.clone()
    got = kernels.add_rms_norm(got_x, d, w, 1e-6)
    want = torch.nn.functional.rms_norm(x + d, (80,), w, 1e-6)
    gate_up = torch.randn(3, 160, generator=g).to(device)
    silu = torch.nn.functional.silu(gate_up[:, :80]) * gate_up[:, 80:]
    qkv = torch.randn(3, 4 * 8, generator=g).to(device)  # 2 heads, 1 kv head, dim 8
    angles = torch.randn(3, 1, 4, generator=g).to(device)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    cache = torch.zeros(2, 1, 5, 8, device=device)  # dense: [slots, kv_heads, capacity, dim]
    q = kernels.rope_store(qkv.clone(), 2, 1, cos, sin, cache, cache.clone(), torch.arange(3, device=device) % 2,
                           torch.tensor([0, 1, 4], device=device))
    qk = qkv.view(3, 4, 8)[:, :3]
    want_qk = qk * cos + torch.cat([-qk[..., 4:], qk[..., :4]], -1) * sin  # rotate-half RoPE
    return (torch.allclose(got_x, x + d) and torch.allclose(got, want, atol=1e-5)
            and torch.allclose(kernels.silu_mul(gate_up), silu, atol=1e-5)
            and torch.allclose(q, want_qk[:, :2], atol=1e-5)
            and torch.allclose(cache[0, 0, 0], want_qk[0, 2], atol=1e-5)
            and torch.allclose(cache[0, 0, 4], want_qk[2, 2], atol=1e-5))


@functools.cache
def cuda_kernels() -> Optional[TritonKernels]:
    """The kernels, checked once on the current CUDA device, or None (callers keep their torch ops;
    LORASERVE_TRITON_KERNELS=0 asks for that)."""
    if os.environ.get("LORASERVE_TRITON_KERNELS", "1") == "0":
        log.info("LORASERVE_TRITON_KERNELS=0: CUDA norms, RoPE and decode attention use torch ops")
        return None
    try:
        from server.kernels import fused_triton_jit

        kernels = TritonKernels(fused_triton_jit)
        if _agrees(kernels, torch.device("cuda")):
            return kernels
        log.warning("the Triton elementwise kernels disagree with torch: CUDA norms and RoPE use torch ops")
    except Exception as exc:  # noqa: BLE001 (no Triton, no CUDA, a compile that failed)
        log.info("Triton elementwise kernels unavailable (%s): CUDA norms and RoPE use torch ops", exc)
    return None
