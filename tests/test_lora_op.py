"""The batched multi-LoRA op against a row-by-row float64 reference, table-driven."""

from typing import Optional, Sequence

import pytest
import torch

from server.adapters.lora import LoraBatch, lora_delta

IN, OUT = 48, 40


def lora_reference(x: torch.Tensor, adapters: Sequence[Optional[tuple[torch.Tensor, torch.Tensor]]]) -> torch.Tensor:
    """Row-by-row float64 reference: adapters[i] is (A [r, in], B_scaled [out, r]) or None."""
    rows = []
    for xi, pair in zip(x.double(), adapters):
        if pair is None:
            rows.append(torch.zeros(0, dtype=torch.float64))
            continue
        a, b = (t.double() for t in pair)
        rows.append(b @ (a @ xi))
    out = max((r.numel() for r in rows), default=0)
    return torch.stack([r if r.numel() else torch.zeros(out, dtype=torch.float64) for r in rows])


def make_adapters(ranks: list[int], seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(r, IN, generator=g), torch.randn(OUT, r, generator=g)) for r in ranks]


def pack(adapters) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    a = torch.cat([x for x, _ in adapters])  # [cols, in]
    b_t = torch.cat([y.t() for _, y in adapters])  # [cols, out]
    offsets, start = [], 0
    for x, _ in adapters:
        offsets.append((start, start + x.shape[0]))
        start += x.shape[0]
    return a, b_t, offsets


def batch_for(rows: list[int | None], offsets, tokens_per_row: list[int]) -> LoraBatch:
    used = [offsets[r] for r in rows if r is not None]
    lo, hi = min(u[0] for u in used), max(u[1] for u in used)
    mask = torch.zeros(sum(tokens_per_row), hi - lo)
    start = 0
    for r, n in zip(rows, tokens_per_row):
        if r is not None:
            mask[start : start + n, offsets[r][0] - lo : offsets[r][1] - lo] = 1
        start += n
    return LoraBatch(lo, hi, mask)


@pytest.mark.parametrize(
    "ranks, rows",
    [
        ([8], [0, 0, 0]),  # one adapter
        ([8, 32, 4], [0, 1, 2, 1, 0]),  # mixed ranks
        ([8, 32, 4], [None, 1, None, 2]),  # rows without an adapter
        ([16, 16], [1, 1, 1]),  # window covers only the second adapter
        ([64, 8, 8, 8], [3, 0, 2, None, 1, 3]),  # rank >= 32 beside small ones
    ],
)
def test_decode_rows_match_float64_reference(ranks, rows):
    adapters = make_adapters(ranks)
    a, b_t, offsets = pack(adapters)
    x = torch.randn(len(rows), IN)
    got = lora_delta(x, a, b_t, batch_for(rows, offsets, [1] * len(rows)))
    want = lora_reference(x, [adapters[r] if r is not None else None for r in rows])
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_prefill_rows_with_several_tokens_each():
    adapters = make_adapters([8, 32])
    a, b_t, offsets = pack(adapters)
    rows, lens = [1, None, 0], [3, 2, 4]
    x = torch.randn(sum(lens), IN)
    got = lora_delta(x, a, b_t, batch_for(rows, offsets, lens))
    per_token = [r for r, n in zip(rows, lens) for _ in range(n)]
    want = lora_reference(x, [adapters[r] if r is not None else None for r in per_token])
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_single_adapter_batch_needs_no_mask():
    adapters = make_adapters([8, 16])
    a, b_t, offsets = pack(adapters)
    x = torch.randn(5, IN)
    lo, hi = offsets[1]
    got = lora_delta(x, a, b_t, LoraBatch(lo, hi, None))
    torch.testing.assert_close(got.double(), lora_reference(x, [adapters[1]] * 5), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "ops, expected_free, expected_end",
    [
        ([("a", 8), ("a", 4), ("a", 16)], [], 28),
        ([("a", 8), ("a", 4), ("r", 0)], [(0, 8)], 12),  # a hole where the first range was
        ([("a", 8), ("a", 4), ("r", 1)], [], 8),  # the top range freed: end drops
        ([("a", 8), ("a", 4), ("a", 4), ("r", 0), ("r", 1), ("a", 6)], [(6, 12)], 16),  # merged hole reused
    ],
)
def test_column_allocator_reuses_and_merges_holes(ops, expected_free, expected_end):
    from server.adapters.lora import ColumnAllocator

    allocator, ranges = ColumnAllocator(), []
    for op, arg in ops:
        if op == "a":
            lo = allocator.allocate(arg)
            ranges.append((lo, lo + arg))
        else:
            allocator.release(*ranges[arg])
    assert allocator.free == expected_free and allocator.end == expected_end
