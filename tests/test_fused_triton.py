"""The CUDA elementwise kernels (server/kernels/fused_triton.py) run by Triton's interpreter on CPU
tensors (TRITON_INTERPRET=1, fp32; tests/conftest.py): each against the torch ops it replaces, their
refusals, and a tiny Qwen3-style model's prefill and decode steps with and without them. On a GPU
the same kernels are compiled (bench/gpu/session.sh runs this file and the architecture tests there)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server.engine.kv_cache import KVCache
from server.kernels import elementwise, fused_triton
from server.model.decoder import CausalLM, ForwardBatch
from server.model.rope import rotate
from tests.model_factory import random_causal_lm

pytest.importorskip("triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def kernels() -> fused_triton.TritonKernels:
    from server.kernels import fused_triton_jit

    return fused_triton.TritonKernels(fused_triton_jit, DEVICE.type)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.mark.parametrize("with_delta", [False, True])
def test_add_rms_norm_adds_in_place_and_norms_like_torch(kernels, with_delta):
    x = randn(4, 200)[:, :72] * 3  # strided rows, a width that is not a power of two
    delta = randn(4, 72, seed=1) if with_delta else None
    weight = randn(72, seed=2)
    want_x = x + delta if with_delta else x.clone()
    got = kernels.add_rms_norm(x, delta, weight, 1e-6)
    torch.testing.assert_close(x, want_x)
    torch.testing.assert_close(got, F.rms_norm(want_x, (72,), weight, 1e-6), atol=1e-5, rtol=1e-5)


def test_silu_mul_matches_torch_on_strided_rows(kernels):
    gate_up = randn(3, 3000)[:, : 2 * 1100] * 4  # more than one program's block of columns
    got = kernels.silu_mul(gate_up)
    torch.testing.assert_close(got, F.silu(gate_up[:, :1100]) * gate_up[:, 1100:], atol=1e-5, rtol=1e-5)


def rope_inputs(tokens: int, heads: int, kv_heads: int, dim: int):
    qkv = randn(tokens, (heads + 2 * kv_heads) * dim, seed=3)
    angles = randn(tokens, 1, dim // 2, seed=4) * 3
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    return qkv, cos, sin


def rope_reference(qkv, cos, sin, heads, kv_heads, dim, norms=None):
    view = qkv.view(qkv.shape[0], heads + 2 * kv_heads, dim)
    q, k, v = view[:, :heads], view[:, heads : heads + kv_heads], view[:, heads + kv_heads :]
    if norms is not None:
        q, k = F.rms_norm(q, (dim,), norms[0], norms[2]), F.rms_norm(k, (dim,), norms[1], norms[2])
    return rotate(q, cos, sin), rotate(k, cos, sin), v


@pytest.mark.parametrize("normed", [False, True])
def test_rope_store_into_paged_slots(kernels, normed):
    tokens, heads, kv_heads, dim = 5, 4, 2, 24  # a head_dim whose half is not a power of two
    qkv, cos, sin = rope_inputs(tokens, heads, kv_heads, dim)
    norms = (randn(dim, seed=5), randn(dim, seed=6), 1e-6) if normed else None
    want_q, want_k, want_v = rope_reference(qkv, cos, sin, heads, kv_heads, dim, norms)
    k_cache, v_cache = torch.zeros(2, 9, kv_heads, dim, device=DEVICE).unbind(0)
    slots = torch.tensor([7, 0, 3, 8, 1], device=DEVICE)
    q = kernels.rope_store(qkv, heads, kv_heads, cos, sin, k_cache, v_cache, slots, norms=norms)
    torch.testing.assert_close(q, want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_cache[slots], want_k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_cache[slots], want_v)
    untouched = torch.ones(9, dtype=torch.bool)
    untouched[slots.cpu()] = False
    assert not k_cache[untouched.to(DEVICE)].any() and not v_cache[untouched.to(DEVICE)].any()


def test_rope_store_into_dense_slots_at_positions(kernels):
    tokens, heads, kv_heads, dim = 3, 2, 1, 16
    qkv, cos, sin = rope_inputs(tokens, heads, kv_heads, dim)
    want_q, want_k, want_v = rope_reference(qkv, cos, sin, heads, kv_heads, dim)
    k_cache = torch.zeros(4, kv_heads, 10, dim, device=DEVICE)  # [slots, kv_heads, capacity, dim]
    v_cache = torch.zeros_like(k_cache)
    slots, positions = torch.tensor([2, 0, 3], device=DEVICE), torch.tensor([9, 4, 0], device=DEVICE)
    q = kernels.rope_store(qkv, heads, kv_heads, cos, sin, k_cache, v_cache, slots, positions)
    torch.testing.assert_close(q, want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_cache[slots, :, positions], want_k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_cache[slots, :, positions], want_v)
    assert int((k_cache != 0).any(-1).sum()) == tokens * kv_heads


def attention_reference(q, k_cache, v_cache, slots, lengths, window, scale):
    """Each row's softmax over its own positions, in float64."""
    out = []
    group = q.shape[1] // k_cache.shape[1]
    for r, (slot, n) in enumerate(zip(slots.tolist(), lengths.tolist())):
        first = 0 if window is None else max(0, n - window)
        k = k_cache[slot, :, first:n].double().repeat_interleave(group, 0)  # [heads, n, dim]
        v = v_cache[slot, :, first:n].double().repeat_interleave(group, 0)
        weights = torch.softmax((k @ q[r].double()[:, :, None]).squeeze(-1) * scale, dim=-1)
        out.append((weights[:, None, :] @ v).squeeze(1))
    return torch.stack(out).to(q.dtype)


@pytest.mark.parametrize("heads, kv_heads, window, max_splits", [
    (4, 2, None, 16),  # two pieces a row here (8 "SMs" on CPU): combined
    (4, 2, 8, 16),  # a sliding window
    (6, 2, None, 1),  # one piece: normalised in place; groups of 3 query heads
    (2, 2, None, 16),  # no grouping
])
def test_decode_attention_reads_each_rows_own_positions(kernels, monkeypatch, heads, kv_heads, window, max_splits):
    monkeypatch.setattr(fused_triton, "MAX_SPLITS", max_splits)
    dim, capacity = 16, 150
    k_cache = randn(5, kv_heads, capacity, dim, seed=8)
    v_cache = randn(5, kv_heads, capacity, dim, seed=9)
    qkv = randn(3, (heads + 2 * kv_heads) * dim, seed=10)
    q = qkv.view(3, heads + 2 * kv_heads, dim)[:, :heads]  # (as the model hands it over: a view of the q/k/v rows)
    slots, lengths = torch.tensor([4, 0, 2], device=DEVICE), torch.tensor([1, 70, 150], device=DEVICE)
    got = kernels.decode_attention(q, k_cache, v_cache, slots, lengths, window, 0.25)
    torch.testing.assert_close(got, attention_reference(q, k_cache, v_cache, slots, lengths, window, 0.25),
                               atol=1e-5, rtol=1e-5)
    k_cache[:, :, 150 - 1 :] = float("nan")  # nothing past a row's length is read
    lengths[2] = 149
    assert not kernels.decode_attention(q, k_cache, v_cache, slots, lengths, window, 0.25).isnan().any()


def test_the_kernels_can_be_turned_off(monkeypatch, caplog):
    monkeypatch.setenv("LORASERVE_TRITON_KERNELS", "0")
    fused_triton.cuda_kernels.cache_clear()
    try:
        with caplog.at_level("INFO", logger=fused_triton.log.name):
            assert fused_triton.cuda_kernels() is None
        assert "LORASERVE_TRITON_KERNELS=0" in caplog.text  # (turned off, not merely missing here)
    finally:
        fused_triton.cuda_kernels.cache_clear()


def test_shapes_the_kernels_do_not_take_are_refused(kernels):
    with pytest.raises(ValueError, match="add_rms_norm"):
        kernels.add_rms_norm(randn(2, 8), None, randn(7), 1e-6)
    with pytest.raises(ValueError, match="silu_mul"):
        kernels.silu_mul(randn(2, 7))
    qkv, cos, sin = rope_inputs(2, 2, 1, 8)
    cache = torch.zeros(4, 1, 8, device=DEVICE)
    with pytest.raises(ValueError, match="rope_store"):  # a k/v width that does not add up
        kernels.rope_store(qkv, 3, 1, cos, sin, cache, cache.clone(), torch.arange(2, device=DEVICE))
    with pytest.raises(ValueError, match="rope_store"):  # a dense cache without positions
        kernels.rope_store(qkv, 2, 1, cos, sin, cache[None], cache[None].clone(), torch.arange(2, device=DEVICE))
    with pytest.raises(ValueError, match="decode_attention"):  # a paged cache
        kernels.decode_attention(randn(2, 2, 8), cache, cache, torch.arange(2, device=DEVICE),
                                 torch.ones(2, dtype=torch.long, device=DEVICE), None, 1.0)


def qwen3_model() -> CausalLM:
    return random_causal_lm({"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 96, "head_dim": 16,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "vocab_size": 128, "max_position_embeddings": 256, "rms_norm_eps": 1e-6}, DEVICE)


def generate(model: CausalLM, steps: int) -> list[torch.Tensor]:
    """A prefill of two prompts into dense slots, then greedy decode steps: each step's logits."""
    kv = KVCache(model.config, 2, 32, DEVICE, torch.float32)
    kv.ensure_capacity(16)
    lens = [5, 3]
    ids = torch.randint(0, 128, (8,), generator=torch.Generator().manual_seed(7)).to(DEVICE)
    batch = ForwardBatch(input_ids=ids, positions=torch.tensor([0, 1, 2, 3, 4, 0, 1, 2], device=DEVICE),
                         slots=torch.arange(2, device=DEVICE), query_lens=lens, context_lens=list(lens),
                         is_decode=False)
    logits = [model(batch, kv)]
    for _ in range(steps):
        lens = [n + 1 for n in lens]
        batch = ForwardBatch(input_ids=logits[-1].argmax(-1), positions=torch.tensor(lens, device=DEVICE) - 1,
                             slots=torch.arange(2, device=DEVICE), query_lens=[1, 1], context_lens=lens,
                             is_decode=True, dense_slots=True, kv_lens=torch.tensor(lens, device=DEVICE),
                             attend_len=max(lens))
        logits.append(model(batch, kv))
    return logits


def test_a_qwen3_model_decodes_the_same_with_the_kernels(kernels, monkeypatch):
    """The model's seams (add + norm, SiLU-mul, q/k norms + RoPE + dense K/V writes and attention in
    decode steps) through the kernels, against the same model on torch ops."""
    model = qwen3_model()
    with torch.no_grad():
        monkeypatch.setattr(elementwise, "ENABLED", False)
        plain = generate(model, 4)
        monkeypatch.setattr(elementwise, "ENABLED", True)
        calls = []

        def interpreted(x):
            calls.append(x.shape)
            return kernels

        for module in ("server.model.layers", "server.model.decoder", "server.engine.kv_cache"):
            monkeypatch.setattr(f"{module}.fused_kernels", interpreted)  # (fp32 CPU rows: interpreted)
        fused = generate(model, 4)
    assert len(calls) >= 4 * 2 * 5  # each decode step: two norms, SiLU-mul, RoPE and attention per layer
    for want, got in zip(plain, fused):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
