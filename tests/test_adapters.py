"""Multi-LoRA serving on the real model: mixed batches equal peft, eviction, fairness, bad adapters."""

import asyncio
import time

import pytest

from server.adapters.weights import AdapterLoadError, AdapterNotFoundError
from server.config import AdapterConfig
from server.errors import GenerationError, ValidationError
from tests.adapter_factory import SPECS
from tests.conftest import ADAPTER_PROMPTS as PROMPTS
from tests.conftest import NEW_TOKENS, collect, greedy, run


def adapter_engine(make_engine, adapter_root, **limits):
    return make_engine(adapters=AdapterConfig(adapters_dir=str(adapter_root)), **limits)


async def mixed_run(engine, names_and_prompts):
    async def one(name, prompt):
        return await collect(engine, greedy(prompt, NEW_TOKENS, adapter_id=f"{name}/1" if name else None))
    return await asyncio.gather(*(one(n, p) for n, p in names_and_prompts))


def workload() -> list[tuple[str | None, str]]:
    names = [None, *(s.name for s in SPECS)]
    return [(n, p) for p in PROMPTS for n in names]


def test_adapters_change_the_output(references):
    for prompt in PROMPTS:
        base = references[(None, prompt)]
        assert all(references[(s.name, prompt)] != base for s in SPECS)


def test_mixed_concurrent_batch_equals_peft_token_for_token(make_engine, adapter_root, references):
    engine = adapter_engine(make_engine, adapter_root)
    results = run(mixed_run(engine, workload()))
    for (name, prompt), (tokens, _, _) in zip(workload(), results):
        assert tokens == references[(name, prompt)], (name, prompt)
    scheduler = engine.engine.scheduler
    assert len(scheduler.adapters.active) == len(SPECS)


def test_more_adapters_than_device_slots_evict_and_reload_correctly(make_engine, adapter_root, references):
    engine = adapter_engine(make_engine, adapter_root, max_active_adapters=1)
    results = run(mixed_run(engine, workload()))
    for (name, prompt), (tokens, _, _) in zip(workload(), results):
        assert tokens == references[(name, prompt)], (name, prompt)
    resident = engine.engine.scheduler.adapters
    assert resident.evictions >= len(SPECS) - 1 and len(resident.active) <= 1


def test_a_batch_of_many_adapters_equals_peft_for_each(make_engine, adapter_root, loaded, references, tmp_path):
    """14 adapters and the base model decode in one batch (no count limit: memory bounds the device
    tier): 12 rank-8 ones (one slot each, so grouped by slot), the same with the rank-32 and rank-16
    ones beside them (sorted runs), the 12 again with costs that favour gathered rows; every row
    equals peft with its adapter alone."""
    import dataclasses
    import shutil

    from server.adapters.lora import BF16_COSTS
    from tests.adapter_factory import peft_greedy_each, variant_copy

    dirs = {f"v{i:02d}": variant_copy(adapter_root / SPECS[0].name / "1", tmp_path / f"v{i:02d}" / "1", seed=i)
            for i in range(12)}
    dirs.update({s.name: adapter_root / s.name / "1" for s in SPECS[1:]})
    for spec in SPECS[1:]:
        shutil.copytree(adapter_root / spec.name, tmp_path / spec.name)
    prompt, new = PROMPTS[0], 6
    want = peft_greedy_each(loaded.model_dir, dirs, loaded.tokenizer(prompt)["input_ids"], new)
    want[None] = references[(None, prompt)][:new]
    engine = make_engine(adapters=AdapterConfig(adapters_dir=str(tmp_path)))
    resident = engine.engine.scheduler.adapters
    plans: list[str] = []
    plan = resident.planner.plan
    resident.planner.plan = lambda *args: _record(plans, plan(*args))

    async def batch(names):
        return await asyncio.gather(*(collect(engine, greedy(prompt, new, adapter_id=f"{n}/1" if n else None))
                                      for n in names))

    kernel = resident.planner.kernel  # the C kernel where it builds (TokenColumns), then torch's methods
    for names in ([*list(dirs)[:12], None], "torch", [*list(dirs)[:12], None], [*dirs, None], "bf16 costs",
                  [*list(dirs)[:12], None]):
        if names == "torch":
            resident.planner.kernel = None
            continue
        if names == "bf16 costs":  # costs that make gathering each row's columns the cheapest
            resident.planner.costs = dataclasses.replace(BF16_COSTS, window_per_token_column=10.0)
            continue
        results = run(batch(names))
        for name, (tokens, _, _) in zip(names, results):
            assert tokens == want[name], name
    assert len(resident.active) == 14 and resident.evictions == 0
    assert {"SortedGroups", "SortedRuns", "GatheredRows"} <= set(plans), plans
    assert ("TokenColumns" in plans) == (kernel is not None), plans


def test_adapters_scattered_among_idle_ones_are_packed_together_and_still_equal_peft(
        make_engine, loaded, adapter_root, tmp_path):
    """Eight adapters made resident one by one sit side by side; a batch of every other one spreads
    over twice its width, so those outside the front trade places with idle ones (one gather and
    scatter per buffer). The batch, and then the displaced adapters on their own, equal peft."""
    from tests.adapter_factory import peft_greedy_each, variant_copy

    dirs = {f"s{i}": variant_copy(adapter_root / SPECS[0].name / "1", tmp_path / f"s{i}" / "1", seed=50 + i)
            for i in range(8)}
    prompt, new = PROMPTS[0], 5
    want = peft_greedy_each(loaded.model_dir, dirs, loaded.tokenizer(prompt)["input_ids"], new)
    engine = make_engine(adapters=AdapterConfig(adapters_dir=str(tmp_path)))
    resident = engine.engine.scheduler.adapters
    resident.planner.kernel = None  # packing is for torch's masked window (the C kernel reads columns in place)

    async def batch(names):
        return await asyncio.gather(*(collect(engine, greedy(prompt, new, adapter_id=f"{n}/1")) for n in names))

    for name in dirs:  # resident in this order: slots 0..7
        run(batch([name]))
    spread, idle = list(dirs)[::2], list(dirs)[1::2]
    starts = {name: resident._columns[resident.resident(engine.store.key_for(f"{name}/1", None))][0]
              for name in dirs}
    assert sorted(starts[n] for n in spread) == [0, 16, 32, 48]
    for names in (spread, idle, list(dirs)):
        assert [tokens for tokens, _, _ in run(batch(names))] == [want[n] for n in names], names
    assert resident.relocations == 2  # s4 and s6 traded places with s1 and s3; the later batches were tight
    columns = sorted(resident._columns[resident.resident(engine.store.key_for(f"{n}/1", None))][0] for n in spread)
    assert columns == [0, 8, 16, 24]


def _record(plans: list[str], plan):
    plans.append(type(plan).__name__)
    return plan


def test_a_burst_for_one_adapter_does_not_starve_another(make_engine, adapter_root):
    """20 requests for adapter A arrive first, then one for B; with 2 batch slots FIFO would make B
    wait for all of A. Rotation admits B at the first free slot."""
    engine = adapter_engine(make_engine, adapter_root, max_batch_size=2)
    a, b = f"{SPECS[0].name}/1", f"{SPECS[1].name}/1"

    async def scenario():
        await collect(engine, greedy("warm", 1, adapter_id=a))  # both adapters in the CPU tier first
        await collect(engine, greedy("warm", 1, adapter_id=b))
        burst = [await engine.submit(greedy(PROMPTS[0], 8, ignore_eos=True, adapter_id=a)) for _ in range(20)]
        late = await engine.submit(greedy(PROMPTS[1], 8, ignore_eos=True, adapter_id=b))
        await asyncio.gather(*(_drain(h) for h in [*burst, late]))
        return burst, late

    burst, late = run(scenario())
    burst_first_tokens = sorted(h.request.first_token_time for h in burst)
    # B started before the 4th request of the burst: one rotation turn, not the whole queue
    assert late.request.first_token_time < burst_first_tokens[3]


async def _drain(handle):
    async for _ in handle:
        pass


@pytest.mark.parametrize(
    "adapter_id, error, message",
    [
        ("no-such-repo/1", AdapterNotFoundError, "not found"),
        (f"{SPECS[0].name}/7", AdapterNotFoundError, "not found"),
        ("corrupt/1", AdapterLoadError, "corrupt adapter_model.safetensors"),
        ("foreign/1", AdapterLoadError, "different base model"),
        ("../etc/1", ValidationError, "not a valid adapter id"),
    ],
)
def test_a_bad_adapter_fails_only_its_request(make_engine, adapter_root, references, adapter_id, error, message):
    engine = adapter_engine(make_engine, adapter_root)

    async def scenario():
        good = asyncio.create_task(collect(engine, greedy(PROMPTS[0], NEW_TOKENS, adapter_id=f"{SPECS[1].name}/1")))
        with pytest.raises(error, match=message):
            await engine.submit(greedy(PROMPTS[0], 4, adapter_id=adapter_id))
        return await good

    tokens, _, _ = run(scenario())
    assert tokens == references[(SPECS[1].name, PROMPTS[0])]


def test_repo_without_version_means_highest_version(make_engine, adapter_root, references, tmp_path):
    import shutil

    shutil.copytree(adapter_root / SPECS[2].name / "1", tmp_path / "multi" / "3")
    shutil.copytree(adapter_root / SPECS[0].name / "1", tmp_path / "multi" / "12")
    engine = make_engine(adapters=AdapterConfig(adapters_dir=str(tmp_path)))
    tokens, _, _ = run(collect(engine, greedy(PROMPTS[0], NEW_TOKENS, adapter_id="multi")))
    assert tokens == references[(SPECS[0].name, PROMPTS[0])]  # version 12 > 3, numerically


def test_concurrent_requests_for_a_cold_adapter_trigger_one_load(make_engine, adapter_root):
    engine = adapter_engine(make_engine, adapter_root)
    name = f"{SPECS[2].name}/1"

    async def scenario():
        await asyncio.gather(*(collect(engine, greedy(p, 4, adapter_id=name)) for p in PROMPTS * 3))

    run(scenario())
    assert engine.store.stats["loads"] == 1 and engine.store.stats["cpu_hits"] == 0


def test_an_adapter_still_on_the_device_is_not_read_from_disk_again(make_engine, adapter_root, references):
    engine = make_engine(adapters=AdapterConfig(adapters_dir=str(adapter_root), max_cpu_adapters=1))
    a, b = (f"{s.name}/1" for s in SPECS[:2])
    for adapter_id in (a, b, a):  # b pushes a out of the CPU tier; the device tier still holds a
        tokens, _, _ = run(collect(engine, greedy(PROMPTS[0], NEW_TOKENS, adapter_id=adapter_id)))
        assert tokens == references[(adapter_id.split("/")[0], PROMPTS[0])]
    assert engine.store.stats["loads"] == 2 and engine.store.stats["device_hits"] == 1
    engine.unload_adapter(engine.store.key_for(a, None))  # unloaded on purpose: read from disk again
    run(collect(engine, greedy(PROMPTS[0], 2, adapter_id=a)))
    assert engine.store.stats["loads"] == 3


def test_device_memory_budget_evicts_and_refuses_what_can_never_fit(make_engine, adapter_root, references):
    # one column costs 1.22 MB in fp32 across all projections: rank 32 is 39 MB, ranks 8 + 16 are 29 MB
    engine = adapter_engine(make_engine, adapter_root, max_adapter_memory_mb=40)
    results = run(mixed_run(engine, workload()))
    for (name, prompt), (tokens, _, _) in zip(workload(), results):
        assert tokens == references[(name, prompt)], (name, prompt)
    resident = engine.engine.scheduler.adapters
    assert resident.bytes_used <= 40 * 2**20 and resident.evictions >= 1

    small = adapter_engine(make_engine, adapter_root, max_adapter_memory_mb=30)
    with pytest.raises(GenerationError, match="more than max_adapter_memory_mb"):
        run(collect(small, greedy(PROMPTS[0], 4, adapter_id=f"{SPECS[1].name}/1")))
    assert run(collect(small, greedy(PROMPTS[0], 4, adapter_id=f"{SPECS[0].name}/1")))[0]


def test_requests_waiting_for_a_cold_adapter_count_against_the_concurrency_limit(make_engine, adapter_root):
    from server.errors import OverloadedError

    engine = adapter_engine(make_engine, adapter_root, max_concurrent_requests=3)

    async def scenario():
        cold = [asyncio.create_task(engine.submit(greedy(PROMPTS[0], 2, adapter_id=f"{SPECS[1].name}/1")))
                for _ in range(5)]
        results = await asyncio.gather(*cold, return_exceptions=True)
        for r in results:
            if not isinstance(r, Exception):
                async for _ in r:
                    pass
        return results

    results = run(scenario())
    assert sum(isinstance(r, OverloadedError) for r in results) == 2  # exactly the overflow
    assert sum(not isinstance(r, Exception) for r in results) == 3


def test_a_burst_of_cold_adapters_is_prefilled_together(make_engine, adapter_root, references):
    """Nothing decoding and three requests whose adapters are read from disk: the engine waits for
    the loads (not one small prefill step per load, each taking the cores the other loads need),
    then prefills all three in one step; every output still equals peft."""
    engine = adapter_engine(make_engine, adapter_root)
    steps: list[int] = []
    step = engine.engine.runner.run
    engine.engine.runner.run = lambda plan: (steps.append(len(plan.requests)), step(plan))[1]
    names = [s.name for s in SPECS]
    results = run(mixed_run(engine, [(n, PROMPTS[0]) for n in names]))
    assert steps[0] == len(names) == 3, steps
    for name, (tokens, _, _) in zip(names, results):
        assert tokens == references[(name, PROMPTS[0])]


def test_loads_hold_an_idle_engine_briefly_and_a_decoding_one_never(make_engine, loaded):
    """Driven by hand (the engine thread stopped): with requests arriving on loads and nothing
    decoding, the hold lasts until the loads are done or HOLD_FOR_LOADS_S; with a stream decoding,
    or no load ahead, it returns at once."""
    from server.engine.detokenizer import IncrementalDetokenizer
    from server.engine.engine import HOLD_FOR_LOADS_S
    from server.engine.request import Request, SamplingParams, StopCriteria

    core = make_engine().engine
    core.stop()  # the thread has ended; the loop's pieces are called here instead
    core._stop.clear()
    prompt = loaded.tokenizer(PROMPTS[0])["input_ids"]
    core.scheduler.add(Request(prompt_ids=prompt, params=SamplingParams(), sink=lambda event: None,
                               stop=StopCriteria(max_new_tokens=50, ignore_eos=True),
                               detokenizer=IncrementalDetokenizer(loaded.tokenizer, prompt, loaded.special_token_ids)))

    def held(loads_ahead: bool) -> float:
        core.loads_ahead = lambda: loads_ahead
        started = time.monotonic()
        core._hold_for_loads()
        return time.monotonic() - started

    assert held(False) < 0.05
    assert HOLD_FOR_LOADS_S <= held(True) < HOLD_FOR_LOADS_S + 0.5  # waiting, nothing decoding
    core.step()  # prefilled: from now on it decodes
    assert core.scheduler.running and not core.scheduler.running[0].is_prefilling
    assert held(True) < 0.05
