"""The asyncio face of the engine: validate and admit a request, then stream its events.

Validation and admission happen synchronously in `submit`, so an HTTP route can still answer
422/429 before it commits to a 200 stream (and `RequestHandle.wait_started` lets it wait for the
first token, so a queue timeout is a 429 too). Every limit a single request can break is checked here.
"""

from __future__ import annotations

import asyncio
import random
import threading
import weakref
from concurrent.futures import Future
from dataclasses import dataclass
from typing import AsyncIterator, Optional

import torch

from server.adapters.merge import MergeSpec
from server.adapters.store import AdapterStore
from server.adapters.weights import AdapterKey, AdapterWeights
from server.config import Limits
from server.engine.detokenizer import IncrementalDetokenizer, text_decoder
from server.engine.engine import Engine
from server.engine.request import (
    FinishReason,
    LogitsProcessor,
    OutputOptions,
    Request,
    RequestEvent,
    SamplingParams,
    StopCriteria,
    TokenInfo,
)
from server.errors import GenerationError, OverloadedError, UnavailableError, ValidationError, error_of_type
from server.metrics import REJECTED
from server.model.loader import LoadedModel
from server.structured.guide import GrammarGuide, GuideFactory, constraint_of


@dataclass(frozen=True)
class GenerationInput:
    """A validated, API-independent generation request."""

    prompt: str
    params: SamplingParams
    max_new_tokens: Optional[int] = None  # None: the rest of max_total_tokens
    stop_sequences: tuple[str, ...] = ()
    ignore_eos: bool = False
    truncate: Optional[int] = None
    adapter_id: Optional[str] = None  # None or "": the base model
    adapter_source: Optional[str] = None  # pbase (default) | local | hub | s3
    merged_adapters: Optional[dict] = None  # LoRAX's {ids, weights, merge_strategy, density, ...}
    options: OutputOptions = OutputOptions()
    add_special_tokens: bool = True  # False for chat-template text, which carries its own BOS
    response_format: Optional[dict] = None  # json_object / json_schema / regex / choice / grammar: constrained
    processors: tuple[LogitsProcessor, ...] = ()


class RequestHandle:
    """An admitted request: iterate for its events; leaving the loop early cancels it."""

    def __init__(self, request: Request, events: asyncio.Queue, engine: "AsyncEngine") -> None:
        self.request, self._events, self._engine = request, events, engine
        self._first: Optional[RequestEvent] = None  # taken by wait_started, replayed by iteration

    async def __aiter__(self) -> AsyncIterator[RequestEvent]:
        try:
            while True:
                event, self._first = self._first or await self._events.get(), None
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            self.close()

    async def wait_started(self) -> None:
        """Wait for the first event (a token, or an error) and raise the error, if it is one, as a
        ServingError: a stream can then still answer 429/424 instead of a 200 that carries an error."""
        try:
            self._first = await self._events.get()
        except BaseException:  # cancelled: the client went away
            self.close()
            raise
        if self._first.error is not None:
            self.close()
            raise error_of_type(self._first.error_type, self._first.error)

    def close(self) -> None:
        self._engine._release(self.request)

    async def result(self) -> tuple[list[TokenInfo], FinishReason]:
        """Run to the end: every token, and the finish reason; GenerationError if it failed."""
        tokens: list[TokenInfo] = []
        async for event in self:
            if event.token is not None:
                tokens.append(event.token)
            if event.error is not None:
                raise error_of_type(event.error_type, event.error)
            if event.finish_reason is not None:
                return tokens, event.finish_reason
        raise GenerationError("request ended without a result")


class AsyncEngine:
    def __init__(self, engine: Engine, loaded: LoadedModel, limits: Limits, store: AdapterStore,
                 guides: GuideFactory) -> None:
        self.engine, self.loaded, self.limits, self.store, self.guides = engine, loaded, limits, store, guides
        self._decoder = text_decoder(loaded.tokenizer)  # (decodes each token's text on the engine thread)
        self._in_flight: set[Request] = set()
        self._preparing = 0  # admitted, still awaiting an adapter load or a schema compile
        self._arriving_cold = 0  # of those, the ones whose adapter was not loaded yet

    @property
    def in_flight(self) -> int:
        """Accepted requests not finished yet (one that finished unread no longer holds a place)."""
        return sum(not r.is_finished for r in list(self._in_flight))

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.loaded.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def token_text(self, token_id: int) -> str:
        return self.loaded.tokenizer.decode([token_id], skip_special_tokens=False)

    async def submit(self, inp: GenerationInput) -> RequestHandle:
        """Validate, admit, load the adapter, queue. Raises ValidationError, OverloadedError,
        UnavailableError, or GenerationError (424) when the adapter can't be loaded."""
        if not self.engine.alive:
            raise UnavailableError("the engine is not running")
        self._check_stop_sequences(inp.stop_sequences)
        prompt_ids = self._prompt_ids(inp)
        max_new = self._max_new_tokens(inp, len(prompt_ids))
        self._in_flight = {r for r in self._in_flight if not r.is_finished}
        if len(self._in_flight) + self._preparing >= self.limits.max_concurrent_requests:
            REJECTED.labels("max_concurrent_requests").inc()
            raise OverloadedError(
                f"server is at max_concurrent_requests ({self.limits.max_concurrent_requests}); retry later"
            )
        self._preparing += 1  # holds its place while the adapter loads and the schema compiles
        cold = False
        try:
            loading = self._adapter_future(inp.adapter_id, inp.adapter_source, inp.merged_adapters)
            cold = loading is not None and not loading.done()
            self._arriving_cold += cold
            adapter = await _shielded(loading) if loading is not None else None
            if adapter is not None and not self.engine.scheduler.adapters.can_ever_hold(adapter):
                raise GenerationError(
                    f"adapter {adapter.key} needs {self.engine.scheduler.adapters.bytes_of(adapter) >> 20} MiB on "
                    f"the device, more than max_adapter_memory_mb ({self.limits.max_adapter_memory_mb})"
                )
            guide = await self.guide(inp.response_format)
            request, events = self._request(inp, prompt_ids, max_new, adapter, guide)
            self._in_flight.add(request)
            self.engine.submit(request)  # in the engine's inbox before it stops counting as arriving
        finally:
            self._preparing -= 1
            self._arriving_cold -= cold
        return RequestHandle(request, events, self)

    def _request(self, inp: GenerationInput, prompt_ids: list[int], max_new: int,
                 adapter: Optional[AdapterWeights],
                 guide: Optional[GrammarGuide]) -> tuple[Request, asyncio.Queue[RequestEvent]]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[RequestEvent] = asyncio.Queue()
        request = Request(
            prompt_ids=prompt_ids,
            params=inp.params,
            stop=StopCriteria(max_new, inp.stop_sequences, inp.ignore_eos),
            detokenizer=IncrementalDetokenizer(self._decoder, prompt_ids, self.loaded.special_token_ids),
            sink=_threadsafe_sink(_mailbox(loop), events),
            adapter=adapter,
            processors=list(inp.processors),
            options=inp.options,
            guide=guide,
            generator=_generator(inp.params, self.loaded.device),
        )
        return request, events

    async def guide(self, response_format: Optional[dict]) -> Optional[GrammarGuide]:
        """A fresh grammar state for a constrained request, compiled off the engine loop."""
        constraint = constraint_of(response_format)
        if constraint is None:
            return None
        return await _shielded(self.guides.guide_for(constraint))

    async def adapter(self, adapter_id: Optional[str], source: Optional[str],
                      merged: Optional[dict] = None) -> Optional[AdapterWeights]:
        """The adapter's weights, loaded off the engine loop (None for the base model)."""
        loading = self._adapter_future(adapter_id, source, merged)
        return await _shielded(loading) if loading is not None else None

    def _adapter_future(self, adapter_id: Optional[str], source: Optional[str],
                        merged: Optional[dict]) -> Optional[Future]:
        if merged:
            if adapter_id:
                raise ValidationError("give either adapter_id or merged_adapters, not both")
            return self.store.get_merged(MergeSpec.parse(merged, source))
        if not adapter_id or adapter_id == self.loaded.name:
            return None
        return self.store.get(self.store.key_for(adapter_id, source))

    def loads_ahead(self) -> bool:
        """Requests are waiting for adapter loads, none of them on a download: reads from disk take
        tens of milliseconds, so the engine may let them arrive before it prefills."""
        return self._arriving_cold > 0 and self.store.downloading() == 0

    def unload_adapter(self, key: AdapterKey) -> bool:
        """Drop an adapter from the CPU tier now and from the device once no running request uses
        it (requests already holding it finish normally); whether it was in the CPU tier."""
        was_loaded = self.store.unload(key)
        self.engine.call_soon(lambda: self.engine.scheduler.evict_idle(key))
        return was_loaded

    def reserve_cpu_threads(self, reserved: int) -> None:
        """Leave `reserved` of the engine's CPU threads to other work (0 gives them back), from its
        next step on (server.engine.cpu_threads). A fine-tune on the same cores is why: more
        threads than free cores makes every step wait on a descheduled one (measured 50x slower
        inter-token latency)."""
        self.engine.cpu.reserved = reserved
        self.engine.call_soon(lambda: None)  # wakes an idle loop, which applies it before its next step

    def _release(self, request: Request) -> None:
        if not request.is_finished:
            self.engine.cancel(request)
        self._in_flight.discard(request)

    def _check_stop_sequences(self, stops: tuple[str, ...]) -> None:
        longest = max(map(len, stops), default=0)
        if longest > self.limits.max_stop_sequence_length:
            raise ValidationError(
                f"each stop sequence must be at most {self.limits.max_stop_sequence_length} characters. "
                f"Given: one of {longest}"
            )

    def _prompt_ids(self, inp: GenerationInput) -> list[int]:
        if not inp.prompt:
            raise ValidationError("`inputs` must not be empty")
        ids = self.tokenize(inp.prompt, inp.add_special_tokens)
        if inp.truncate is not None:
            ids = ids[-inp.truncate :]
        if len(ids) > self.limits.max_input_length:
            raise ValidationError(
                f"`inputs` must have less than {self.limits.max_input_length} tokens. "
                f"Given: {len(ids)}"
            )
        return ids

    def _max_new_tokens(self, inp: GenerationInput, prompt_len: int) -> int:
        room = self.limits.max_total_tokens - prompt_len
        if inp.max_new_tokens is None:
            return room
        if inp.max_new_tokens > room:
            raise ValidationError(
                f"`inputs` tokens + `max_new_tokens` must be <= {self.limits.max_total_tokens}. "
                f"Given: {prompt_len} `inputs` tokens and {inp.max_new_tokens} `max_new_tokens`"
            )
        return inp.max_new_tokens


async def _shielded(future: Future):
    """Await a worker's Future without cancelling it when this request is cancelled (its client went
    away): an adapter load is shared with every other request that waits for the same adapter."""
    return await asyncio.shield(asyncio.wrap_future(future))


class Mailbox:
    """Events from the engine thread to one event loop's requests, handed over in bursts: the first
    event since the loop last emptied the box wakes it (one `call_soon_threadsafe`, whose write to
    the loop's self-pipe is a syscall), the rest of a step's events join that delivery. One wake-up
    per token of every stream cost the engine thread ~14 us each, 10 of them the syscall: ~0.9 ms of
    host work a step at 64 streams, with the GPU idle (cProfile of the engine thread)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._pending: list[tuple[asyncio.Queue, RequestEvent]] = []
        self._lock = threading.Lock()

    def post(self, events: asyncio.Queue, event: RequestEvent) -> None:
        with self._lock:
            self._pending.append((events, event))
            wake = len(self._pending) == 1
        if wake:
            try:
                self.loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                with self._lock:
                    self._pending.clear()

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for events, event in pending:
            events.put_nowait(event)


_MAILBOXES: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox]" = weakref.WeakKeyDictionary()
_MAILBOXES_LOCK = threading.Lock()


def _mailbox(loop: asyncio.AbstractEventLoop) -> Mailbox:
    with _MAILBOXES_LOCK:
        box = _MAILBOXES.get(loop)
        if box is None:
            box = _MAILBOXES[loop] = Mailbox(loop)
        return box


def _threadsafe_sink(mailbox: Mailbox, events: asyncio.Queue):
    def sink(event: RequestEvent) -> None:
        mailbox.post(events, event)

    return sink


def _generator(params: SamplingParams, device: torch.device) -> Optional[torch.Generator]:
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed if params.seed is not None else random.randrange(2**63))
    return generator


def resolved_seed(request: Request) -> Optional[int]:
    return None if request.generator is None else request.generator.initial_seed()


__all__ = ["AsyncEngine", "GenerationInput", "RequestHandle", "FinishReason", "resolved_seed"]
