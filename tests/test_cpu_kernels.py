"""The C kernels of a bf16 CPU step besides LoRA and attention (tests/test_lora_op.py,
tests/test_paged_kv.py): linear_cpu.c's projections against float64 matmuls and torch's own bf16
F.linear, on the shapes it tiles awkwardly; norm_cpu.c's residual add + RMSNorm and SiLU-mul, and
greedy_cpu.c's argmax and log-probability, against the torch ops they replace; their refusals."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from server.engine import sampler
from server.kernels.native import GROUP, greedy_kernel, linear_kernel, norm_kernels


def cpu_has_avx512_bf16() -> bool:
    try:
        return bool(torch.cpu._is_avx512_bf16_supported())
    except AttributeError:
        return False


def test_the_kernel_is_there_where_it_can_be():
    can = cpu_has_avx512_bf16() and (shutil.which("cc") or shutil.which("gcc")) is not None
    assert (linear_kernel() is not None) == can


needs_kernel = pytest.mark.skipif(linear_kernel() is None, reason="no AVX512-BF16 or no C compiler here")


@needs_kernel
@pytest.mark.parametrize("out, in_, bias", [(960, 576, False), (70, 41, True), (64, 2, False), (1, 7, True),
                                            (130, 1536, True)])
@pytest.mark.parametrize("rows", [0, 1, 3, 4, 5, 9, 33])
def test_as_exact_as_torch_against_float64(out, in_, bias, rows):
    """Each output is one fp32 sum rounded once to bf16: as close to the float64 product as torch's
    F.linear is, whatever the tiling (ragged row tiles, a last group of outputs padded, an odd input)."""
    generator = torch.Generator().manual_seed(out * 1000 + in_ + rows)
    weight = (torch.randn(out, in_, generator=generator) * 0.05).to(torch.bfloat16)
    b = torch.randn(out, generator=generator).to(torch.bfloat16) if bias else None
    x = torch.randn(rows, in_ + 3, generator=generator).to(torch.bfloat16)[:, :in_]  # rows apart, as q/k/v slices are
    kernel = linear_kernel()
    got = kernel(x, kernel.block(weight, b))
    assert got.shape == (rows, out) and got.dtype == torch.bfloat16
    if rows == 0:
        return
    exact = x.double() @ weight.double().T + (0 if b is None else b.double())
    theirs = F.linear(x, weight, b).double()
    ulp = exact.abs().clamp(min=1e-3) * 2**-8  # one bf16 rounding of the result
    assert ((got.double() - exact).abs() <= ulp + 1e-4).all()
    assert (got.double() - exact).norm() <= (theirs - exact).norm() * 1.05 + 1e-6


@needs_kernel
@pytest.mark.parametrize("out, in_, bias", [(960, 576, False), (70, 41, True), (49152, 64, False)])
@pytest.mark.parametrize("rows", [1, 3, 4, 6])
def test_int8_copies_against_float64(out, in_, bias, rows):
    """quantize=int8's kernel: the int8 values times their per-output scale, summed in fp32 and
    rounded once: within one bf16 step of the float64 product."""
    from server.model.layers import Int8Weight

    generator = torch.Generator().manual_seed(out + in_ + rows)
    weight = (torch.randn(out, in_, generator=generator) * 0.05).to(torch.bfloat16)
    b = torch.randn(out, generator=generator).to(torch.bfloat16) if bias else None
    int8 = Int8Weight.of(weight, b)
    assert int8.blocked is not None and int8.values is None
    x = torch.randn(rows, in_, generator=generator).to(torch.bfloat16)
    scales = weight.float().abs().amax(dim=1).clamp(min=1e-12) / 127
    values = torch.round(weight.float() / scales[:, None]).clamp(-127, 127)  # (as quantized: in fp32)
    dequantized = values.double() * scales.double()[:, None]
    exact = x.double() @ dequantized.T + (0 if b is None else b.double())
    got = linear_kernel().int8(x, int8.blocked).double()
    assert ((got - exact).abs() <= exact.abs().clamp(min=1e-3) * 2**-7 + 1e-4).all()


@needs_kernel
def test_same_bits_on_one_thread_or_two():
    """A tile of outputs is summed by one thread in one order: the team's size changes no bit."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(3072, 576, generator=generator).to(torch.bfloat16)
    x = torch.randn(13, 576, generator=generator).to(torch.bfloat16)
    kernel, before = linear_kernel(), torch.get_num_threads()
    blocked = kernel.block(weight, None)
    try:
        torch.set_num_threads(1)
        one = kernel(x, blocked)
        torch.set_num_threads(2)
        two = kernel(x, blocked)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


@needs_kernel
def test_the_blocked_layout():
    """Groups of 64 outputs, two inputs side by side: blocks[g, k, o, j] = weight[64 g + o, 2 k + j]."""
    weight = torch.arange(70 * 5, dtype=torch.float32).view(70, 5).to(torch.bfloat16)
    blocked = linear_kernel().block(weight, torch.ones(70))
    assert blocked.blocks.shape == (2, 3, GROUP, 2)
    assert blocked.blocks[1, 2, 3, 0] == weight[67, 4] and blocked.blocks[1, 2, 3, 1] == 0  # the odd input's pad
    assert (blocked.blocks[1, :, 6:] == 0).all()  # outputs 70..127 are padding
    assert blocked.bias.shape == (128,) and blocked.bias[69] == 1 and blocked.bias[70] == 0


@needs_kernel
@pytest.mark.parametrize("x", [torch.zeros(2, 576), torch.zeros(2, 575, dtype=torch.bfloat16),
                               torch.zeros(576, dtype=torch.bfloat16)], ids=["fp32", "width", "1-d"])
def test_refuses_inputs_it_does_not_take(x):
    kernel = linear_kernel()
    with pytest.raises(ValueError):
        kernel(x, kernel.block(torch.zeros(64, 576, dtype=torch.bfloat16), None))


def bf16_ulps(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """How many bf16 steps apart (both bf16): their bit patterns' distance, for values of one sign."""
    return (got.view(torch.int16).int() - want.view(torch.int16).int()).abs()


needs_norms = pytest.mark.skipif(norm_kernels() is None, reason="no C compiler here")


@needs_norms
@pytest.mark.parametrize("dim", [576, 4096, 37])
@pytest.mark.parametrize("with_delta", [False, True])
def test_add_rms_norm_is_torchs(dim, with_delta):
    """x += delta exactly as torch adds (in place), then F.rms_norm's result: all in fp32, rounded
    once. A sum of squares taken in another order moves a rounding now and then, by one bf16 step."""
    generator = torch.Generator().manual_seed(dim)
    x = (torch.randn(9, dim + 4, generator=generator) * 4).to(torch.bfloat16)[:, :dim]  # rows apart
    delta = torch.randn(9, dim, generator=generator).to(torch.bfloat16) if with_delta else None
    weight = torch.randn(dim, generator=generator).to(torch.bfloat16)
    want_x = x if delta is None else x + delta
    want = F.rms_norm(want_x, (dim,), weight, 1e-6)
    got_x = x.clone()
    got = norm_kernels().add_rms_norm(got_x, delta, weight, 1e-6)
    assert torch.equal(got_x, want_x)
    assert bf16_ulps(got, want).max() <= 1 and (got != want).float().mean() < 0.02


@needs_norms
def test_silu_mul_is_torchs():
    generator = torch.Generator().manual_seed(2)
    gate_up = (torch.randn(9, 2 * 1536 + 6, generator=generator) * 6).to(torch.bfloat16)[:, : 2 * 1536]
    gate_up[0, :4] = torch.tensor([100.0, -100.0, 0.0, -0.0])  # (e^-|g| underflows; zeros)
    want = F.silu(gate_up[:, :1536]) * gate_up[:, 1536:]
    got = norm_kernels().silu_mul(gate_up)
    assert bf16_ulps(got, want).max() <= 1 and (got != want).float().mean() < 0.01


@needs_norms
def test_the_model_with_and_without_the_norm_kernels(loaded, monkeypatch):
    """The decoder's residual stream and MLP through norm_cpu.c, or through torch's ops: the same
    next tokens, logits within bf16's rounding growing through 30 layers."""
    from server.engine.kv_cache import KVCache
    from server.kernels import elementwise
    from server.model.decoder import CausalLM, ForwardBatch

    model = CausalLM.from_pretrained(loaded.model_dir, torch.device("cpu"), torch.bfloat16)
    ids = [loaded.tokenizer(p)["input_ids"] for p in ("The capital of France is", "def fibonacci(n):")]

    def logits() -> torch.Tensor:
        kv = KVCache(model.config, len(ids), 64, torch.device("cpu"), torch.bfloat16)
        kv.ensure_capacity(64)
        batch = ForwardBatch(input_ids=torch.tensor(sum(ids, [])),
                             positions=torch.cat([torch.arange(len(i)) for i in ids]), slots=torch.arange(len(ids)),
                             query_lens=[len(i) for i in ids], context_lens=[len(i) for i in ids], is_decode=False)
        with torch.no_grad():
            return model(batch, kv)

    fused = logits()
    monkeypatch.setattr(elementwise, "ENABLED", False)
    plain = logits()
    assert ((fused - plain).norm(dim=-1) / plain.norm(dim=-1)).max() < 0.06
    assert torch.equal(fused.argmax(-1), plain.argmax(-1))


needs_greedy = pytest.mark.skipif(greedy_kernel() is None, reason="no AVX-512 or no C compiler here")


def torch_greedy(logits: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    exact = logits.double()
    return logits.argmax(-1).tolist(), -(exact - exact.max(-1, keepdim=True).values).exp().sum(-1).log()


@needs_greedy
@pytest.mark.parametrize("vocab", [49152, 151936, 17])
def test_greedy_rows_are_the_argmax_and_its_logprob(vocab):
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(8, vocab + 5, generator=generator)[:, :vocab] * 10
    logits[1] = logits[1].round()  # many ties: the first of the maxima, as torch's argmax
    logits[2, 1:] = float("-inf")  # everything masked but one token (a grammar's mask)
    logits[3, -1] = 1e4  # the maximum in the last, ragged vector
    tokens, logprobs = greedy_kernel()(logits)
    want_tokens, want_logprobs = torch_greedy(logits)
    assert tokens == want_tokens
    torch.testing.assert_close(torch.tensor(logprobs, dtype=torch.float64), want_logprobs, atol=2e-5, rtol=1e-5)


@needs_greedy
def test_a_nan_row_leaves_the_step_to_torch():
    logits = torch.randn(3, 100)
    logits[1, 50] = float("nan")
    assert greedy_kernel()(logits) is None
    picked = sampler.greedy_batch(logits)  # torch's ops: NaN is their maximum
    assert [p.token_id for p in picked] == logits.max(-1).indices.tolist()


@needs_norms
@pytest.mark.parametrize("dim", [64, 128])
def test_rope_store_is_the_torch_ops(dim):
    """q and k rotated in place and k, v written to their slots: bit for bit rotate() and index_copy_."""
    from server.model.rope import rotate

    generator = torch.Generator().manual_seed(dim)
    tokens, heads, kv_heads = 7, 9, 3
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=generator) * 4).to(torch.bfloat16)
    positions = torch.randint(0, 4000, (tokens, 1, 1), generator=generator).float()
    angles = positions / 10000 ** (torch.arange(dim) % (dim // 2) * 2 / dim)
    cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
    slots = torch.randperm(40, generator=generator)[:tokens]
    shaped = qkv.view(tokens, heads + 2 * kv_heads, dim)
    rotated = rotate(shaped[:, : heads + kv_heads], cos, sin)
    want_k, want_v = (torch.zeros(40, kv_heads, dim, dtype=torch.bfloat16) for _ in range(2))
    want_k[slots], want_v[slots] = rotated[:, heads:], shaped[:, heads + kv_heads :]
    k_cache, v_cache = (torch.zeros(40, kv_heads, dim, dtype=torch.bfloat16) for _ in range(2))
    q = norm_kernels().rope_store(qkv, heads, kv_heads, cos, sin, k_cache, v_cache, slots)
    assert torch.equal(q, rotated[:, :heads]) and torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    with pytest.raises(ValueError, match="outside"):
        norm_kernels().rope_store(qkv, heads, kv_heads, cos, sin, k_cache, v_cache, slots + 40)


@needs_norms
def test_the_served_bf16_engine_with_and_without_the_cpu_kernels(monkeypatch):
    """The paged bf16 engine on CPU with the norm, RoPE and greedy kernels against the same engine
    with torch's ops for them: the same greedy tokens for a batch of prompts, prefill and decode."""
    import asyncio
    from dataclasses import replace

    from server.config import Limits, ModelConfig, Settings
    from server.engine.builder import build_engine
    from server.engine.kv_cache import PagedKVCache
    from server.kernels import elementwise
    from server.model.loader import load_model
    from tests.conftest import collect, greedy

    loaded = load_model(ModelConfig(model="default", device="cpu", dtype="bfloat16"))
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away,",
               "List three colours:"]

    def outputs() -> list[list[int]]:
        engine = build_engine(Settings(limits=replace(Limits(), max_batch_size=8)), loaded)
        assert isinstance(engine.engine.scheduler.kv, PagedKVCache)
        engine.engine.start()
        try:
            async def run_all():
                return await asyncio.gather(*(collect(engine, greedy(p, 12)) for p in prompts))
            return [tokens for tokens, _, _ in asyncio.run(run_all())]
        finally:
            engine.engine.stop()

    fused = outputs()
    monkeypatch.setattr(elementwise, "ENABLED", False)
    monkeypatch.setattr(sampler, "greedy_kernel", lambda: None)
    assert outputs() == fused


# ---- LoRA folded into the projection (linear_lora) ----

def lora_case(sizes: tuple[int, ...], in_: int, rows: int, widths: list[int], seed: int):
    """A fused projection's weight and bias, a pool of 64 packed columns and rows over `widths` (0: the
    base model; adapters at slots spread over the pool), in the order the planner gives (by adapter)."""
    from server.kernels import native

    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(sum(sizes), in_, generator=generator) * 0.05).to(torch.bfloat16)
    bias = torch.randn(sum(sizes), generator=generator).to(torch.bfloat16)
    a = torch.randn(64, len(sizes), in_, generator=generator).to(torch.bfloat16)
    b_t = (torch.randn(64, sum(sizes), generator=generator) * 0.1).to(torch.bfloat16)
    starts = {0: 0, 8: 40, 16: 8, 32: 24}
    lo = [starts[widths[t % len(widths)]] for t in range(rows)]
    width = [widths[t % len(widths)] for t in range(rows)]
    x = torch.randn(rows, in_, generator=generator).to(torch.bfloat16)
    as_int32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    order = sorted(range(rows), key=lambda t: (lo[t], width[t]))
    step = native.LoraStep({}, as_int32(lo), as_int32(width), as_int32(order))
    return weight, bias, a, b_t, x, lo, width, step, native.lora_pool(a, native.block_lora_b(b_t), sizes)


@needs_kernel
@pytest.mark.parametrize("sizes, in_", [((576, 192, 192), 576), ((1536, 1536), 576), ((576,), 1536), ((48, 16), 41)])
@pytest.mark.parametrize("rows, widths", [(1, [8]), (3, [0, 16]), (32, [8, 16, 0, 32]), (37, [8]), (70, [16, 8])])
def test_the_lora_inside_the_projection_is_the_float64_sum(sizes, in_, rows, widths):
    """linear_lora: every row's projection plus its own adapter's delta (parts of a fused projection
    each taking their own shrink), rounded once, whatever the tiles mix: within bf16's rounding of
    the float64 sum (the shrink rounded to bf16 as peft's lora_A output is)."""
    from server.kernels import native

    weight, bias, a, b_t, x, lo, width, step, pool = lora_case(sizes, in_, rows, widths, seed=rows + in_)
    got = linear_kernel().with_lora(x, linear_kernel().block(weight, bias), pool, step).double()
    want = native.lora_reference(x, weight, bias, a, b_t, sizes, lo, width)
    assert got.shape == (rows, sum(sizes))
    torch.testing.assert_close(got, want, atol=0.02, rtol=0.01)
    plain = x.double() @ weight.double().T + bias.double()
    assert all((got[t] - plain[t]).abs().max() > 0.05 for t in range(rows) if width[t]), "the deltas were added"


@needs_kernel
def test_the_lora_inside_the_int8_projection():
    """The same delta through the int8 copy's tiles (a small step with `quantize: int8`)."""
    from server.kernels import native

    sizes = (576, 192, 192)
    weight, bias, a, b_t, x, lo, width, step, pool = lora_case(sizes, 576, 4, [8, 0, 16, 8], seed=7)
    values = torch.randint(-127, 128, weight.shape, generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    scales = torch.rand(weight.shape[0], generator=torch.Generator().manual_seed(2)) / 500
    got = linear_kernel().with_lora(x, linear_kernel().block_int8(values, scales, bias), pool, step).double()
    want = native.lora_reference(x, values.double() * scales.double()[:, None], bias, a, b_t, sizes, lo, width)
    torch.testing.assert_close(got, want, atol=0.02, rtol=0.01)


def test_blocked_b_holds_each_column_once():
    """block_lora_b's layout: slot, group of 64 outputs, pair of columns, output, column in the pair."""
    from server.kernels.native import block_lora_b

    b_t = torch.arange(1, 16 * 70 + 1, dtype=torch.float32).view(16, 70).to(torch.bfloat16)
    blocks = block_lora_b(b_t)
    assert blocks.shape == (2, 2, 4, 64, 2)
    assert blocks[1, 1, 2, 3, 1] == b_t[8 + 2 * 2 + 1, 64 + 3]
    assert blocks[0, 0, 0, 5, 0] == b_t[0, 5] and not blocks[:, 1, :, 6:].any()  # outputs past 70: zeros
    assert blocks.count_nonzero() == b_t.numel()


@needs_kernel
@pytest.mark.parametrize("lo, width, order, message", [
    ([4, 0], [8, 8], [0, 1], "whole slots"),  # a token's columns not starting at a slot
    ([0, 0], [8, 12], [0, 1], "whole slots"),  # nor whole slots wide
    ([56, 0], [16, 8], [0, 1], "whole slots inside the pool"),  # past the pool's 64 columns
    ([0, 0], [8, 8], [0, 0], "permutation"),  # a row twice, another never: it would be left unwritten
])
def test_the_folded_lora_refuses_bad_columns(lo, width, order, message):
    from server.kernels import native

    weight, bias, a, b_t, x, _, _, _, pool = lora_case((64,), 32, 2, [8], seed=0)
    as_int32 = lambda v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    step = native.LoraStep({}, as_int32(lo), as_int32(width), as_int32(order))
    with pytest.raises(ValueError, match=message):
        linear_kernel().with_lora(x, linear_kernel().block(weight, bias), pool, step)
    with pytest.raises(ValueError, match="whole slots"):  # a pool whose B^T is not blocked for it
        native.lora_pool(a, b_t, (64,))


@needs_kernel
@pytest.mark.parametrize("quantize", [False, True])
def test_each_projection_of_a_bf16_mixed_batch_adds_what_peft_adds(loaded, adapter_root, quantize):
    """The served path on a bf16 CPU, projection by projection: the device tier's pools blocked for
    linear_cpu.c, rows of the base model and of the suite's three adapters (ranks 8, 32, 16; one
    without MLP weights, one without attention's) in one batch through each fused projection of the
    first and last layers (through the int8 copies too, a step of 4 rows with `quantize`). Each row's
    delta over the plain projection is peft's for its adapter alone (fp32), within bf16's rounding."""
    from types import SimpleNamespace

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from server.adapters.lora import ResidentAdapters
    from server.adapters.weights import AdapterKey, read_adapter
    from server.model.decoder import CausalLM
    from server.model.layers import prepack_cpu_weights, quantize_int8
    from tests.adapter_factory import SPECS

    model = CausalLM.from_pretrained(loaded.model_dir, torch.device("cpu"), torch.bfloat16)
    if quantize:
        quantize_int8(model)
    prepack_cpu_weights(model)
    tier = ResidentAdapters(model, 0, 1 << 30)
    names = [None, *(s.name for s in SPECS)]
    adapters = [None if n is None else read_adapter(AdapterKey("local", f"{n}/1"), adapter_root / n / "1",
                                                    model.config, torch.bfloat16) for n in names]
    assert all(tier.activate(a, set()) for a in adapters if a is not None)
    assert tier.planner.folds and all(g.pool is not None and g.b_t is None for g in tier._packed)
    lens = [1] * 4 if quantize else [3, 1, 5, 2]
    batch = SimpleNamespace(lora=tier.batch_for(adapters, lens))
    assert type(batch.lora).__name__ == "TokenColumns"
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(loaded.model_dir, dtype=torch.float32),
                                     adapter_root / names[1] / "1", adapter_name=names[1])
    for name in names[2:]:
        peft.load_adapter(adapter_root / name / "1", adapter_name=name)
    generator = torch.Generator().manual_seed(0)
    for layer in (0, len(model.model.layers) - 1):
        ours, theirs = model.model.layers[layer], peft.base_model.model.model.layers[layer]
        for projection, modules in ((ours.self_attn.qkv_proj, [theirs.self_attn.q_proj, theirs.self_attn.k_proj,
                                                                theirs.self_attn.v_proj]),
                                    (ours.self_attn.o_proj, [theirs.self_attn.o_proj]),
                                    (ours.mlp.gate_up_proj, [theirs.mlp.gate_proj, theirs.mlp.up_proj]),
                                    (ours.mlp.down_proj, [theirs.mlp.down_proj])):
            x = torch.randn(sum(lens), projection.weight.shape[1], generator=generator).to(torch.bfloat16)
            with torch.no_grad():
                folded, plain = projection(x, batch).float(), projection(x).float()
            delta, rounding = folded - plain, (folded.abs() + plain.abs()) / 128  # (each rounded at 2^-9 of itself)
            rows = torch.arange(sum(lens)).split(lens)
            for name, row in zip(names, rows):
                with torch.no_grad():
                    if name is None:
                        want = torch.zeros(len(row), delta.shape[1])
                    else:
                        peft.set_adapter(name)
                        with_lora = torch.cat([m(x[row].float()) for m in modules], dim=1)
                        with peft.disable_adapter():
                            want = with_lora - torch.cat([m(x[row].float()) for m in modules], dim=1)
                excess = (delta[row] - want).abs() - (rounding[row] + 0.02 * want.abs() + 1e-3)
                assert excess.max() <= 0, (layer, projection.names, name, float(excess.max()))
            assert delta.abs().max() > 0.1  # (the adapters' deltas are there to be seen)


# ---- a decode step's layers in one call (decoder_cpu.c) ----

@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_decode_steps_in_one_call_are_the_layer_loops_bits(adapter_root, quantize):
    """The served bf16 engine's decode steps, each computed twice: through decoder_cpu.c's one call and
    through the Python loop over the layers. Rows of the base model and of the suite's three adapters
    (ranks 8, 32, 16; some modules missing), 3 rows (the int8 copies' size with `quantize`) and 7: the
    same logits bit for bit, at every step, and the one call really taken."""
    from dataclasses import replace

    from server.adapters.weights import AdapterKey, read_adapter
    from server.config import Limits, ModelConfig, Settings
    from server.engine.builder import build_engine
    from server.engine.detokenizer import IncrementalDetokenizer
    from server.engine.request import Request, SamplingParams, StopCriteria
    from server.model.loader import load_model
    from tests.adapter_factory import SPECS

    if not cpu_has_avx512_bf16() or shutil.which("cc") is None:
        pytest.skip("decoder_cpu.c drives linear_cpu.c, which needs AVX512-BF16 and a C compiler")
    loaded = load_model(ModelConfig(model="default", device="cpu", dtype="bfloat16", quantize=quantize))
    model = loaded.model
    fused = model.fused_decode
    assert fused is not None
    engine = build_engine(Settings(limits=replace(Limits(), max_batch_size=8)), loaded).engine
    adapters = [None, *(read_adapter(AdapterKey("local", f"{s.name}/1"), adapter_root / s.name / "1", model.config,
                                     torch.bfloat16) for s in SPECS)]
    compared = []

    class BothWays:
        def __call__(self, batch, kv):
            model.fused_decode = fused
            one_call = model(batch, kv)
            model.fused_decode = None
            loop = model(batch, kv)  # (writes the same keys and values to the same slots again)
            model.fused_decode = fused
            if batch.is_decode:
                compared.append((len(batch.context_lens), torch.equal(one_call, loop), batch.lora is not None))
            return one_call

    engine.runner.model = BothWays()
    for rows in (3, 7):
        for i in range(rows):
            prompt = loaded.tokenizer(f"Story {i}: the lighthouse keeper")["input_ids"]
            engine.scheduler.add(Request(prompt_ids=prompt, params=SamplingParams(), sink=lambda event: None,
                                         stop=StopCriteria(max_new_tokens=5, ignore_eos=True),
                                         adapter=adapters[i % len(adapters)],
                                         detokenizer=IncrementalDetokenizer(loaded.tokenizer, prompt,
                                                                            loaded.special_token_ids)))
        while engine.step():
            pass
    assert {(n, lora) for n, _, lora in compared} == {(3, True), (7, True)}
    assert all(same for _, same, _ in compared), compared
    calls = []
    original = fused.run
    fused.run = lambda *args: calls.append(original(*args)) or calls[-1]
    assert model.fused_decode is fused
    engine.runner.model = model
    engine.scheduler.add(Request(prompt_ids=[1, 2, 3], params=SamplingParams(), sink=lambda event: None,
                                 stop=StopCriteria(max_new_tokens=3, ignore_eos=True), adapter=adapters[1],
                                 detokenizer=IncrementalDetokenizer(loaded.tokenizer, [1, 2, 3],
                                                                    loaded.special_token_ids)))
    while engine.step():
        pass
    assert [c is not None for c in calls] == [False, True, True]  # the prefill loops; the decode steps don't


def test_decode_layers_refuses_a_table_for_other_shapes():
    """A layer whose projection is for another width fails the call with the layer named; nothing runs."""
    from server.kernels import native

    kernel = native.decode_layers_kernel()
    if kernel is None:
        pytest.skip("no decoder_cpu.c here")
    table = (native.DecodeLayer * 2)()
    for entry in table:
        for name, (in_, out) in zip(("qkv", "o", "gate_up", "down"), ((64, 192), (64, 64), (64, 256), (128, 64))):
            setattr(entry, name, native.DecodeProjection(None, None, None, None, in_, out))
    table[1].down.out_features = 65
    step = native.DecodeStep(2, 64, 1, 1, 64, 128, 16, 1, 1e-5, 0.125)  # no buffers: the check comes first
    with pytest.raises(ValueError, match="layer 1"):
        kernel(step, table)
    step.rows = 0
    with pytest.raises(ValueError, match="layer 0"):
        kernel(step, table)
