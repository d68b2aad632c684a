"""Decode steps replayed from CUDA graphs: one capture per batch-size bucket.

On a GPU an eager decode step is bound by the host launching ~25 kernels per layer (an 8B model:
30 ms per step against a 5 ms memory-bandwidth floor, measured on an H100); a replayed graph is one
launch. A graph fixes shapes and addresses, so a graphed step pads its rows to the bucket (padding
rows use the free KV slots above the batch, which dense slots guarantee), attends over the whole
cache capacity under a mask, and applies LoRA with the Triton kernels, each row's packed columns
refilled in device buffers before a replay (without Triton: over every packed column under a
per-row mask). Graphs are dropped whenever the KV cache or the packed LoRA buffers are reallocated.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from server.adapters.lora import LoraBatch, MaskedWindow, ResidentAdapters, SortedTiles
from server.engine.kv_cache import KVCache
from server.model.decoder import CausalLM, ForwardBatch

log = logging.getLogger(__name__)

_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MIN_TILE_SLOTS = 4  # the fewest LoRA tile slots a graph launches (fewer graphs for small mixes)


@dataclass
class GraphedStep:
    batch: ForwardBatch  # the static input buffers the graph reads
    lora_mask: Optional[torch.Tensor]  # [bucket, packed columns]: the masked window's (no Triton)
    graph: Optional[torch.cuda.CUDAGraph] = None
    logits: Optional[torch.Tensor] = None  # [bucket, vocab], written by every replay


class DecodeGraphs:
    """Captures lazily, on the first decode step of each (bucket, with LoRA or not)."""

    def __init__(self, model: CausalLM, kv: KVCache, adapters: ResidentAdapters, max_batch: int) -> None:
        self.model, self.kv, self.adapters = model, kv, adapters
        self.buckets = tuple(b for b in _BUCKETS if b < min(max_batch, kv.max_slots)) + (min(max_batch, kv.max_slots),)
        self.steps: dict[tuple[int, int, int], GraphedStep] = {}  # (bucket, LoRA tile, tile slots) -> graph
        self.last: Optional[GraphedStep] = None  # the step replayed last (bench/gpu_decode.py times it alone)
        self.pool = torch.cuda.graph_pool_handle()
        self._shapes = (-1, -1)  # (KV capacity, packed LoRA columns) the graphs were captured for

    def run(self, batch: ForwardBatch) -> Optional[torch.Tensor]:
        """Logits [seqs, vocab] from a replayed graph, or None when this step can't be graphed."""
        seqs = batch.slots.shape[0]
        if not batch.dense_slots or batch.logit_rows is not None or seqs > self.buckets[-1]:
            return None
        if self._shapes != (self.kv.capacity, self.adapters.capacity):
            self.steps.clear()  # the buffers the graphs point at were reallocated
            self.pool = torch.cuda.graph_pool_handle()  # the old pool dies with its last graph
            self._shapes = (self.kv.capacity, self.adapters.capacity)
        bucket = next(b for b in self.buckets if b >= seqs)
        key = (bucket, *self._lora_key(batch.lora, bucket))
        step = self.steps.get(key)
        if step is None:
            step = self._capture(key, batch, seqs)
        else:
            self._fill(step, batch, seqs)
        step.graph.replay()
        self.last = step
        return step.logits[:seqs]

    @staticmethod
    def _lora_key(lora: Optional[LoraBatch], bucket: int) -> tuple[int, int]:
        """The LoRA part of a graph's key: (0, 0) without LoRA, (1, 0) for the masked window; for the
        Triton kernels their rank tile and tile slots: the step's tiles rounded up to a power of two
        (at least 4), as every slot is launched (16 adapters over 64 rows: 16 slots, not 64)."""
        if lora is None:
            return 0, 0
        if not isinstance(lora, SortedTiles):
            return 1, 0
        return lora.rank_tile, min(bucket, max(MIN_TILE_SLOTS, 1 << (max(lora.tiles_used, 1) - 1).bit_length()))

    def _static_lora(self, bucket: int, tile: int, slots: int) -> tuple[Optional[LoraBatch], Optional[torch.Tensor]]:
        """The LoRA plan a graph captures, over static buffers: rows' columns, or a window's mask."""
        device = self.kv.device
        if tile == 0:
            return None, None
        if tile > 1:
            columns = torch.zeros(5, bucket, dtype=torch.int32, device=device)
            return SortedTiles((), (), columns, tile, slots), None
        mask = torch.zeros(bucket, self.adapters.capacity, device=device, dtype=self.kv.dtype)
        return MaskedWindow((), (), 0, self.adapters.capacity, mask), mask

    def _static_batch(self, bucket: int, tile: int, slots: int) -> tuple[ForwardBatch, Optional[torch.Tensor]]:
        device = self.kv.device
        lora, mask = self._static_lora(bucket, tile, slots)
        batch = ForwardBatch(
            input_ids=torch.zeros(bucket, dtype=torch.long, device=device),
            positions=torch.zeros(bucket, dtype=torch.long, device=device),
            slots=torch.arange(bucket, device=device),
            query_lens=[1] * bucket,
            context_lens=[1] * bucket,
            is_decode=True,
            lora=lora,
            dense_slots=True,
            kv_lens=torch.ones(bucket, dtype=torch.long, device=device),
            attend_len=self.kv.capacity,
        )
        return batch, mask

    def _capture(self, key: tuple[int, int, int], batch: ForwardBatch, seqs: int) -> GraphedStep:
        """Capture with this step's own rows in the buffers: the warm-up passes really run, and so
        write exactly the KV entries this step's replay writes (padding rows: free slots only)."""
        bucket, tile, slots = key
        step = GraphedStep(*self._static_batch(bucket, tile, slots))
        self._fill(step, batch, seqs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up passes allocate workspaces outside the graph
            for _ in range(2):
                self.model(step.batch, self.kv)
        torch.cuda.current_stream().wait_stream(side)
        step.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(step.graph, pool=self.pool, capture_error_mode="thread_local"):
            step.logits = self.model(step.batch, self.kv)
        log.info("captured a decode CUDA graph: %d rows, LoRA %s, KV capacity %d", bucket,
                 {0: "none", 1: "masked window"}.get(tile, f"rank tile {tile}, {slots} tile slots"), self.kv.capacity)
        self.steps[key] = step
        return step

    @staticmethod
    def _fill(step: GraphedStep, batch: ForwardBatch, seqs: int) -> None:
        """Copy this step's rows into the static buffers; padding rows decode token 0 at position 0."""
        static = step.batch
        static.input_ids[:seqs].copy_(batch.input_ids)
        static.positions[:seqs].copy_(batch.positions)
        static.kv_lens[:seqs].copy_(batch.kv_lens)
        static.input_ids[seqs:].zero_()
        static.positions[seqs:].zero_()
        static.kv_lens[seqs:].fill_(1)
        lora: Optional[LoraBatch] = batch.lora
        if step.lora_mask is not None:
            step.lora_mask.zero_()
            step.lora_mask[:seqs].copy_(lora.dense_mask(step.lora_mask.shape[1], step.lora_mask.dtype))
        elif isinstance(static.lora, SortedTiles):  # the tile slots past this step's: width 0, unused
            static.lora.columns[:, :seqs].copy_(lora.columns)
            static.lora.columns[:, seqs:].zero_()
