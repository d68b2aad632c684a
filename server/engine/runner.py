"""Executes a BatchPlan on the model: builds the ragged ForwardBatch and returns next-token logits.

Knows tensors and the KV cache; knows nothing of HTTP, queues or sampling.
"""

from __future__ import annotations

import torch

from server.adapters.lora import ResidentAdapters
from server.engine.kv_cache import KVCache
from server.engine.scheduler import BatchPlan
from server.model.llama import CausalLM, ForwardBatch


class ModelRunner:
    def __init__(self, model: CausalLM, kv: KVCache, adapters: ResidentAdapters, device: torch.device) -> None:
        self.model, self.kv, self.adapters, self.device = model, kv, adapters, device

    @torch.no_grad()
    def run(self, plan: BatchPlan) -> torch.Tensor:
        """Returns logits [len(plan.requests), vocab] (float32) for each request's next token."""
        batch = self.build_batch(plan)
        self.kv.ensure_capacity(max(batch.context_lens))
        return self.model(batch, self.kv)

    def build_batch(self, plan: BatchPlan) -> ForwardBatch:
        requests = plan.requests
        if plan.is_decode:
            ids = [r.output_ids[-1] if r.output_ids else r.prompt_ids[-1] for r in requests]
            positions = [r.total_tokens - 1 for r in requests]
            query_lens = [1] * len(requests)
        else:
            ids = [t for r in requests for t in r.prompt_ids]
            positions = [p for r in requests for p in range(r.num_prompt_tokens)]
            query_lens = [r.num_prompt_tokens for r in requests]
        return ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long, device=self.device),
            positions=torch.tensor(positions, dtype=torch.long, device=self.device),
            slots=torch.tensor([r.slot for r in requests], dtype=torch.long, device=self.device),
            query_lens=query_lens,
            context_lens=[r.total_tokens for r in requests],
            is_decode=plan.is_decode,
            lora=self.adapters.batch_for([r.adapter for r in requests], query_lens),
        )
