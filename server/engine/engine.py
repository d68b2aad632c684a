"""The engine loop: plan a step, run it, sample, hand tokens back. Runs on its own thread.

A failure inside one row fails that request; a failure of a whole forward pass fails that
pass's requests; neither stops the loop. Only an error in the loop's own bookkeeping is fatal,
and it marks the engine dead so /health turns 503.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, Optional

import torch

from server.engine import sampler
from server.engine.cpu_threads import CpuThreads
from server.engine.request import FinishReason, Request, RequestEvent, TokenInfo
from server.engine.runner import ModelRunner
from server.engine.sampler import SampledToken
from server.engine.scheduler import BatchPlan, Scheduler
from server.metrics import BATCH_SIZE, GENERATED_TOKENS, ITL_SECONDS, STEP_DEVICE_SECONDS, STEP_SECONDS, TTFT_SECONDS
from server.structured.guide import mask_rows

log = logging.getLogger(__name__)

HOLD_FOR_LOADS_S = 1.0  # the longest an idle engine waits for requests whose adapters are being read


class Engine:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, eos_token_ids: frozenset[int]) -> None:
        self.runner, self.scheduler, self.eos_token_ids = runner, scheduler, eos_token_ids
        self.cpu = CpuThreads(torch.get_num_threads(), enabled=False)  # the builder sets the real one
        self.loads_ahead: Callable[[], bool] = lambda: False  # requests wait on adapter reads (AsyncEngine's)
        self._inbox: queue.SimpleQueue[Request | Callable[[], None] | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.fatal_error: Optional[BaseException] = None
        self.steps = 0
        self.timer = ForwardTimer(runner.device)

    # -- the loop ---------------------------------------------------------------------------------
    def step(self) -> bool:
        plan = self.scheduler.schedule()
        if plan is None:
            return False
        with STEP_SECONDS.labels(plan.kind.value).time():
            self.timer.begin()
            logits = self._forward(plan)  # [rows, vocab] or None if the pass failed
            self.timer.end()
            if logits is not None:
                self._advance(plan, logits)  # (waits for the logits)
        self.timer.observe(plan.kind.value)
        self._retire()
        return True

    def run_forever(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_inbox(block=self.scheduler.num_requests == 0)
                self._hold_for_loads()
                self.cpu.apply()
                if self.step():
                    self.steps += 1
        except BaseException as exc:  # a bug in the loop itself: fail everyone, report dead
            log.exception("engine loop died")
            self.fatal_error = exc
            self._fail_all(f"engine failure: {exc}")

    # -- threading ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self.run_forever, name="engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(None)  # wakes a blocked drain
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self.fatal_error is None and (self._thread is None or self._thread.is_alive())

    def submit(self, request: Request) -> None:
        """Thread-safe: queue a request for the engine thread."""
        self._inbox.put(request)

    def cancel(self, request: Request) -> None:
        """Thread-safe: the request leaves the batch at the end of the current step."""
        request.cancel_requested = True
        self._inbox.put(None)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Thread-safe: run `fn` on the engine thread between steps (device-tier changes)."""
        self._inbox.put(fn)

    def _hold_for_loads(self) -> None:
        """With nothing running, wait (up to HOLD_FOR_LOADS_S) while requests wait on adapters
        being read from disk, then prefill them together. A burst of cold adapters otherwise
        becomes a prefill step per load as each finishes: ten small steps instead of one, each
        taking the cores and memory bandwidth the remaining loads need (an engine timeline of a
        24-adapter burst: prefill steps of 1 to 26 rows, loads at 30-65 ms each against ~10
        alone). Never while anything runs (a decoding stream, a prompt part-way through its
        chunks: neither waits for anyone's load), so at most once per idle spell, and never for
        a download (seconds, not milliseconds)."""
        deadline = time.monotonic() + HOLD_FOR_LOADS_S
        while (self.scheduler.num_requests and not self.scheduler.running and self.loads_ahead()
               and not self._stop.is_set()):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._drain_inbox(block=True, timeout=min(left, 0.01))  # wakes as each request arrives

    def _drain_inbox(self, block: bool, timeout: float = 0.5) -> None:
        try:
            item = self._inbox.get(timeout=timeout) if block else self._inbox.get_nowait()
            while True:
                if isinstance(item, Request):
                    self.scheduler.add(item)
                elif item is not None:
                    self._run_command(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            return

    @staticmethod
    def _run_command(fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            log.exception("engine command failed")

    # -- one step's pieces ----------------------------------------------------------------------
    def _forward(self, plan: BatchPlan) -> Optional[torch.Tensor]:
        BATCH_SIZE.labels(plan.kind.value).observe(len(plan.requests))
        try:
            return self.runner.run(plan)
        except Exception as exc:
            log.exception("forward pass failed for %d requests", len(plan.rows))
            for request in plan.rows:
                request.finish(FinishReason.ERROR, f"forward pass failed: {exc}")
            return None

    def _advance(self, plan: BatchPlan, logits: torch.Tensor) -> None:
        """Sample a next token for every row whose tokens reached the end of its sequence (a chunk
        that stops short of a prompt's end samples nothing), after recording what was computed."""
        requests = plan.rows
        sampling = [plan.samples(row) for row in range(len(requests))]
        plan.mark_computed()
        guided = [row for row in range(len(requests)) if sampling[row] and requests[row].guide is not None]
        if guided:  # first, while the GPU may still be computing the logits
            mask_rows(logits, guided, [requests[row].guide for row in guided])
        greedy_rows = [row for row in sampler.plain_greedy_rows(requests) if sampling[row]]
        picked: dict[int, SampledToken] = {}
        if greedy_rows:
            rows = logits if len(greedy_rows) == len(requests) else logits[greedy_rows]  # (all: no copy)
            picked = dict(zip(greedy_rows, sampler.greedy_batch(rows)))
        for row, request in enumerate(requests):
            if not sampling[row] or request.is_finished or request.cancel_requested:
                continue
            try:
                token = picked.get(row) or sampler.sample_row(logits[row], request)
                self._accept(request, token)
            except Exception as exc:
                log.exception("request %s failed while sampling", request.id)
                request.finish(FinishReason.ERROR, f"sampling failed: {exc}")

    def _accept(self, request: Request, token: SampledToken) -> None:
        if request.guide is not None and token.token_id not in self.eos_token_ids:
            request.guide.advance(token.token_id)
        request.output_ids.append(token.token_id)
        request.output_logprobs.append(token.logprob)
        now = time.monotonic()
        if request.first_token_time is None:
            request.first_token_time = now
            TTFT_SECONDS.observe(now - request.arrival_time)
        else:
            ITL_SECONDS.observe(now - request.last_token_time)
        request.last_token_time = now
        GENERATED_TOKENS.inc()
        detok = request.detokenizer
        special = detok.is_special(token.token_id)
        text = detok.special_text(token.token_id) if special else detok.add(token.token_id)
        info = TokenInfo(token.token_id, text, token.logprob, special, token.alternatives)
        reason = self._finish_reason(request, token.token_id, text)
        if reason is None:
            request.sink(RequestEvent(token=info))
        else:
            request.finish(reason, token=info)

    def _finish_reason(self, request: Request, token_id: int, delta: str) -> Optional[FinishReason]:
        if token_id in self.eos_token_ids and not request.stop.ignore_eos:
            return FinishReason.EOS
        if request.guide is not None and request.guide.finished:
            return FinishReason.EOS  # the JSON is complete and nothing may follow it
        if delta and _matches_stop(request.output_text, delta, request.stop.stop_sequences):
            return FinishReason.STOP
        if request.num_generated >= request.stop.max_new_tokens:
            return FinishReason.LENGTH
        return None

    def _retire(self) -> None:
        done = self.scheduler.finished_or_cancelled()
        for request in done:
            request.finish(FinishReason.CANCELLED)  # no-op for requests that already finished
        self.scheduler.retire(done)

    def _fail_all(self, message: str) -> None:
        for request in (*self.scheduler.running, *self.scheduler.waiting):
            request.finish(FinishReason.ERROR, message)
        try:
            while True:
                item = self._inbox.get_nowait()
                if isinstance(item, Request):
                    item.finish(FinishReason.ERROR, message)
        except queue.Empty:
            pass


class ForwardTimer:
    """CUDA: the GPU time of each step's forward pass, from events recorded around it and read once
    the step has waited for its logits (no sync of its own). Nothing on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.enabled = device.type == "cuda"
        if self.enabled:
            self.start, self.stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def begin(self) -> None:
        if self.enabled:
            self.start.record()

    def end(self) -> None:
        if self.enabled:
            self.stop.record()

    def observe(self, kind: str) -> None:
        if self.enabled and self.stop.query():
            STEP_DEVICE_SECONDS.labels(kind).observe(self.start.elapsed_time(self.stop) / 1000)


def _matches_stop(text: str, delta: str, stops: tuple[str, ...]) -> bool:
    """True if a stop sequence ends inside the newest `delta` (matched on text, across tokens)."""
    return any(stop in text[-(len(stop) + len(delta) - 1) :] for stop in stops if stop)
