"""Executes a BatchPlan on the model: builds the ragged ForwardBatch and returns next-token logits.

Knows tensors and the KV cache; knows nothing of HTTP, queues or sampling.
"""

from __future__ import annotations

import torch

from server.adapters.lora import ResidentAdapters
from server.engine.cuda_graphs import DecodeGraphs
from server.engine.kv_cache import KVCache
from server.engine.scheduler import BatchPlan, StepKind
from server.model.decoder import CausalLM, ForwardBatch


class ModelRunner:
    def __init__(self, model: CausalLM, kv: KVCache, adapters: ResidentAdapters, device: torch.device,
                 graphs: DecodeGraphs | None = None) -> None:
        self.model, self.kv, self.adapters, self.device = model, kv, adapters, device
        self.graphs = graphs  # CUDA only: decode steps replayed from captured graphs

    @torch.no_grad()
    def run(self, plan: BatchPlan) -> torch.Tensor:
        """Returns logits [len(plan.requests), vocab] (float32) for each request's next token."""
        if plan.is_decode and any(self.model.recomputes_at(r.total_tokens) for r in plan.requests):
            return self._decode_with_recompute(plan)
        batch = self.build_batch(plan)
        self.kv.ensure_capacity(max(batch.context_lens))
        if plan.is_decode and self.graphs is not None:
            logits = self.graphs.run(batch)
            if logits is not None:
                return logits
        if plan.is_decode or not any(_scores_prompt(r) for r in plan.requests):
            return self.model(batch, self.kv)
        return self._run_with_prompt_logprobs(plan, batch)

    def _decode_with_recompute(self, plan: BatchPlan) -> torch.Tensor:
        """A decode step in which some sequences cross a point where transformers recomputes their
        whole KV cache (Phi-3 longrope: past the original context every key takes the long
        factors). Those rows are re-prefilled from their first token; the rest decode as usual."""
        redo = [self.model.recomputes_at(r.total_tokens) for r in plan.requests]
        logits: list[torch.Tensor] = [None] * len(plan.requests)  # type: ignore[list-item]
        for again in (False, True):
            rows = [i for i, flag in enumerate(redo) if flag is again]
            if not rows:
                continue
            sub = BatchPlan(StepKind.DECODE, tuple(plan.requests[i] for i in rows))
            batch = self.build_batch(sub, whole_sequences=again)
            self.kv.ensure_capacity(max(batch.context_lens))
            for i, row in zip(rows, self.model(batch, self.kv)):
                logits[i] = row
        return torch.stack(logits)

    def _run_with_prompt_logprobs(self, plan: BatchPlan, batch: ForwardBatch) -> torch.Tensor:
        """Prefill that also scores every prompt token of the requests that asked for it."""
        ends = batch.last_token_rows.tolist()
        spans = [range(end - n + 1, end + 1) if _scores_prompt(r) else range(end, end + 1)
                 for r, n, end in zip(plan.requests, batch.query_lens, ends)]
        batch.logit_rows = torch.tensor([i for span in spans for i in span], device=self.device)
        logits = self.model(batch, self.kv)  # [sum(len(span)), vocab]
        last, start = [], 0
        for request, span in zip(plan.requests, spans):
            rows = logits[start : start + len(span)]
            if _scores_prompt(request):
                request.prefill_logprobs = score_prompt(rows[:-1], request.prompt_ids)
            last.append(rows[-1])
            start += len(span)
        return torch.stack(last)

    def build_batch(self, plan: BatchPlan, whole_sequences: bool = False) -> ForwardBatch:
        """A prefill feeds every token a request has that is not cached yet (its prompt, less a
        prefix-cache hit; prompt and output when its cache is recomputed after a preemption; all of
        them, with whole_sequences, at a longrope crossing); a decode step feeds each request's last token."""
        requests = plan.requests
        is_decode = plan.is_decode and not whole_sequences
        if is_decode:
            ids = [r.all_token_ids[-1] for r in requests]
            positions = [r.total_tokens - 1 for r in requests]
            query_lens = [1] * len(requests)
        else:  # from the first token not in the cache (a prefix-cache hit leaves fewer to compute)
            starts = [0 if whole_sequences else r.num_cached_tokens for r in requests]
            ids = [t for r, start in zip(requests, starts) for t in r.all_token_ids[start:]]
            positions = [p for r, start in zip(requests, starts) for p in range(start, r.total_tokens)]
            query_lens = [r.total_tokens - start for r, start in zip(requests, starts)]
        slots = [r.slot if r.slot is not None else -1 for r in requests]
        context_lens = [r.total_tokens for r in requests]
        return ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long, device=self.device),
            positions=torch.tensor(positions, dtype=torch.long, device=self.device),
            slots=torch.tensor(slots, dtype=torch.long, device=self.device),
            query_lens=query_lens,
            context_lens=context_lens,
            is_decode=is_decode,
            lora=self.adapters.batch_for([r.adapter for r in requests], query_lens),
            dense_slots=is_decode and slots == list(range(len(slots))),
            kv_lens=torch.tensor(context_lens, device=self.device) if plan.is_decode else None,
            attend_len=max(context_lens),
            kv_index=self.kv.index(requests, query_lens, is_decode, max(context_lens)),
        )


def _scores_prompt(request) -> bool:
    """Prompt log-probs are computed at the first prefill only (not again when recomputed)."""
    return request.options.prefill_logprobs and not request.output_ids


def score_prompt(logits: torch.Tensor, prompt_ids: list[int]) -> list[float | None]:
    """logits: [prompt_len - 1, vocab], row i predicting prompt token i + 1. The first token has none."""
    targets = torch.tensor(prompt_ids[1:], device=logits.device)
    scores = logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    return [None, *scores.tolist()]
