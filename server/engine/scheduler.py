"""Iteration-level scheduling: which requests run in the next forward pass, under explicit budgets.

Waiting requests are admitted (prefilled) between decode steps as soon as a slot and token
budget allow, so a new request never waits for the running batch to drain.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum

from server.engine.kv_cache import KVCache
from server.engine.request import Request, RequestStatus


class StepKind(Enum):
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True)
class BatchPlan:
    """One forward pass: a prefill of newly admitted requests, or a decode step of running ones."""

    kind: StepKind
    requests: tuple[Request, ...]

    @property
    def is_decode(self) -> bool:
        return self.kind is StepKind.DECODE


@dataclass(frozen=True)
class SchedulerBudget:
    max_batch_size: int  # sequences in the running batch (KV slots)
    max_batch_total_tokens: int  # sum of every running request's worst-case KV tokens
    max_batch_prefill_tokens: int  # prompt tokens in one prefill step


class Scheduler:
    def __init__(self, budget: SchedulerBudget, kv: KVCache) -> None:
        self.budget = budget
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    @property
    def num_requests(self) -> int:
        return len(self.waiting) + len(self.running)

    @property
    def reserved_tokens(self) -> int:
        return sum(r.max_total_tokens for r in self.running)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def schedule(self) -> BatchPlan | None:
        admitted = self._admit()
        if admitted:
            return BatchPlan(StepKind.PREFILL, tuple(admitted))
        if self.running:
            return BatchPlan(StepKind.DECODE, tuple(sorted(self.running, key=lambda r: r.slot)))
        return None

    def _admit(self) -> list[Request]:
        admitted: list[Request] = []
        prefill_tokens, reserved = 0, self.reserved_tokens
        while self.waiting:
            request = self.waiting[0]
            if not self._fits(request, prefill_tokens, reserved):
                break
            self.waiting.popleft()
            request.slot = self.kv.allocate(request)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            admitted.append(request)
            prefill_tokens += request.num_prompt_tokens
            reserved += request.max_total_tokens
        return admitted

    def _fits(self, request: Request, prefill_tokens: int, reserved: int) -> bool:
        return (
            len(self.running) < self.budget.max_batch_size
            and prefill_tokens + request.num_prompt_tokens <= self.budget.max_batch_prefill_tokens
            and reserved + request.max_total_tokens <= self.budget.max_batch_total_tokens
        )

    def retire(self, requests: list[Request]) -> None:
        """Remove finished requests from the batch and free their KV slots (slots stay dense)."""
        for request in requests:
            if request in self.running:
                self.running.remove(request)
                moved = self.kv.free(request.slot)
                if moved is not None:
                    owner, new_slot = moved
                    owner.slot = new_slot
            elif request in self.waiting:
                self.waiting.remove(request)
            request.slot = None

    def finished_or_cancelled(self) -> list[Request]:
        return [r for r in (*self.running, *self.waiting) if r.is_finished or r.cancel_requested]
