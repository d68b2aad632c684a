"""Iteration-level scheduling: which requests run in the next forward pass, under explicit budgets.

Waiting requests are admitted (prefilled) between decode steps as soon as a KV slot and the token
budgets allow, so a new request never waits for the running batch to drain.

Fairness across adapters: each adapter (and the base model) has its own FIFO queue, and admission
takes one request per queue in rotation, the adapter just served moving to the back. A burst for
one adapter therefore cannot push another adapter's requests behind it. The device tier is bounded
by memory, so as many adapters as fit decode together; when an adapter does not fit and the resident
ones are all pinned by running requests, the resident adapter with the fewest running requests stops
admitting ("drains"); once idle it is evicted and the waiting adapter moves in, so a waiting queue is
bounded by drains (each at most max_total_tokens decode steps).

Prompt chunks are fed in admission order, a request only once every earlier one has all its pending
tokens in the step: a request admitted while another computes the same prompt prefix (a burst sharing
a system prompt) reads that prefix's blocks instead of computing them again (kv_cache.InFlight). A
request whose whole prompt is another's under the same adapter (a chat request's `n` choices, a
best-of, a client's retry) computes nothing: it is that request's twin, and the step that computes
its leader's last prompt token copies the tail's keys and values and the leader's logits to it.

A request that has waited longer than max_queue_wait_s for admission is failed as "overloaded"
(429), so a client under sustained overload hears so and can retry elsewhere instead of hanging.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Optional

from server.adapters.lora import ResidentAdapters
from server.adapters.weights import AdapterWeights
from server.engine.kv_cache import KVCache, PagedKVCache
from server.engine.request import FinishReason, Request, RequestStatus
from server.metrics import PREEMPTIONS, REJECTED


class StepKind(Enum):
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True)
class Twin:
    """A prefilling request that takes its prompt's keys and values (past the blocks it shares) and
    its first logits from its leader's row of this step instead of computing them."""

    request: Request
    leader_row: int  # the leader's row in BatchPlan.requests


@dataclass(frozen=True)
class BatchPlan:
    """One forward pass. DECODE: every request feeds its last token. PREFILL: the decoding requests
    (first, one token each) and a chunk of each prefilling request's pending tokens, within the
    step's token budget, so running streams keep producing tokens while a long prompt comes in."""

    kind: StepKind
    requests: tuple[Request, ...]
    query_lens: tuple[int, ...] = ()  # PREFILL: tokens each request feeds this step
    twins: tuple[Twin, ...] = ()  # PREFILL: requests computing nothing, given their leaders' results

    @property
    def rows(self) -> tuple[Request, ...]:
        """The requests that get logits this step: the forward's rows, then the twins."""
        return self.requests + tuple(t.request for t in self.twins)

    @property
    def is_decode(self) -> bool:
        return self.kind is StepKind.DECODE

    @property
    def tokens_fed(self) -> tuple[int, ...]:
        return self.query_lens or (1,) * len(self.requests)

    @property
    def num_decode_rows(self) -> int:
        """The leading rows that feed one token to a sequence past its prefill."""
        if self.is_decode:
            return len(self.requests)
        return next((i for i, r in enumerate(self.requests) if r.is_prefilling), len(self.requests))

    def samples(self, row: int) -> bool:
        """Whether this row's tokens reach the end of its sequence, so a next token is sampled (a
        twin's always do: its leader's reach the end of the same prompt)."""
        return row >= len(self.requests) or self.tokens_fed[row] == self.requests[row].pending_tokens

    def mark_computed(self) -> None:
        for request, fed in zip(self.requests, self.tokens_fed):
            request.num_computed_tokens += fed
        for twin in self.twins:
            twin.request.num_computed_tokens = twin.request.total_tokens


@dataclass(frozen=True)
class SchedulerBudget:
    max_batch_size: int  # sequences in the running batch (KV slots)
    max_batch_total_tokens: int  # sum of every running request's worst-case KV tokens
    max_batch_prefill_tokens: int  # prompt tokens in one prefill step
    max_queue_wait_s: float = math.inf  # longest wait for admission before a request fails as overloaded


class Scheduler:
    def __init__(self, budget: SchedulerBudget, kv: KVCache | PagedKVCache, adapters: ResidentAdapters,
                 recomputes_at: Callable[[int], bool] = lambda length: False) -> None:
        self.budget, self.kv, self.adapters = budget, kv, adapters
        self.recomputes_at = recomputes_at  # the model's points where a sequence's whole cache is recomputed
        self.queues: OrderedDict[Optional[AdapterWeights], deque[Request]] = OrderedDict()
        self.running: list[Request] = []
        self.draining: set[AdapterWeights] = set()
        self._admissions = itertools.count()

    @property
    def waiting(self) -> list[Request]:
        return [r for queue in self.queues.values() for r in queue]

    @property
    def num_requests(self) -> int:
        return sum(len(q) for q in self.queues.values()) + len(self.running)

    def add(self, request: Request) -> None:
        self.queues.setdefault(request.adapter, deque()).append(request)

    def schedule(self) -> BatchPlan | None:
        """Admit what fits, make room for every decoding request's next token, and plan the step."""
        self._expire_waiting(time.monotonic())
        for request in self.running:  # the last step's computed blocks join the prefix cache before admission
            self.kv.register_computed(request)
        self._admit()
        self._make_room_for_decode()
        for request in self.running:  # Phi-3 longrope, first past its original context: prefilled again
            if not request.is_prefilling and self.recomputes_at(request.total_tokens):
                request.num_computed_tokens = 0
        if not self.running:
            return None
        order = (lambda r: r.slot) if not self.kv.paged else (lambda r: r.admitted_seq)
        running = sorted(self.running, key=order)
        prefilling = [r for r in running if r.is_prefilling]
        if not prefilling:
            return BatchPlan(StepKind.DECODE, tuple(running))
        decoding = [r for r in running if not r.is_prefilling]
        computing, twins = self._twins(prefilling)
        chunks = self._chunks(computing, self.budget.max_batch_prefill_tokens)
        rows = decoding + [r for r, _ in chunks]
        ending = {id(r): len(decoding) + i for i, (r, n) in enumerate(chunks) if n == r.pending_tokens}
        return BatchPlan(StepKind.PREFILL, tuple(rows), tuple([1] * len(decoding) + [n for _, n in chunks]),
                         tuple(Twin(twin, ending[id(leader)]) for twin, leader in twins if id(leader) in ending))

    def _twins(self, prefilling: list[Request]) -> tuple[list[Request], list[tuple[Request, Request]]]:
        """Split the prefilling requests (in admission order) into those that compute and the twins
        of an earlier one: the same tokens under the same adapter, where the cache lets it copy them
        (kv.may_copy). A twin whose leader's last prompt chunk is not in this step waits for it."""
        if len(prefilling) < 2:  # (the common case: no key built over a long prompt's tokens each chunk)
            return prefilling, []
        leaders: dict[tuple[int, tuple[int, ...]], Request] = {}
        computing, twins = [], []
        for request in prefilling:
            key = (id(request.adapter), tuple(request.all_token_ids))
            leader = leaders.get(key) if self.kv.may_copy(request) else None
            if leader is None:
                leaders.setdefault(key, request)
                computing.append(request)
            else:
                twins.append((request, leader))
        return computing, twins

    @staticmethod
    def _chunks(prefilling: list[Request], budget: int) -> list[tuple[Request, int]]:
        """Pending tokens of the prefilling requests, oldest first, within the step's budget (the
        first always gets at least one token). A request that wants its prompt's log-probs is fed
        whole, since they are read off one pass."""
        chunks: list[tuple[Request, int]] = []
        for request in sorted(prefilling, key=lambda r: r.admitted_seq):
            n = request.pending_tokens if request.scores_prompt else min(request.pending_tokens, budget)
            if n <= 0 or (request.scores_prompt and chunks and n > budget):
                break
            chunks.append((request, n))
            budget -= n
        return chunks

    def _make_room_for_decode(self) -> None:
        """Give every running request room for its next token, oldest first; when the KV pool is
        out, preempt the newest (its blocks freed, the request back at the head of its queue,
        recomputed from prompt and output when admitted again: nothing lost, nothing repeated)."""
        for request in sorted(self.running, key=lambda r: r.admitted_seq):
            while request in self.running and not request.is_prefilling and not self.kv.grow(request):
                self._preempt(max(self.running, key=lambda r: r.admitted_seq))

    def _preempt(self, request: Request) -> None:
        PREEMPTIONS.inc()
        self.running.remove(request)
        self.kv.release(request)
        request.status = RequestStatus.WAITING
        self.queues.setdefault(request.adapter, deque()).appendleft(request)

    def _admit(self) -> list[Request]:
        if not any(a is not None and not self.adapters.is_active(a) for a in self.queues):
            self.draining.clear()  # nobody is waiting for a device slot any more
        admitted: list[Request] = []
        progressed = True
        while progressed:  # one request per adapter queue per pass, in rotation
            progressed = False
            for adapter in list(self.queues):
                request = self.queues[adapter][0]
                if not self._fits(request, admitted):
                    return admitted
                if not self._ensure_resident(adapter):
                    continue
                self._start(request)
                admitted.append(request)
                progressed = True
        return admitted

    def _expire_waiting(self, now: float) -> None:
        """Fail the requests that waited too long. Each queue is FIFO by arrival, so only heads are checked."""
        limit = self.budget.max_queue_wait_s
        for adapter in list(self.queues):
            queue = self.queues[adapter]
            # a preempted request is never failed for waiting: it was admitted once
            while queue and queue[0].admitted_seq < 0 and now - queue[0].arrival_time > limit:
                request = queue.popleft()
                REJECTED.labels("queue_timeout").inc()
                request.finish(FinishReason.ERROR, f"waited more than max_queue_wait_s ({limit:g} s) for a place in "
                               "the running batch: the server is overloaded; retry later", error_type="overloaded")
            if not queue:
                del self.queues[adapter]

    def _fits(self, request: Request, admitted: list[Request]) -> bool:
        """Room in the batch and the KV cache; prompts are prefilled in chunks, so their length
        only bounds how many are admitted in one pass (twice the step's token budget)."""
        prefill = sum(r.pending_tokens for r in admitted)
        return (
            len(self.running) < self.budget.max_batch_size
            and (prefill < 2 * self.budget.max_batch_prefill_tokens or not admitted)
            and self.kv.can_admit(request, self.running)
        )

    def _ensure_resident(self, adapter: Optional[AdapterWeights]) -> bool:
        if adapter is None or self.adapters.is_active(adapter):
            return adapter not in self.draining
        pinned = {r.adapter for r in self.running if r.adapter is not None}
        if self.adapters.activate(adapter, pinned):
            self.draining.intersection_update(self.adapters.active)
            return True
        if not self.draining & set(self.adapters.active):
            counts = {a: sum(r.adapter is a for r in self.running) for a in self.adapters.active}
            self.draining.add(min(self.adapters.active, key=lambda a: counts[a]))
        return False

    def _start(self, request: Request) -> None:
        queue = self.queues[request.adapter]
        queue.popleft()
        self.queues.move_to_end(request.adapter)  # served: to the back of the rotation
        if not queue:
            del self.queues[request.adapter]
        if request.adapter is not None:
            self.adapters.touch(request.adapter)
        self.kv.admit(request)
        request.admitted_seq = next(self._admissions)
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def evict_idle(self, key: object) -> bool:
        """Evict the resident adapter with this key unless running requests use it."""
        for adapter in list(self.adapters.active):
            if adapter.key == key and not any(r.adapter is adapter for r in self.running):
                self.adapters.evict(adapter)
                return True
        return False

    def retire(self, requests: list[Request]) -> None:
        """Remove finished requests from the batch and free their KV slots (slots stay dense)."""
        for request in requests:
            if request in self.running:
                self.running.remove(request)
                self.kv.release(request)
            else:
                queue = self.queues.get(request.adapter)
                if queue is not None and request in queue:
                    queue.remove(request)
                    if not queue:
                        del self.queues[request.adapter]

    def finished_or_cancelled(self) -> list[Request]:
        return [r for r in (*self.running, *self.waiting) if r.is_finished or r.cancel_requested]
