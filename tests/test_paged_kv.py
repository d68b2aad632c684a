"""Paged KV cache: block accounting, and preemption when the pool runs out mid-decode — every
request completes with the same tokens as with a pool large enough for all of them."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from server.engine.async_engine import GenerationInput
from server.engine.kv_cache import BlockPool, PagedKVCache
from server.engine.request import FinishReason, SamplingParams
from server.metrics import PREEMPTIONS
from tests.conftest import collect, run

PROMPTS = ["What is machine learning?", "Once upon a time, in a small village,", "The capital of France is",
           "def fibonacci(n):", "List three colours:", "Why is the sky blue? Explain briefly."]
SMALL = dict(max_total_tokens=96, max_input_length=64, max_batch_total_tokens=96 * 8, max_batch_prefill_tokens=512)


def inputs(seeded: bool) -> list[GenerationInput]:
    def params(i: int) -> SamplingParams:
        return SamplingParams(temperature=0.8, top_p=0.9, do_sample=True, seed=100 + i) if seeded else SamplingParams()

    return [GenerationInput(prompt=p, params=params(i), max_new_tokens=40, ignore_eos=True)
            for i, p in enumerate(PROMPTS)]


async def run_all(engine, batch: list[GenerationInput]):
    return await asyncio.gather(*(collect(engine, inp) for inp in batch))


@pytest.mark.parametrize("seeded", [False, True], ids=["greedy", "seeded-sampling"])
def test_preempted_requests_finish_with_the_same_tokens(make_engine, seeded: bool):
    roomy = make_engine(kv_cache_memory_mb=64, **SMALL)
    expected = run(run_all(roomy, inputs(seeded)))
    roomy.engine.stop()
    # 8 MB: ten 16-token blocks of the default model in fp32, while six requests want 4 blocks each
    tight = make_engine(kv_cache_memory_mb=8, **SMALL)
    kv = tight.engine.scheduler.kv
    assert isinstance(kv, PagedKVCache) and kv.capacity_tokens == 160
    before = PREEMPTIONS._value.get()
    got = run(run_all(tight, inputs(seeded)))
    assert PREEMPTIONS._value.get() > before  # the pool really ran out
    for (tokens, reason, text), (want, want_reason, want_text) in zip(got, expected):
        assert reason is FinishReason.LENGTH and want_reason is FinishReason.LENGTH
        assert tokens == want and text == want_text
    deadline = time.monotonic() + 5  # the last finish event is sent just before its step retires it
    while kv.pool.num_used and time.monotonic() < deadline:
        time.sleep(0.01)
    assert kv.pool.num_used == 0 and kv.used_slots == 0  # every block came back


def test_a_pool_smaller_than_one_request_stops_the_start(make_engine):
    from server.errors import StartupError

    with pytest.raises(StartupError, match="kv_cache_memory_mb"):
        make_engine(kv_cache_memory_mb=2, **SMALL)


def test_block_pool_hands_out_and_takes_back():
    pool = BlockPool(5)  # block 0 is kept back as the padding target
    assert pool.num_free == 4
    first = pool.take(3)
    assert 0 not in first and pool.num_used == 3
    pool.give_back(first[:2])
    assert pool.num_free == 3 and pool.num_used == 1


SYSTEM = ("You are a meticulous assistant for a small bakery. Answer questions about opening hours, the bread "
          "we bake each morning, allergens, prices and custom cake orders. Keep answers short and friendly. ") * 3


def test_prefix_cache_reuses_blocks_of_the_same_adapter_only(make_engine):
    """A shared system prompt: the second request reuses its blocks and gives the same tokens as a
    cold run; a request with another adapter and the same prompt gets no hit and its own output."""
    from server.config import AdapterConfig
    from server.metrics import PREFIX_HIT_TOKENS
    from tests.conftest import ROOT

    adapters = AdapterConfig(adapters_dir=str(ROOT / "adapters_cache"))
    # the first request ends right after its prefill (one new token): its blocks are cached as it leaves
    cases = [(SYSTEM + "When do you open on Sundays?", None, 1), (SYSTEM + "Do you bake rye bread?", None, 12),
             (SYSTEM + "Do you bake rye bread?", "demo-pirate/1", 12)]

    def greedy(prompt, adapter, new_tokens):
        return GenerationInput(prompt=prompt, params=SamplingParams(), max_new_tokens=new_tokens, ignore_eos=True,
                               adapter_id=adapter)

    cold = make_engine(adapters, model={"prefix_caching": False})
    expected = [run(collect(cold, greedy(*case)))[0] for case in cases]
    cold.engine.stop()
    engine = make_engine(adapters)
    hits, got = [], []
    for case in cases:
        before = PREFIX_HIT_TOKENS._value.get()
        got.append(run(collect(engine, greedy(*case)))[0])
        hits.append(PREFIX_HIT_TOKENS._value.get() - before)
    assert hits[0] == 0 and hits[1] >= 64  # the second request reuses the system prompt's full blocks
    assert hits[2] == 0  # the same tokens under another adapter: no false hit
    assert got == expected
    assert engine.engine.scheduler.kv.cached_blocks > 0


def burst_engine(loaded, prefix_caching: bool, count: int, params=None, **limits):
    """A synchronous engine and `count` requests for one long prompt (greedy, or params[i]), added
    together; `fed` records the prompt tokens each step computes and `twins` its twins."""
    from dataclasses import replace

    from server.config import Limits, ModelConfig, Settings
    from server.engine.builder import build_engine
    from server.engine.detokenizer import IncrementalDetokenizer
    from server.engine.request import Request, StopCriteria

    prompt = loaded.tokenizer(SYSTEM + "Do you bake rye bread?")["input_ids"]
    settings = Settings(limits=replace(Limits(), max_batch_size=8, **limits),
                        model=replace(ModelConfig(), prefix_caching=prefix_caching))
    engine = build_engine(settings, loaded).engine
    from server.engine.async_engine import _generator

    params = params or [SamplingParams()] * count
    requests = [Request(prompt_ids=prompt, params=p, sink=lambda event: None, generator=_generator(p, loaded.device),
                        stop=StopCriteria(max_new_tokens=6, ignore_eos=True),
                        detokenizer=IncrementalDetokenizer(loaded.tokenizer, prompt, loaded.special_token_ids))
                for p in params]
    for request in requests:
        engine.scheduler.add(request)
    fed, schedule = [], engine.scheduler.schedule
    engine.twins = []

    def recorded():  # the prompt tokens each plan computes
        plan = schedule()
        if plan is not None:
            fed.append(sum(n for n, r in zip(plan.tokens_fed, plan.requests) if r.is_prefilling))
            engine.twins.append(len(plan.twins))
        return plan

    engine.scheduler.schedule = recorded
    return engine, requests, fed


def test_a_burst_sharing_a_prompt_prefills_it_once(loaded):
    """Four requests with one long prompt, admitted together: the first computes the prompt, the
    others read its full blocks in the same step and are its twins for the tail past them (copied,
    with its logits, after the step); the same tokens as without prefix caching, and every block
    back in the pool."""
    from server.metrics import PREFIX_HIT_TOKENS

    def run_burst(prefix_caching: bool):
        engine, requests, fed = burst_engine(loaded, prefix_caching, 4)
        while engine.step():
            pass
        assert engine.scheduler.kv.pool.num_used == 0
        return [r.output_ids for r in requests], [n for n in fed if n], len(requests[0].prompt_ids), engine.twins

    cold, cold_fed, length, cold_twins = run_burst(False)
    shared = (length - 1) // 16 * 16  # the full blocks a request can read (one token is always computed)
    assert length % 16 and length - shared > 1  # a partial last block of several tokens: copied, not shared
    before = PREFIX_HIT_TOKENS._value.get()
    warm, warm_fed, _, warm_twins = run_burst(True)
    assert PREFIX_HIT_TOKENS._value.get() - before == 3 * shared
    assert warm_fed == [length] and warm_twins[0] == 3  # one step: one prompt computed, three twins
    assert cold_fed == [4 * length] and not any(cold_twins)  # no prefix caching: no twins either
    assert warm == cold


def test_twins_sample_as_if_each_had_computed_its_prompt(loaded):
    """Twins take their leader's logits but sample with their own settings: seeded sampling gives
    each request the tokens it gets alone (different seeds, different outputs), and a greedy twin
    of a sampling leader stays greedy."""
    sampled = [SamplingParams(temperature=1.5, do_sample=True, seed=seed) for seed in (1, 2, 3)]
    params = [sampled[0], SamplingParams(), sampled[1], sampled[2]]
    alone = []
    for p in params:
        engine, (request,), _ = burst_engine(loaded, True, 1, [p])
        while engine.step():
            pass
        alone.append(request.output_ids)
    assert len({tuple(a) for a in alone}) == 4  # the seeds really differ
    engine, requests, fed = burst_engine(loaded, True, 4, params)
    while engine.step():
        pass
    assert engine.twins[0] == 3
    assert [r.output_ids for r in requests] == alone
    assert engine.scheduler.kv.pool.num_used == 0


def test_a_twin_waits_for_its_leaders_last_prompt_chunk(loaded):
    """A prompt prefilled 48 tokens a step: its twins wait (computing nothing) until the step with
    the leader's last chunk, then copy its tail; the tokens of a cold run."""
    engine, requests, _ = burst_engine(loaded, False, 1, max_batch_prefill_tokens=48)
    while engine.step():
        pass
    cold = requests[0].output_ids
    engine, requests, fed = burst_engine(loaded, True, 3, max_batch_prefill_tokens=48)
    steps = -(-len(requests[0].prompt_ids) // 48)
    for _ in range(steps - 1):
        engine.step()
    assert not any(r.output_ids for r in requests)
    engine.step()  # the leader's last chunk: every one of them has its first token
    assert [len(r.output_ids) for r in requests] == [1, 1, 1]
    kv, length = engine.scheduler.kv, len(requests[0].prompt_ids)

    def tail(request):  # the prompt's last partial block, every layer's keys and values
        slots = [request.block_table[p // 16] * 16 + p % 16 for p in range(length // 16 * 16, length)]
        return torch.stack([torch.stack([k[slots], v[slots]]) for k, v in zip(kv.keys, kv.values)])

    leader_tail = tail(requests[0])
    assert leader_tail.abs().sum() > 0 and all(torch.equal(tail(r), leader_tail) for r in requests[1:])
    assert len({r.block_table[-1] for r in requests}) == 3  # each in its own last block
    while engine.step():
        pass
    assert [n for n in fed if n] == [48] * (steps - 1) + [len(requests[0].prompt_ids) - 48 * (steps - 1)]
    assert engine.twins[steps - 1] == 2 and sum(engine.twins) == 2
    assert [r.output_ids for r in requests] == [cold] * 3


def test_a_leader_that_leaves_mid_prompt_hands_its_blocks_over(loaded):
    """The request computing a shared prompt is cancelled part-way through its chunks: the first of
    the requests reading its blocks computes the rest of them instead, the other still reads them,
    and both give the tokens of a cold run."""
    engine, requests, _ = burst_engine(loaded, False, 1, max_batch_prefill_tokens=48)
    while engine.step():
        pass
    cold = requests[0].output_ids

    engine, (leader, *followers), fed = burst_engine(loaded, True, 3, max_batch_prefill_tokens=48)
    engine.step()  # the leader's first 48 tokens (admissions stop at twice the step's budget)
    assert leader.num_computed_tokens == 48 and all(f.admitted_seq < 0 for f in followers)
    leader.cancel_requested = True
    engine.step()  # the followers come in reading its blocks; it computes 48 more, then leaves
    shared = (len(leader.prompt_ids) - 1) // 16 * 16
    assert leader.is_finished and shared > 96
    assert followers[0].num_computed_tokens == 96  # from the first block the leader never computed, its own
    assert followers[1].num_computed_tokens == shared  # still reading them: now computed by followers[0]
    while engine.step():
        pass
    assert [f.output_ids for f in followers] == [cold, cold]
    assert engine.scheduler.kv.pool.num_used == 0


LONG = ("In a distant kingdom surrounded by tall mountains, an old clockmaker spent his days repairing the tiny "
        "gears of forgotten watches, and every evening he told the village children a new story about the stars. ") * 2


@pytest.mark.parametrize("layout", ["paged", "dense"])
def test_chunked_prefill_keeps_streams_decoding_and_changes_no_token(make_engine, layout: str):
    """A long prompt prefilled 8 tokens a step: a stream already decoding gets tokens meanwhile (one
    a step), and both outputs equal an unchunked run."""
    short = GenerationInput(prompt="Write a poem about the sea.", params=SamplingParams(), max_new_tokens=40,
                            ignore_eos=True)
    long_ = GenerationInput(prompt=LONG, params=SamplingParams(), max_new_tokens=8, ignore_eos=True)
    whole = make_engine(model={"kv_cache": layout})
    expected = [run(collect(whole, inp))[0] for inp in (short, long_)]
    whole.engine.stop()
    chunked = make_engine(model={"kv_cache": layout}, max_batch_prefill_tokens=8)

    async def both():
        first = await chunked.submit(short)
        short_times: list[float] = []

        async def drain_short():
            async for event in first:
                if event.token is not None:
                    short_times.append(time.monotonic())

        task = asyncio.ensure_future(drain_short())
        while len(short_times) < 3:
            await asyncio.sleep(0.01)
        submitted, long_first = time.monotonic(), None
        second = await chunked.submit(long_)
        async for event in second:
            if event.token is not None and long_first is None:
                long_first = time.monotonic()
        await task
        during = sum(submitted < t < long_first for t in short_times)
        return list(first.request.output_ids), list(second.request.output_ids), during, second.request

    short_tokens, long_tokens, during, long_request = run(both())
    assert [short_tokens, long_tokens] == expected
    chunks = -(-long_request.num_prompt_tokens // 8)
    assert chunks >= 8 and during >= chunks - 2  # a decode row rode along in every chunk's step


def test_decode_attention_in_place_matches_gathered_sdpa(make_engine):
    """On CPU the paged cache's C kernel attends over the slots in place; the same batch decoded with
    it and with gathered keys and SDPA gives the same tokens."""
    from server.kernels.native import attention_kernel

    engine = make_engine(kv_cache_memory_mb=64, **SMALL)
    kv = engine.engine.scheduler.kv
    assert isinstance(kv, PagedKVCache)
    if attention_kernel() is None:
        pytest.skip("no C compiler here: SDPA only")
    assert kv._attend is not None
    batch = [GenerationInput(prompt=p, params=SamplingParams(), max_new_tokens=24, ignore_eos=True)
             for p in PROMPTS]
    in_place = run(run_all(engine, batch))
    kv._attend = None
    gathered = run(run_all(engine, batch))
    for (tokens, _, text), (want, _, want_text) in zip(in_place, gathered):
        assert tokens == want and text == want_text


def test_the_attention_kernel_refuses_slots_outside_the_pool():
    import torch

    from server.kernels.native import attention_kernel

    kernel = attention_kernel()
    if kernel is None:
        pytest.skip("no C compiler here: SDPA only")
    q, k, v = torch.randn(2, 4, 8), torch.randn(10, 2, 8), torch.randn(10, 2, 8)
    lens = torch.tensor([3, 2])
    kernel(q, k, v, torch.tensor([[0, 1, 2], [3, 4, 0]]), lens, None, 0.5)  # in bounds: fine
    for gather in (torch.tensor([[0, 1, 10], [3, 4, 0]]), torch.tensor([[0, -1, 2], [3, 4, 0]])):
        with pytest.raises(ValueError):
            kernel(q, k, v, gather, lens, None, 0.5)
    with pytest.raises(ValueError):
        kernel(q, k, v, torch.tensor([[0, 1, 2], [3, 4, 0]]), torch.tensor([4, 2]), None, 0.5)  # past attend_len
    with pytest.raises(ValueError):
        kernel(q, k.bfloat16(), v, torch.tensor([[0, 1, 2], [3, 4, 0]]), lens, None, 0.5)
    with pytest.raises(ValueError):  # no storage behind the slots
        kernel(q, k, v, torch.zeros(2, 3, 0, dtype=torch.long), lens, None, 0.5)
    with pytest.raises(ValueError):
        kernel(q, torch.empty(10, 2, 8, 0), v, torch.tensor([[0, 1, 2], [3, 4, 0]]), lens, None, 0.5)


@pytest.mark.parametrize("dtype, dim", [("float32", 64), ("bfloat16", 64), ("bfloat16", 48)])
def test_the_attention_kernel_against_a_float64_softmax(dtype, dim):
    """GQA (4 query heads per KV head), ragged lengths, a sliding window, q rows apart as the fused
    projection leaves them; 64 takes the AVX512-BF16 path in bf16 where the CPU has it, 48 the other."""
    import torch

    from server.kernels.native import attention_kernel

    kernel = attention_kernel()
    if kernel is None:
        pytest.skip("no C compiler here: SDPA only")
    dtype = getattr(torch, dtype)
    g = torch.Generator().manual_seed(3)
    heads, kv_heads, slots = 8, 2, 300
    k, v = (torch.randn(slots, kv_heads, dim, generator=g).to(dtype) for _ in range(2))
    q = torch.randn(4, heads + 4, dim, generator=g).to(dtype)[:, :heads]
    gather = torch.randperm(slots, generator=g)[:4 * 70].view(4, 70).contiguous()
    lens = torch.tensor([70, 1, 33, 64])
    for window in (None, 16):
        got = kernel(q, k, v, gather, lens, window, dim ** -0.5).double()
        for s in range(4):
            first = 0 if window is None else max(0, int(lens[s]) - window)
            keys, values = k[gather[s, first : lens[s]]].double(), v[gather[s, first : lens[s]]].double()
            for head in range(heads):
                kv = head // (heads // kv_heads)
                weights = torch.softmax(keys[:, kv] @ q[s, head].double() * dim ** -0.5, dim=0)
                want = weights @ values[:, kv]
                tolerance = 1e-5 if dtype == torch.float32 else 1e-2
                torch.testing.assert_close(got[s, head], want, atol=tolerance, rtol=tolerance)
