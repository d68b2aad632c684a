"""The batched multi-LoRA op against a row-by-row float64 reference, table-driven."""

from typing import Optional, Sequence

import pytest
import torch

from server.adapters.lora import (
    BF16_COSTS,
    FP32_COSTS,
    SLOT_COLUMNS,
    LoraPlanner,
    MaskedWindow,
    lora_delta,
    slot_width,
)
from server.kernels.native import lora_kernel

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


def pack(adapters, gap_slots: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Packed as the device tier does: whole slots per adapter (zero padding), `gap_slots` slots of
    another adapter's junk between neighbours (what the window and the groups must skip)."""
    offsets, start = [], 0
    for x, _ in adapters:
        offsets.append((start, start + slot_width(x.shape[0])))
        start += slot_width(x.shape[0]) + gap_slots * SLOT_COLUMNS
    a, b_t = torch.randn(start, IN), torch.randn(start, OUT)  # junk everywhere ...
    for (lo, hi), (x, y) in zip(offsets, adapters):  # ... but in each adapter's own slots
        a[lo:hi], b_t[lo:hi] = 0, 0
        a[lo : lo + x.shape[0]], b_t[lo : lo + x.shape[0]] = x, y.t()
    return a, b_t, offsets


CPU = torch.device("cpu")
PLANNER = LoraPlanner(CPU, torch.float32, FP32_COSTS)  # torch ops only, picked by the cost model
BF16_PLANNER = LoraPlanner(CPU, torch.bfloat16, BF16_COSTS)
SERVING_PLANNER = LoraPlanner.for_device(CPU, torch.float32)  # with the C kernel where it builds
METHODS = {"window": PLANNER._window, "runs": PLANNER._runs, "groups": PLANNER._groups,
           "gathered": PLANNER._gathered, "auto": PLANNER.plan, "auto_bf16_costs": lambda *a: BF16_PLANNER.plan(*a),
           "serving": SERVING_PLANNER.plan}
if SERVING_PLANNER.kernel is not None:
    METHODS["columns"] = SERVING_PLANNER._token_columns
CASES = [
    ([8], [0, 0, 0]),  # one adapter
    ([8, 32, 4], [0, 1, 2, 1, 0]),  # mixed ranks
    ([8, 32, 4], [None, 1, None, 2]),  # rows without an adapter
    ([16, 16], [1, 1, 1]),  # window covers only the second adapter
    ([64, 8, 8, 8], [3, 0, 2, None, 1, 3]),  # rank >= 32 beside small ones
    ([8] * 14, [5, 0, 13, None, 7, 5, 2, 9, 11, 1, 3, 12, 4, 6, 10, 8]),  # many one-slot adapters
]


def methods_for(ranks: list[int], rows: list) -> list[str]:
    widths = {slot_width(ranks[r]) for r in rows if r is not None}
    return [m for m in METHODS if (m != "groups" or widths == {SLOT_COLUMNS}) and (m != "gathered" or len(widths) == 1)]


@pytest.mark.parametrize("gap", [0, 2])
@pytest.mark.parametrize("ranks, rows", CASES)
def test_decode_rows_match_float64_reference(ranks, rows, gap):
    adapters = make_adapters(ranks)
    a, b_t, offsets = pack(adapters, gap)
    x = torch.randn(len(rows), IN)
    ranges = tuple(offsets[r] if r is not None else None for r in rows)
    want = lora_reference(x, [adapters[r] if r is not None else None for r in rows])
    for method in methods_for(ranks, rows):
        got = lora_delta(x, a, b_t, METHODS[method](ranges, (1,) * len(rows)))
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4, msg=method)


@pytest.mark.parametrize("ranks, rows, lens", [([8, 32], [1, None, 0], [3, 2, 4]),
                                               ([8, 8, 8], [2, 0, None, 1, 0], [1, 1, 5, 7, 3])])
def test_prefill_rows_with_several_tokens_each(ranks, rows, lens):
    adapters = make_adapters(ranks)
    a, b_t, offsets = pack(adapters, gap_slots=1)
    x = torch.randn(sum(lens), IN)
    ranges = tuple(offsets[r] if r is not None else None for r in rows)
    per_token = [r for r, n in zip(rows, lens) for _ in range(n)]
    want = lora_reference(x, [adapters[r] if r is not None else None for r in per_token])
    for method in methods_for(ranks, rows):
        got = lora_delta(x, a, b_t, METHODS[method](ranges, tuple(lens)))
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4, msg=method)


def test_the_delta_adds_into_a_column_slice():
    adapters = make_adapters([8, 8])
    a, b_t, offsets = pack(adapters, gap_slots=1)
    x, rows = torch.randn(4, IN), [0, 1, None, 1]
    ranges = tuple(offsets[r] if r is not None else None for r in rows)
    want = lora_reference(x, [adapters[r] if r is not None else None for r in rows])
    for method in methods_for([8, 8], rows):
        fused = torch.ones(4, 3 * OUT)  # the method adds into the middle part only
        METHODS[method](ranges, (1,) * 4).add(fused[:, OUT : 2 * OUT], x, a, b_t)
        torch.testing.assert_close((fused[:, OUT : 2 * OUT] - 1).double(), want, atol=1e-4, rtol=1e-4, msg=method)
        assert (fused[:, :OUT] == 1).all() and (fused[:, 2 * OUT :] == 1).all()


@pytest.mark.parametrize(
    "ranges, lens, expected",
    [
        ([None, None], [1, 1], None),  # base only: no LoRA at all
        ([(8, 16)] * 3, [1, 1, 5], "OneAdapter"),  # one adapter for every token: no mask
        ([(0, 8), (8, 16), None], [1, 1, 1], "MaskedWindow"),  # a narrow window is cheapest
        ([(8 * (5 * i % 32), 8 * (5 * i % 32) + 8) for i in range(32)], [1] * 32, "SortedGroups"),  # 32 spread
        ([(0, 8), (400, 432), (800, 816)], [1, 1, 1], "SortedRuns"),  # wide window, ranks that differ
    ],
)
def test_the_planner_picks_by_cost(ranges, lens, expected):
    plan = PLANNER.plan(ranges, lens)
    assert (type(plan).__name__ if plan is not None else None) == expected


@pytest.mark.parametrize(
    "ranges, lens, expected",
    [
        ([(0, 8), (8, 16), None], [1, 1, 1], "MaskedWindow"),  # a narrow window is cheapest
        ([(8 * (5 * i % 64), 8 * (5 * i % 64) + 8) for i in range(32)], [1] * 32, "GatheredRows"),  # 32 spread
        ([(0, 8), (400, 408), (800, 808)], [40, 40, 40], "SortedRuns"),  # long prefill runs
    ],
)
def test_the_bf16_planner_has_its_own_costs(ranges, lens, expected):
    assert type(BF16_PLANNER.plan(ranges, lens)).__name__ == expected


def test_the_cuda_planner_keeps_the_masked_window():
    planner = LoraPlanner(torch.device("cpu"), torch.float32, costs=None)
    ranges = [(8 * (5 * i % 32), 8 * (5 * i % 32) + 8) for i in range(32)]
    plan = planner.plan(ranges, [1] * 32)
    assert isinstance(plan, MaskedWindow)
    mask = plan.dense_mask(256, torch.float32)
    assert mask.sum() == 32 * 8 and all(mask[i, lo:hi].all() for i, (lo, hi) in enumerate(ranges))


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


def test_the_kernel_is_built_where_there_is_a_compiler():
    import shutil

    assert (lora_kernel() is not None) == (shutil.which("cc") is not None or shutil.which("gcc") is not None)


needs_kernel = pytest.mark.skipif(lora_kernel() is None, reason="no C compiler here: torch ops only")


@needs_kernel
@pytest.mark.parametrize(
    "ranges, lens, expected",
    [
        ([(8, 16)] * 3, [1, 1, 5], "TokenColumns"),  # one adapter
        ([(8, 16)], [1024], "TokenColumns"),  # one adapter's long prefill
        ([None, None], [1, 1], None),  # base only: no LoRA at all
        ([(0, 8), (8, 16), None], [1, 1, 1], "TokenColumns"),
        ([(0, 8), (400, 408), (800, 808)], [40, 40, 40], "TokenColumns"),
    ],
)
def test_with_the_kernel_the_planner_always_uses_it(ranges, lens, expected):
    plan = SERVING_PLANNER.plan(ranges, lens)
    assert (type(plan).__name__ if plan is not None else None) == expected


@needs_kernel
def test_the_kernel_in_bf16_against_the_float64_reference():
    adapters = [(a.bfloat16(), b.bfloat16()) for a, b in make_adapters([8, 16, 8])]
    a, b_t, offsets = pack(adapters, gap_slots=1)
    a, b_t = a.bfloat16(), b_t.bfloat16()
    rows, lens = [2, None, 0, 1], [3, 1, 1, 2]
    x = torch.randn(sum(lens), IN).bfloat16()
    ranges = tuple(offsets[r] if r is not None else None for r in rows)
    per_token = [r for r, n in zip(rows, lens) for _ in range(n)]
    want = lora_reference(x, [adapters[r] if r is not None else None for r in per_token])
    y = torch.zeros(sum(lens), OUT, dtype=torch.bfloat16)
    LoraPlanner.for_device(CPU, torch.bfloat16)._token_columns(ranges, tuple(lens)).add(y, x, a, b_t)
    torch.testing.assert_close(y.double(), want, atol=0.05, rtol=1e-2)  # one bf16 rounding of y


@needs_kernel
def test_the_kernel_refuses_tensors_it_cannot_read():
    kernel = lora_kernel()
    x, a, b_t = torch.randn(2, IN), torch.randn(16, IN), torch.randn(16, OUT)
    lo, width = torch.zeros(2, dtype=torch.int32), torch.full((2,), 8, dtype=torch.int32)
    order = torch.arange(2, dtype=torch.int32)
    y = torch.zeros(2, OUT)
    with pytest.raises(ValueError):
        kernel(y, x, a.t().contiguous().t(), b_t, lo, width, order)  # A not row-major
    with pytest.raises(ValueError):
        kernel(y, x.bfloat16(), a, b_t, lo, width, order)  # mixed dtypes
    with pytest.raises(ValueError):
        kernel(y, x, a, b_t, lo.long(), width, order)  # int64 offsets
    with pytest.raises(ValueError):
        kernel(y, x, a, b_t, lo, torch.full((2,), 2000, dtype=torch.int32), order)  # wider than the kernel's bound
    with pytest.raises(ValueError):
        kernel(y, x, a, b_t, torch.tensor([0, 12], dtype=torch.int32), width, order)  # past the 16 columns
    with pytest.raises(ValueError):
        kernel(y, x, a, b_t, torch.tensor([-8, 0], dtype=torch.int32), width, order)
    with pytest.raises(ValueError):
        kernel(y, x, a, b_t, lo, width, torch.tensor([0, 5], dtype=torch.int32))  # an order naming no token
    with pytest.raises(ValueError):  # shaped right in its first two dimensions, but with no storage behind
        kernel(y, x, torch.empty(16, IN, 0), b_t, lo, width, order)
    with pytest.raises(ValueError):
        kernel(y, x, a, b_t, lo, width, torch.zeros(2, 0, dtype=torch.int32))
    with pytest.raises(ValueError):
        kernel(y.half(), x.half(), a.half(), b_t.half(), lo, width, order)  # a dtype it has no code for
