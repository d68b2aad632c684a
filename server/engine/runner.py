"""Executes a BatchPlan on the model: builds the ragged ForwardBatch and returns next-token logits.

Knows tensors and the KV cache; knows nothing of HTTP, queues or sampling.
"""

from __future__ import annotations

import torch

from server.adapters.lora import ResidentAdapters
from server.engine.cuda_graphs import DecodeGraphs
from server.engine.kv_cache import KVCache
from server.engine.scheduler import BatchPlan
from server.model.decoder import CausalLM, ForwardBatch


class ModelRunner:
    def __init__(self, model: CausalLM, kv: KVCache, adapters: ResidentAdapters, device: torch.device,
                 graphs: DecodeGraphs | None = None) -> None:
        self.model, self.kv, self.adapters, self.device = model, kv, adapters, device
        self.graphs = graphs  # CUDA only: decode steps replayed from captured graphs

    @torch.no_grad()
    def run(self, plan: BatchPlan) -> torch.Tensor:
        """Returns logits [len(plan.rows), vocab] (float32): each request's for its last fed token,
        then each twin's (a copy of its leader's)."""
        batch = self.build_batch(plan)
        self.kv.ensure_capacity(max(batch.context_lens))
        if plan.is_decode and self.graphs is not None:
            logits = self.graphs.run(batch)
            if logits is not None:
                return logits
        if plan.is_decode:
            return self.model(batch, self.kv)
        if not any(r.scores_prompt for r in plan.requests):
            return self._give_twins(plan, self.model(batch, self.kv))
        return self._give_twins(plan, self._run_with_prompt_logprobs(plan, batch))

    def _give_twins(self, plan: BatchPlan, logits: torch.Tensor) -> torch.Tensor:
        """Each twin's prompt tail (past the blocks it shares) copied from its leader's blocks, and
        its own copy of the leader's logits row (sampling masks and penalties work rows in place)."""
        if not plan.twins:
            return logits
        leaders = [plan.requests[t.leader_row] for t in plan.twins]
        self.kv.copy_tokens([(leader, t.request, t.request.num_computed_tokens, leader.total_tokens)
                             for leader, t in zip(leaders, plan.twins)])
        rows = torch.tensor([t.leader_row for t in plan.twins], device=logits.device)
        return torch.cat([logits, logits.index_select(0, rows)])

    def _run_with_prompt_logprobs(self, plan: BatchPlan, batch: ForwardBatch) -> torch.Tensor:
        """Prefill that also scores every prompt token of the requests that asked for it."""
        ends = batch.last_token_rows.tolist()
        spans = [range(end - n + 1, end + 1) if r.scores_prompt else range(end, end + 1)
                 for r, n, end in zip(plan.requests, batch.query_lens, ends)]
        batch.logit_rows = torch.tensor([i for span in spans for i in span], device=self.device)
        logits = self.model(batch, self.kv)  # [sum(len(span)), vocab]
        last, start = [], 0
        for request, span in zip(plan.requests, spans):
            rows = logits[start : start + len(span)]
            if request.scores_prompt:
                request.prefill_logprobs = score_prompt(rows[:-1], request.prompt_ids)
            last.append(rows[-1])
            start += len(span)
        return torch.stack(last)

    def build_batch(self, plan: BatchPlan) -> ForwardBatch:
        """Each request feeds its next `tokens_fed` tokens from the first one not in the cache: its
        last token in decode; a chunk of its prompt (less any prefix-cache hit), or of prompt and
        output when its cache is recomputed, while prefilling. Decoding rows come first."""
        requests, fed = plan.requests, plan.tokens_fed
        starts = [r.num_computed_tokens for r in requests]
        ids = [t for r, s, n in zip(requests, starts, fed) for t in r.all_token_ids[s : s + n]]
        positions = [p for s, n in zip(starts, fed) for p in range(s, s + n)]
        context_lens = [s + n for s, n in zip(starts, fed)]
        slots = [r.slot if r.slot is not None else -1 for r in requests]
        decode_rows = plan.num_decode_rows
        attend_len = max(context_lens[:decode_rows], default=0)
        return ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long, device=self.device),
            positions=torch.tensor(positions, dtype=torch.long, device=self.device),
            slots=torch.tensor(slots, dtype=torch.long, device=self.device),
            query_lens=list(fed),
            context_lens=context_lens,
            is_decode=plan.is_decode,
            lora=self.adapters.batch_for([r.adapter for r in requests], list(fed)),
            dense_slots=plan.is_decode and slots == list(range(len(slots))),
            kv_lens=torch.tensor(context_lens[:decode_rows], device=self.device) if decode_rows else None,
            attend_len=attend_len,
            num_decode_rows=decode_rows,
            kv_index=self.kv.index(requests, list(fed), context_lens, decode_rows, attend_len),
        )


def score_prompt(logits: torch.Tensor, prompt_ids: list[int]) -> list[float | None]:
    """logits: [prompt_len - 1, vocab], row i predicting prompt token i + 1. The first token has none."""
    targets = torch.tensor(prompt_ids[1:], device=logits.device)
    scores = logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    return [None, *scores.tolist()]
