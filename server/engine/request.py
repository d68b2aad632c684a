"""The request object: everything one generation owns, from prompt ids to its stop state.

The HTTP layer builds a Request from validated parameters; the engine thread mutates it; events
flow back through `sink`, a thread-safe callable supplied by the async client.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Optional, Protocol

import torch

from server.adapters.weights import AdapterWeights
from server.engine.detokenizer import IncrementalDetokenizer
from server.metrics import GENERATIONS, adapter_label

_ids = itertools.count()


class RequestStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, Enum):
    LENGTH = "length"
    EOS = "eos_token"
    STOP = "stop_sequence"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    do_sample: bool = False
    seed: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


@dataclass(frozen=True)
class StopCriteria:
    max_new_tokens: int
    stop_sequences: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class OutputOptions:
    """What a request wants reported beyond its tokens."""

    top_alternatives: int = 0  # the k most likely tokens at each step (return_k_alternatives)
    prefill_logprobs: bool = False  # log-probs of the prompt tokens (decoder_input_details)


@dataclass(frozen=True)
class Alternative:
    id: int
    logprob: float


@dataclass(frozen=True)
class TokenInfo:
    id: int
    text: str
    logprob: float
    special: bool
    alternatives: tuple[Alternative, ...] = ()


@dataclass(frozen=True)
class RequestEvent:
    """One token (with its text delta), the final state, or an error, sent to the HTTP side."""

    token: Optional[TokenInfo] = None
    finish_reason: Optional[FinishReason] = None
    error: Optional[str] = None
    error_type: str = "generation"  # server.errors' error_type: "overloaded" for a queue timeout


LogitsProcessor = Callable[[torch.Tensor, "Request"], torch.Tensor]  # ([vocab], request) -> [vocab]


class TokenGuide(Protocol):
    """Grammar state of a constrained request (server.structured.guide.GrammarGuide)."""

    def mask(self, logits: torch.Tensor) -> torch.Tensor: ...  # [vocab] -> [vocab], forbidden at -inf

    def advance(self, token_id: int) -> None: ...

    @property
    def finished(self) -> bool: ...


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    stop: StopCriteria
    detokenizer: IncrementalDetokenizer
    sink: Callable[[RequestEvent], None]
    adapter: Optional[AdapterWeights] = None  # None: the base model
    processors: list[LogitsProcessor] = field(default_factory=list)
    options: OutputOptions = field(default_factory=OutputOptions)
    guide: Optional[TokenGuide] = None
    id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    prefill_logprobs: list[Optional[float]] = field(default_factory=list)  # filled at prefill if asked
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: Optional[FinishReason] = None
    slot: Optional[int] = None  # dense KV cache: the sequence's slot
    block_table: list[int] = field(default_factory=list)  # paged KV cache: the blocks holding its tokens
    admitted_seq: int = -1  # admission order: the newest running request is preempted first
    num_computed_tokens: int = 0  # tokens whose KV is in the cache (from the prefix cache at admission, then computed)
    prefix_hashes: list[bytes] = field(default_factory=list)  # paged: keys of its full blocks, computed once
    registered_blocks: int = 0  # paged: leading blocks already offered to the prefix cache
    generator: Optional[torch.Generator] = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    cancel_requested: bool = False

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_generated(self) -> int:
        return len(self.output_ids)

    @property
    def total_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_generated

    @property
    def pending_tokens(self) -> int:
        """Tokens to feed before the next one can be sampled: 1 in decode, more while (re)prefilling."""
        return self.total_tokens - self.num_computed_tokens

    @property
    def scores_prompt(self) -> bool:
        """Prompt log-probs are read off its first prefill, which is therefore fed whole (not again
        when its cache is recomputed)."""
        return self.options.prefill_logprobs and not self.output_ids

    @property
    def is_prefilling(self) -> bool:
        return not self.output_ids or self.pending_tokens > 1

    @property
    def max_total_tokens(self) -> int:
        """Tokens this request may ever hold in the KV cache: its reservation in the batch budget."""
        return self.num_prompt_tokens + self.stop.max_new_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def output_text(self) -> str:
        return self.detokenizer.text

    def finish(self, reason: FinishReason, error: Optional[str] = None, token: Optional[TokenInfo] = None,
               error_type: str = "generation") -> None:
        """Mark finished and send the last event (carrying the final token, if one ended it)."""
        if self.is_finished:
            return
        self.status, self.finish_reason = RequestStatus.FINISHED, reason
        GENERATIONS.labels(adapter_label(self.adapter), reason.value).inc()
        self.sink(RequestEvent(token=token, finish_reason=reason, error=error, error_type=error_type))
