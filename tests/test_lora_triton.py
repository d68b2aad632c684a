"""The CUDA LoRA kernels (server/kernels/lora_triton.py), run by Triton's interpreter on CPU tensors
(TRITON_INTERPRET=1, fp32: the interpreter mangles bf16 here): against a row-by-row float64
reference, part by part for a fused projection, and through a tiny model's forward pass against
the CPU path. On a GPU the same kernels are compiled; bench/gpu/session.sh checks them there."""

from __future__ import annotations

import pytest
import torch

from server.adapters.lora import FP32_COSTS, LoraPlanner, ResidentAdapters, SortedTiles, lora_delta
from server.adapters.weights import AdapterKey, AdapterWeights
from server.kernels import lora_triton
from server.model.decoder import ForwardBatch
from tests.model_factory import random_causal_lm
from tests.test_lora_op import CASES, lora_reference, make_adapters, pack

pytest.importorskip("triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: interpreted (tests/conftest.py)


@pytest.fixture(autouse=True)
def kernels():
    assert lora_triton.triton_kernels() is not None


def planner(triton: bool) -> LoraPlanner:
    """The Triton plan, or the CPU tier's own (the torch methods by cost; on CUDA the masked window)."""
    return LoraPlanner(DEVICE, torch.float32, costs=None if triton or DEVICE.type == "cuda" else FP32_COSTS,
                       triton=triton)


@pytest.mark.parametrize("gap", [0, 2])
@pytest.mark.parametrize("ranks, rows", CASES)
def test_sorted_tiles_match_float64_reference(ranks, rows, gap):
    adapters = make_adapters(ranks)
    a, b_t, offsets = pack(adapters, gap)
    x = torch.randn(len(rows), a.shape[1])
    ranges = tuple(offsets[r] if r is not None else None for r in rows)
    plan = planner(triton=True).plan(ranges, (1,) * len(rows))
    assert isinstance(plan, SortedTiles) and plan.rank_tile >= max(hi - lo for lo, hi in offsets)
    want = lora_reference(x, [adapters[r] if r is not None else None for r in rows])
    got = lora_delta(x.to(DEVICE), a.to(DEVICE), b_t.to(DEVICE), plan)
    torch.testing.assert_close(got.cpu().double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tokens, in_features", [(1, 1000), (3, 129), (40, 64)])
def test_fused_parts_in_one_launch_each_way(tokens, in_features):
    """Three parts of different widths over one shared input, B^T side by side: each output column
    gets its own part's delta, rows without an adapter are untouched, the input split or not."""
    g = torch.Generator().manual_seed(1)
    sizes, cols = (96, 32, 160), 40
    a = torch.randn(cols, len(sizes), in_features, generator=g)
    b_t = torch.randn(cols, sum(sizes), generator=g)
    lo = torch.tensor([(8 * t) % 32 for t in range(tokens)], dtype=torch.int32)
    width = torch.tensor([(0, 8, 16)[t % 3] for t in range(tokens)], dtype=torch.int32)
    x = torch.randn(tokens, in_features, generator=g)
    y = torch.randn(tokens, sum(sizes), generator=g)
    want = y.double().clone()
    for t in range(tokens):
        cols_t = slice(int(lo[t]), int(lo[t] + width[t]))
        start = 0
        for p, size in enumerate(sizes):
            xa = x[t].double() @ a[cols_t, p].double().T
            want[t, start : start + size] += xa @ b_t[cols_t, start : start + size].double()
            start += size
    y = y.to(DEVICE)
    order, tiles = lora_triton.plan_tiles(lo.tolist(), width.tolist(), max_tiles=tokens)
    order, tiles = torch.tensor(order, dtype=torch.int32), torch.tensor(tiles, dtype=torch.int32)
    lora_triton.add_lora(y, x.to(DEVICE), a.to(DEVICE), b_t.to(DEVICE), sizes, order.to(DEVICE), tiles.to(DEVICE), 16)
    torch.testing.assert_close(y.cpu().double(), want, atol=1e-3, rtol=1e-4)


def test_add_lora_refuses_what_it_cannot_read():
    a, b_t = torch.zeros(8, 2, 16), torch.zeros(8, 24)
    order, tiles = torch.zeros(2, dtype=torch.int32), torch.zeros(4, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="parts"):
        lora_triton.add_lora(torch.zeros(2, 24), torch.zeros(2, 16), a, b_t, (12, 10), order, tiles, 16)
    with pytest.raises(ValueError, match="strides"):
        lora_triton.add_lora(torch.zeros(2, 24), torch.zeros(16, 2).t(), a, b_t, (12, 12), order, tiles, 16)


def test_tiles_hold_up_to_16_rows_of_one_adapter_each():
    lo = [0, 8, 0, 0, 16, 8] + [0] * 30 + [24]
    width = [8, 8, 8, 0, 16, 8] + [8] * 30 + [0]
    order, tiles = lora_triton.plan_tiles(lo, width, max_tiles=len(lo))
    used = [g for g in range(len(lo)) if tiles[3][g] > 0]
    assert used == list(range(len(used)))  # the used slots first, the rest width 0
    seen = []
    for g in used:
        start, count, first, wide = (tiles[f][g] for f in range(4))
        rows = order[start : start + count]
        assert 1 <= count <= lora_triton.TILE and all((lo[t], width[t]) == (first, wide) for t in rows)
        seen += rows
    assert sorted(seen) == [t for t in range(len(lo)) if width[t] > 0]
    assert len(used) == 4  # lo 0: 32 rows, 2 full tiles; lo 8: 2 rows; lo 16: 1 row


@pytest.mark.parametrize("tokens, parts, in_features, expected", [(1, 3, 4096, 32), (64, 3, 4096, 11),
                                                                  (256, 1, 4096, 8), (4, 1, 64, 1)])
def test_the_input_is_split_to_fill_the_gpu(tokens, parts, in_features, expected):
    assert lora_triton.splits_for(tokens, parts, in_features) == expected


def test_grouped_buffers_give_the_same_forward_pass_as_the_cpu_path(tiny_model):
    """The tier's CUDA layout (one A and one B^T buffer per fused projection, each part a view of
    them) with the Triton plan, against the tier's CPU layout and plan, on a tiny model's logits for
    a batch that mixes two adapters of different ranks and the base model."""
    model = tiny_model
    adapters = []
    for i, rank in enumerate((8, 16)):
        g = torch.Generator().manual_seed(20 + i)
        modules = {key: (torch.randn(rank, t.in_features, generator=g) * 0.2,
                         torch.randn(t.out_features, rank, generator=g) * 0.2)
                   for key, t in model.lora_targets().items()}
        adapters.append(AdapterWeights(AdapterKey("local", f"a{i}"), rank, modules))
    logits = []
    for triton in (False, True):
        resident = ResidentAdapters(model, 0, 1 << 30)
        resident.planner = planner(triton)
        for adapter in adapters:
            assert resident.activate(adapter, pinned=set())
        if triton:
            group = model.model.layers[0].self_attn.qkv_proj.target_list[0].lora.group
            assert group is not None and group.a.shape[1] == 3
        rows = [adapters[0], None, adapters[1], adapters[0]]
        lora = resident.batch_for(rows, [2, 3, 1, 2])
        assert isinstance(lora, SortedTiles) == triton
        logits.append(model(prefill_batch([2, 3, 1, 2], lora, model.config.vocab_size), NoCache()))
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)
    assert (logits[1] - model(prefill_batch([2, 3, 1, 2], None, model.config.vocab_size), NoCache())).abs().max() > 0.1


def test_a_plan_run_again_keeps_every_projections_sums_in_one_buffer(tiny_model):
    """From a plan's second pass (a decode graph's warm-up, capture and replays) the shrinks' sums
    share one buffer zeroed once a pass: the same logits pass after pass."""
    model = tiny_model
    g = torch.Generator().manual_seed(30)
    modules = {key: (torch.randn(8, t.in_features, generator=g) * 0.2,
                     torch.randn(t.out_features, 8, generator=g) * 0.2) for key, t in model.lora_targets().items()}
    adapter = AdapterWeights(AdapterKey("local", "sums"), 8, modules)
    resident = ResidentAdapters(model, 0, 1 << 30)
    resident.planner = planner(triton=True)
    assert resident.activate(adapter, pinned=set())
    lora = resident.batch_for([adapter, None, adapter], [2, 1, 3])
    batch = prefill_batch([2, 1, 3], lora, model.config.vocab_size)
    first = model(batch, NoCache())
    assert lora.sums.buffer is None
    for _ in range(2):
        torch.testing.assert_close(model(batch, NoCache()), first, atol=1e-5, rtol=1e-5)
        parts = sum(len(group) for group in model.lora_groups())  # (q, k, v), (o,), (gate, up), (down,) a layer
        assert lora.sums.buffer is not None and lora.sums.cursor == lora.sums.buffer.numel() == parts * 6 * 16


class NoCache:
    """A KV store for one prefill of fresh sequences: attention reads back what it just wrote."""

    def __init__(self) -> None:
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def write(self, layer, k, v, batch):
        self.kv[layer] = (k, v)

    def prefill_kv(self, layer, batch, seq):
        k, v = self.kv[layer]
        start = sum(batch.query_lens[:seq])
        n = batch.query_lens[seq]
        return (k[start : start + n].transpose(0, 1).unsqueeze(0), v[start : start + n].transpose(0, 1).unsqueeze(0))

    def decode_kv(self, layer, batch):
        raise AssertionError("prefill only")

    def decode_attention(self, layer, q, batch, window, scale):
        return None

    def rotate_and_write(self, layer, qkv, cos, sin, heads, batch, norms=None):
        return None


def prefill_batch(lens: list[int], lora, vocab: int) -> ForwardBatch:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, vocab, (sum(lens),), generator=g)
    positions = torch.cat([torch.arange(n) for n in lens])
    return ForwardBatch(input_ids=ids.to(DEVICE), positions=positions.to(DEVICE), slots=torch.arange(len(lens)),
                        query_lens=lens, context_lens=lens, is_decode=False, lora=lora)


@pytest.fixture(scope="module")
def tiny_model():
    return random_causal_lm({"model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "vocab_size": 128, "max_position_embeddings": 256}, DEVICE)


@pytest.mark.parametrize("lora, bucket, key", [
    (None, 64, (0, 0)),
    (SortedTiles((), (), None, 16, 16, 16), 64, (16, 16)),  # 16 adapters over 64 rows: 16 slots, not 64
    (SortedTiles((), (), None, 32, 3, 3), 64, (32, 4)),  # at least 4
    (SortedTiles((), (), None, 16, 17, 17), 64, (16, 32)),
    (SortedTiles((), (), None, 16, 20, 20), 24, (16, 24)),  # never past the bucket
])
def test_a_decode_graph_launches_the_lora_tile_slots_its_mix_needs(lora, bucket, key):
    from server.engine.cuda_graphs import DecodeGraphs

    assert DecodeGraphs._lora_key(lora, bucket) == key
