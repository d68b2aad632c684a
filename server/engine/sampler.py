"""Choosing the next token of every row: penalties, per-request processors, warpers, sampling.

Pure functions over logits rows. Greedy rows without penalties or processors take a batched
fast path; the rest are handled row by row so one row's failure is that row's alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from server.engine.request import Alternative, Request, SamplingParams
from server.kernels.native import greedy_kernel


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float
    alternatives: tuple[Alternative, ...] = ()


def apply_penalties(
    logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int]
) -> torch.Tensor:
    """logits: [vocab]. Repetition penalty (CTRL/HF style) over prompt+output; OpenAI-style
    frequency and presence penalties over generated tokens only."""
    logits = logits.clone()
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long, device=logits.device)
        values = logits[seen]
        penalised = torch.where(values < 0, values * params.repetition_penalty, values / params.repetition_penalty)
        logits[seen] = penalised
    if output_ids and (params.frequency_penalty or params.presence_penalty):
        counts = torch.bincount(torch.tensor(output_ids, device=logits.device), minlength=logits.shape[-1])
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    return logits


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p and typical-p filtering of one row of logits ([vocab])."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= params.top_p  # always keeps the top token
        logits = logits.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    if params.typical_p < 1.0:
        logits = _typical_filter(logits, params.typical_p)
    return logits


def _typical_filter(logits: torch.Tensor, mass: float) -> torch.Tensor:
    log_probs = logits.log_softmax(-1)
    probs = log_probs.exp()
    entropy = -(torch.nan_to_num(probs * log_probs)).sum()
    surprise_gap = (-log_probs - entropy).abs()
    order = surprise_gap.argsort()
    cumulative = probs[order].cumsum(-1)
    keep_count = int((cumulative < mass).sum().item()) + 1
    drop = torch.ones_like(logits, dtype=torch.bool)
    drop[order[:keep_count]] = False
    return logits.masked_fill(drop, float("-inf"))


def sample_row(logits: torch.Tensor, request: Request) -> SampledToken:
    """logits: [vocab] float32 for one request (a constrained one's arrive masked: Engine._advance)."""
    params = request.params
    if params.has_penalties:
        logits = apply_penalties(logits, params, request.prompt_ids, request.output_ids)
    for processor in request.processors:
        logits = processor(logits, request)
    if params.greedy:
        log_probs = logits.log_softmax(-1)
        token = int(torch.argmax(logits))
    else:
        log_probs = warp(logits, params).log_softmax(-1)
        token = int(torch.multinomial(log_probs.exp(), 1, generator=request.generator))
    return SampledToken(token, float(log_probs[token]), top_alternatives(log_probs, request.options.top_alternatives))


def top_alternatives(log_probs: torch.Tensor, k: int) -> tuple[Alternative, ...]:
    """The k most likely tokens of the final distribution ([vocab]), most likely first."""
    if k <= 0:
        return ()
    values, ids = torch.topk(log_probs, k)
    return tuple(Alternative(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist()))


def greedy_batch(logits: torch.Tensor) -> list[SampledToken]:
    """logits: [rows, vocab]. Batched argmax for plain greedy rows (greedy_cpu.c on CPU)."""
    kernel = greedy_kernel() if logits.is_cpu and logits.dtype == torch.float32 and logits.stride(-1) == 1 else None
    picked = kernel(logits) if kernel is not None else None  # (None: a NaN, which the ops below carry)
    if picked is not None:
        return [SampledToken(t, lp) for t, lp in zip(*picked)]
    best, tokens = logits.max(-1)  # [rows] each
    # The argmax's log-probability is -log(sum(exp(x - max))). Differences are clamped at -80, where
    # exp is ~1e-35, below any sum's rounding: so no exp is denormal, which x86 computes slowly (32
    # rows of wide logits: 18 ms, against 1.9 ms clamped and 2.4 ms for log_softmax + gather).
    logprobs = (logits - best[:, None]).clamp_(min=-80.0).exp_().sum(-1).log_().neg_()  # [rows]
    return [SampledToken(int(t), float(lp)) for t, lp in zip(tokens.tolist(), logprobs.tolist())]


def is_plain_greedy(request: Request) -> bool:
    return (request.params.greedy and not request.params.has_penalties and not request.processors
            and not request.options.top_alternatives)


def plain_greedy_rows(requests: Sequence[Request]) -> list[int]:
    return [i for i, r in enumerate(requests) if is_plain_greedy(r)]
