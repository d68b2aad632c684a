"""The engine on the real model: determinism, seeds, stops, budgets, continuous batching, isolation."""

import asyncio
import time

import pytest

from server.engine.async_engine import GenerationInput
from server.engine.request import FinishReason, SamplingParams
from server.errors import OverloadedError, UnavailableError, ValidationError
from tests.conftest import collect, greedy, run

PROMPTS = [
    "What is machine learning?",
    "Write a haiku about the sea.",
    "List three colors:",
    "Explain gravity to a child.",
]


def sampled(prompt: str, seed: int | None, n: int = 16) -> GenerationInput:
    return GenerationInput(prompt, SamplingParams(temperature=0.9, top_p=0.95, do_sample=True, seed=seed), n)


def test_greedy_is_deterministic(make_engine):
    engine = make_engine()
    first = run(collect(engine, greedy(PROMPTS[0], 20)))
    second = run(collect(engine, greedy(PROMPTS[0], 20)))
    assert first == second
    assert len(first[2]) > 20  # real text came out


def test_seed_reproduces_sampling_and_seeds_differ(make_engine):
    engine = make_engine()
    a = run(collect(engine, sampled(PROMPTS[1], seed=1234, n=24)))
    b = run(collect(engine, sampled(PROMPTS[1], seed=1234, n=24)))
    others = {tuple(run(collect(engine, sampled(PROMPTS[1], seed=s, n=24)))[0]) for s in (1, 2, 3)}
    assert a[0] == b[0]
    assert len(others | {tuple(a[0])}) > 1  # different seeds explore different continuations


def test_max_new_tokens_is_exact(make_engine):
    engine = make_engine()
    tokens, reason, _ = run(collect(engine, greedy(PROMPTS[3], 7, ignore_eos=True)))
    assert (len(tokens), reason) == (7, FinishReason.LENGTH)


def test_stop_sequence_matched_across_token_boundaries(make_engine):
    engine = make_engine()
    _, _, free_text = run(collect(engine, greedy(PROMPTS[0], 30)))
    # pick a stop string that straddles the boundary of two generated tokens
    stop = free_text[8:14]
    tokens, reason, text = run(collect(engine, greedy(PROMPTS[0], 30, stop_sequences=(stop,))))
    assert reason is FinishReason.STOP
    assert text.endswith(stop) or stop in text
    assert text.index(stop) + len(stop) >= len(text) - 8  # stopped right after the match
    assert len(tokens) < 30


def test_eos_finishes_unless_ignored(make_engine, loaded):
    engine = make_engine()
    chat = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hi."}], tokenize=False, add_generation_prompt=True
    )
    tokens, reason, _ = run(collect(engine, greedy(chat, 200)))
    assert reason is FinishReason.EOS and tokens[-1] in loaded.eos_token_ids
    tokens, reason, _ = run(collect(engine, greedy(chat, 40, ignore_eos=True)))
    assert reason is FinishReason.LENGTH and len(tokens) == 40


def test_continuous_batching_late_request_joins_and_outputs_match_solo(make_engine):
    engine = make_engine()
    solo = [run(collect(engine, greedy(p, 12 if i == 3 else 48, ignore_eos=True))) for i, p in enumerate(PROMPTS)]

    async def scenario():
        long_handles = [await engine.submit(greedy(p, 48, ignore_eos=True)) for p in PROMPTS[:3]]
        long_tasks = [asyncio.create_task(_finish_time(h)) for h in long_handles]
        while min(h.request.num_generated for h in long_handles) < 8:
            await asyncio.sleep(0.01)
        late = await engine.submit(greedy(PROMPTS[3], 12, ignore_eos=True))
        late_done = await _finish_time(late)
        return long_handles, await asyncio.gather(*long_tasks), late, late_done

    long_handles, long_done, late, late_done = run(scenario())
    # the late request was admitted while the others were mid-generation and finished before them
    assert late.request.first_token_time < min(long_done)
    assert late_done < min(long_done)
    for handle, (expected, _, _) in zip([*long_handles, late], solo):
        assert handle.request.output_ids == expected


async def _finish_time(handle) -> float:
    async for _ in handle:
        pass
    return time.monotonic()


def test_a_failing_row_fails_alone_and_engine_keeps_serving(make_engine):
    engine = make_engine()

    def explode(logits, request):
        if request.num_generated == 3:
            raise RuntimeError("injected fault")
        return logits

    async def scenario():
        bad = await engine.submit(greedy(PROMPTS[0], 20, processors=(explode,)))
        good = await engine.submit(greedy(PROMPTS[1], 20, ignore_eos=True))
        bad_events = [e async for e in bad]
        good_events = [e async for e in good]
        return bad_events, good_events

    bad_events, good_events = run(scenario())
    assert bad_events[-1].finish_reason is FinishReason.ERROR and "injected fault" in bad_events[-1].error
    assert good_events[-1].finish_reason is FinishReason.LENGTH
    assert run(collect(engine, greedy(PROMPTS[2], 5)))[1] in (FinishReason.LENGTH, FinishReason.EOS)
    assert engine.engine.alive


def test_budgets_are_checked_before_queueing(make_engine):
    engine = make_engine(max_input_length=16, max_total_tokens=32, max_batch_prefill_tokens=32,
                         max_concurrent_requests=2)
    long_prompt = "word " * 40

    async def scenario():
        with pytest.raises(ValidationError, match="less than 16 tokens"):
            await engine.submit(greedy(long_prompt, 4))
        with pytest.raises(ValidationError, match="must be <= 32"):
            await engine.submit(greedy("Hello there", 40))
        handles = [await engine.submit(greedy("Hello", 8)) for _ in range(2)]
        with pytest.raises(OverloadedError):
            await engine.submit(greedy("Hello", 8))
        for h in handles:
            [e async for e in h]
        (await engine.submit(greedy("Hello", 2))).close()  # capacity returned once requests finish

    run(scenario())


def test_truncate_keeps_the_last_tokens(make_engine, loaded):
    engine = make_engine(max_input_length=16, max_total_tokens=32, max_batch_prefill_tokens=32)
    _, reason, _ = run(collect(engine, greedy("word " * 40, 4, truncate=10)))
    assert reason is FinishReason.LENGTH


def test_cancelled_request_leaves_the_batch(make_engine):
    engine = make_engine()

    async def scenario():
        handle = await engine.submit(greedy(PROMPTS[0], 200, ignore_eos=True))
        async for _event in handle:
            if handle.request.num_generated >= 3:
                break  # leaving the loop closes the handle, which cancels the request
        for _ in range(200):
            if not engine.engine.scheduler.running:
                break
            await asyncio.sleep(0.02)
        return handle

    handle = run(scenario())
    assert handle.request.finish_reason is FinishReason.CANCELLED
    assert handle.request.num_generated < 200
    assert engine.engine.scheduler.kv.used_slots == 0 and engine.in_flight == 0


def test_a_dead_engine_loop_fails_everyone_and_reports_not_alive(make_engine):
    engine = make_engine()

    def broken_bookkeeping():
        raise RuntimeError("injected scheduler bug")

    async def scenario():
        engine.engine.scheduler.schedule = broken_bookkeeping
        handle = await engine.submit(greedy(PROMPTS[0], 5))
        return [e async for e in handle]

    events = run(scenario())
    assert events[-1].finish_reason is FinishReason.ERROR and "injected scheduler bug" in events[-1].error
    for _ in range(50):
        if not engine.engine.alive:
            break
        time.sleep(0.05)
    assert not engine.engine.alive

    async def refused():
        with pytest.raises(UnavailableError):
            await engine.submit(greedy(PROMPTS[0], 5))

    run(refused())


def test_the_engine_thread_takes_its_share_of_threads_whatever_a_loader_set():
    """A thread starts with the count the last thread to set one left (a loader sets 1), so the
    engine's first step sets its own; then one fewer per busy loader and per reserved thread."""
    import threading

    import torch

    from server.engine.cpu_threads import CpuThreads

    def in_thread(fn):
        thread = threading.Thread(target=fn)
        thread.start()
        thread.join()

    original = torch.get_num_threads()
    busy, seen = [0], {}

    def engine():
        cpu = CpuThreads(2, busy_loaders=lambda: busy[0])
        seen["start"] = torch.get_num_threads()
        cpu.apply()
        seen["applied"] = torch.get_num_threads()
        busy[0] = 1
        cpu.apply()
        seen["loading"] = torch.get_num_threads()
        busy[0], cpu.reserved = 0, 1
        cpu.apply()
        seen["reserved"] = torch.get_num_threads()

    try:
        in_thread(lambda: torch.set_num_threads(1))  # what a loader thread does
        in_thread(engine)
    finally:
        in_thread(lambda: torch.set_num_threads(original))
    assert seen == {"start": 1, "applied": 2, "loading": 1, "reserved": 1}
