"""The KV cache, in two layouts behind one interface (the scheduler admits and frees through it,
the runner asks it where a batch's tokens go, attention reads and writes through it):

- `PagedKVCache` (the default on CPU): one pool of fixed-size blocks sized from a memory budget,
  a block table per sequence, blocks taken as sequences grow and returned when they leave (no
  copying). Admission counts the blocks a request needs now, not its worst case; when the pool runs
  out mid-decode the scheduler preempts the newest request, which is recomputed later.
- `KVCache` (dense; CUDA until a paged attention kernel lands there): one slot per running
  sequence, kept dense (running sequences occupy 0..n-1) so a decode step attends over a view and
  CUDA graphs can replay it; capacity grows on demand; admission reserves each request's worst case.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from server.kernels.elementwise import fused_kernels
from server.kernels.fused_triton import HeadNorms
from server.kernels.native import MAX_DIM, MAX_GROUP, attention_kernel
from server.metrics import PREFIX_HIT_TOKENS, PREFIX_LOOKUP_TOKENS
from server.model.arch import ArchConfig

_GROWTH_QUANTUM = 256  # tokens; dense capacity grows in these steps to bound re-allocations


class KVCache:
    """Dense slots (see the module docstring)."""

    paged = False

    def attends_in_place(self, batch: Any) -> bool:
        """Dense slots have no C attention kernel (see PagedKVCache.attends_in_place)."""
        return False

    def may_copy(self, request: Any) -> bool:
        """Dense slots never take another request's prompt (see PagedKVCache.may_copy)."""
        return False

    def __init__(self, arch: ArchConfig, max_slots: int, max_tokens_per_slot: int, device: torch.device,
                 dtype: torch.dtype, max_reserved_tokens: Optional[int] = None) -> None:
        self.arch, self.max_slots, self.max_tokens = arch, max_slots, max_tokens_per_slot
        self.device, self.dtype = device, dtype
        self.max_reserved_tokens = max_reserved_tokens or max_slots * max_tokens_per_slot
        self.capacity = 0
        self.keys: list[torch.Tensor] = []  # per layer: [slots, kv_heads, capacity, head_dim]
        self.values: list[torch.Tensor] = []
        self._owners: list[object | None] = [None] * max_slots

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[index], self.values[index]

    @property
    def used_slots(self) -> int:
        return sum(owner is not None for owner in self._owners)

    @property
    def capacity_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    @property
    def used_bytes(self) -> int:
        return self.capacity_bytes * self.used_slots // self.max_slots

    cached_blocks = 0  # no prefix cache in the dense layout

    # -- scheduler side ----------------------------------------------------------------------------
    def can_admit(self, request: Any, running: Sequence[Any]) -> bool:
        """A free slot, and the running requests' worst cases plus this one's within the budget."""
        reserved = sum(r.max_total_tokens for r in running)
        return self.used_slots < self.max_slots and reserved + request.max_total_tokens <= self.max_reserved_tokens

    def admit(self, request: Any) -> None:
        request.slot = self.allocate(request)
        request.num_computed_tokens = 0

    def grow(self, request: Any) -> bool:
        """Room for the request's next token: always (its worst case was reserved at admission)."""
        return True

    def register_computed(self, request: Any) -> None:
        """No prefix cache in the dense cache."""

    def release(self, request: Any) -> None:
        moved = self.free(request.slot)
        if moved is not None:
            owner, new_slot = moved
            owner.slot = new_slot
        request.slot = None

    def allocate(self, owner: object) -> int:
        """Give `owner` the lowest free slot (dense slots keep decode views contiguous)."""
        slot = self._owners.index(None)
        self._owners[slot] = owner
        return slot

    def free(self, slot: int) -> tuple[object, int] | None:
        """Release `slot`; if it leaves a hole, move the last used slot into it.

        Returns (moved owner, its new slot) so the caller can update that owner's slot id.
        """
        self._owners[slot] = None
        last = max((i for i, o in enumerate(self._owners) if o is not None), default=-1)
        if last <= slot:
            return None
        for k, v in zip(self.keys, self.values):
            k[slot].copy_(k[last])
            v[slot].copy_(v[last])
        owner, self._owners[last] = self._owners[last], None
        self._owners[slot] = owner
        return owner, slot

    def ensure_capacity(self, tokens: int) -> None:
        """Grow every slot to hold at least `tokens` positions, keeping what is cached."""
        if tokens <= self.capacity:
            return
        if tokens > self.max_tokens:
            raise ValueError(f"sequence of {tokens} tokens exceeds the cache limit {self.max_tokens}")
        new_capacity = min(self.max_tokens, -(-tokens // _GROWTH_QUANTUM) * _GROWTH_QUANTUM)
        shape = (self.max_slots, self.arch.num_kv_heads, new_capacity, self.arch.head_dim)
        grown_k, grown_v = [], []
        for i in range(self.arch.num_layers):
            k = torch.zeros(shape, device=self.device, dtype=self.dtype)
            v = torch.zeros(shape, device=self.device, dtype=self.dtype)
            if self.capacity:
                k[:, :, : self.capacity].copy_(self.keys[i])
                v[:, :, : self.capacity].copy_(self.values[i])
            grown_k.append(k)
            grown_v.append(v)
        self.keys, self.values, self.capacity = grown_k, grown_v, new_capacity

    # -- runner side -------------------------------------------------------------------------------
    def index(self, requests: Sequence[Any], query_lens: list[int], context_lens: list[int], decode_rows: int,
              attend_len: int) -> None:
        """Dense slots need nothing beyond the batch's slots and positions."""
        return None

    # -- attention side ----------------------------------------------------------------------------
    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, batch: Any) -> None:
        """k, v: [tokens, kv_heads, head_dim], the batch's new tokens."""
        k_cache, v_cache = self.layer(layer)
        if batch.is_decode:  # (a mixed batch's decoding rows take the per-sequence path below)
            k_cache[batch.slots, :, batch.positions] = k
            v_cache[batch.slots, :, batch.positions] = v
            return
        start = 0
        for slot, n_new, total in zip(batch.slots.tolist(), batch.query_lens, batch.context_lens):
            k_cache[slot, :, total - n_new : total] = k[start : start + n_new].transpose(0, 1)
            v_cache[slot, :, total - n_new : total] = v[start : start + n_new].transpose(0, 1)
            start += n_new

    def decode_attention(self, layer: int, q: torch.Tensor, batch: Any, window: Optional[int],
                         scale: float) -> Optional[torch.Tensor]:
        """The decoding rows' attention [rows, heads, head_dim] where a kernel reads dense caches in
        place (Triton, CUDA: each row's own positions only, graphed or not); None elsewhere:
        attention reads decode_kv under a mask."""
        kernels = fused_kernels(q)
        if kernels is None or not kernels.supports_dense:
            return None
        k_cache, v_cache = self.layer(layer)
        rows = batch.num_decode_rows
        return kernels.decode_attention(q, k_cache, v_cache, batch.slots[:rows], batch.kv_lens, window, scale)

    def rotate_and_write(self, layer: int, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
                         batch: Any, norms: Optional[HeadNorms] = None) -> Optional[torch.Tensor]:
        """Decode steps where a kernel takes dense caches (Triton, CUDA): q and k normed (`norms`, where
        given) and rotated in place in the fused projection's rows and k, v written in one pass;
        returns q [tokens, heads, head_dim]. None elsewhere: the model rotates, then calls write."""
        kernels = fused_kernels(qkv) if batch.is_decode else None
        if kernels is None or not kernels.supports_dense:
            return None
        k_cache, v_cache = self.layer(layer)
        return kernels.rope_store(qkv, heads, self.arch.num_kv_heads, cos, sin, k_cache, v_cache, batch.slots,
                                  batch.positions, norms)

    def decode_kv(self, layer: int, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [rows, kv_heads, attend_len, head_dim] of the batch's decoding rows."""
        k_cache, v_cache = self.layer(layer)
        length, rows = batch.attend_len, batch.num_decode_rows
        if batch.dense_slots:
            return k_cache[:rows, :, :length], v_cache[:rows, :, :length]  # views, no copy
        slots = batch.slots[:rows]
        return k_cache[slots, :, :length], v_cache[slots, :, :length]

    def prefill_kv(self, layer: int, batch: Any, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [1, kv_heads, context_len, head_dim] of one prefilled sequence."""
        k_cache, v_cache = self.layer(layer)
        slot, total = int(batch.slots[seq]), batch.context_lens[seq]
        return k_cache[slot : slot + 1, :, :total], v_cache[slot : slot + 1, :, :total]


# The attention kernel runs on one thread; SDPA spreads a step over the team. With more than one
# thread the kernel keeps only steps of at most this many (row, position) pairs per thread, where
# SDPA's fixed costs dominate (2 threads, bf16, per layer: 32 rows x 80 positions 197 us against 218;
# 8 x 1,000: 565 against 480; 1 x 1,000: 75 against 99).
IN_PLACE_ATTENTION_WORK = 8192


@dataclass(frozen=True)
class PagedIndex:
    """Where one batch's tokens live in the block pool, as flat slot numbers (block * size + offset)."""

    slot_mapping: torch.Tensor  # [tokens] where each new token's K and V are written
    gather: Optional[torch.Tensor]  # decoding rows: [rows, attend_len] the slots each attends over (padding: 0)
    sequences: tuple[torch.Tensor, ...]  # per prefilling sequence (after the decoding rows): its slots in order


@dataclass
class InFlight:
    """A full block of a prompt prefix that a running request (its leader) is computing now. A
    request admitted meanwhile with the same prefix (the same tokens under the same adapter: a
    burst sharing a system prompt) shares the block and counts it computed. That holds because the
    scheduler feeds prefills in admission order, a request only once every earlier one has all its
    pending tokens in the step, and each layer writes the step's keys and values before any
    attention reads them: when the follower's tokens attend, the block is written. A leader that
    leaves without computing it hands it to a follower (PagedKVCache._hand_over)."""

    block: int
    index: int  # its place in every block table holding it (the same prefix)
    leader: Any  # the Request computing it
    followers: list[Any] = field(default_factory=list)


class BlockPool:
    """Fixed-size blocks with reference counts. A full block can be registered under its prefix key;
    when its last user leaves it stays cached but idle (least recently used first), and is only
    reclaimed when a never-cached block is no longer free. Block 0 is kept back as the padding target."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.free: deque[int] = deque(range(1, num_blocks))  # holding nothing worth keeping
        self.idle: OrderedDict[int, None] = OrderedDict()  # unreferenced, holding a cached prefix; LRU first
        self.refs = [0] * num_blocks
        self.key_of: dict[int, bytes] = {}
        self.block_of: dict[bytes, int] = {}

    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.idle)

    @property
    def num_used(self) -> int:
        return self.num_blocks - 1 - self.num_free

    def take(self, count: int) -> list[int]:
        assert count <= self.num_free, "callers check num_free first"
        blocks = []
        for _ in range(count):
            block = self.free.popleft() if self.free else self._reclaim()
            self.refs[block] = 1
            blocks.append(block)
        return blocks

    def give_back(self, blocks: list[int]) -> None:
        for block in blocks:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.key_of:
                    self.idle[block] = None
                else:
                    self.free.append(block)

    def match(self, keys: list[bytes]) -> list[int]:
        """The cached blocks of the longest run of these prefix keys (nothing is taken)."""
        blocks = []
        for key in keys:
            block = self.block_of.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def share(self, blocks: list[int]) -> None:
        for block in blocks:
            if self.refs[block] == 0:
                del self.idle[block]
            self.refs[block] += 1

    def register(self, block: int, key: bytes) -> None:
        if block not in self.key_of and key not in self.block_of:
            self.key_of[block], self.block_of[key] = key, block

    def _reclaim(self) -> int:
        block, _ = self.idle.popitem(last=False)
        del self.block_of[self.key_of.pop(block)]
        return block


class PagedKVCache:
    """Paged blocks (see the module docstring). K and V of each layer: [blocks * block_size,
    kv_heads, head_dim], so a token's flat slot is block * block_size + offset."""

    paged = True

    def __init__(self, arch: ArchConfig, num_blocks: int, block_size: int, device: torch.device,
                 dtype: torch.dtype, prefix_caching: bool = False) -> None:
        self.arch, self.block_size, self.device, self.dtype = arch, block_size, device, dtype
        self.prefix_caching = prefix_caching
        self.pool = BlockPool(num_blocks)
        # One allocation, zeroed, so the whole pool is resident from the start: too large a pool fails
        # here, at once, not later under load (nor one layer at a time into the OOM killer); and
        # padding reads finite values. Each layer's K and V are views of it.
        pool = torch.zeros((2, arch.num_layers, num_blocks * block_size, arch.num_kv_heads, arch.head_dim),
                           device=device, dtype=dtype)
        self.keys, self.values = list(pool[0].unbind(0)), list(pool[1].unbind(0))
        self._pool = pool
        self._holders = 0
        self._in_flight: dict[bytes, InFlight] = {}  # full prefix blocks being computed now, by key
        self._promised: dict[int, list[bytes]] = {}  # request id -> keys of the blocks it leads
        fits = arch.head_dim <= MAX_DIM and arch.num_heads // arch.num_kv_heads <= MAX_GROUP
        cpu = device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
        self._attend = attention_kernel() if cpu and fits else None  # CPU decode rows read in place

    @classmethod
    def sized(cls, arch: ArchConfig, memory_bytes: int, block_size: int, device: torch.device,
              dtype: torch.dtype, prefix_caching: bool = False) -> "PagedKVCache":
        blocks = max(2, memory_bytes // cls.block_bytes(arch, block_size, dtype))
        return cls(arch, blocks, block_size, device, dtype, prefix_caching)

    @staticmethod
    def block_bytes(arch: ArchConfig, block_size: int, dtype: torch.dtype) -> int:
        return 2 * arch.num_layers * block_size * arch.num_kv_heads * arch.head_dim * dtype.itemsize

    @property
    def capacity_tokens(self) -> int:
        return (self.pool.num_blocks - 1) * self.block_size

    @property
    def capacity_bytes(self) -> int:
        return self.pool.num_blocks * self.block_bytes(self.arch, self.block_size, self.dtype)

    @property
    def used_bytes(self) -> int:
        return self.pool.num_used * self.block_bytes(self.arch, self.block_size, self.dtype)

    @property
    def used_slots(self) -> int:
        """Sequences holding blocks."""
        return self._holders

    @property
    def cached_blocks(self) -> int:
        return len(self.pool.key_of)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[index], self.values[index]

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # -- scheduler side ----------------------------------------------------------------------------
    def can_admit(self, request: Any, running: Sequence[Any]) -> bool:
        """Blocks for every token the request has now (its prompt, or prompt and output when it is
        recomputed after a preemption) less those found in the prefix cache, and one spare block per
        running sequence that is about to need one, so admitting it does not at once force a preemption."""
        spare = sum(1 for r in running if r.total_tokens % self.block_size == 0)
        matched = self._match(request)
        revived = sum(1 for b in matched if self.pool.refs[b] == 0)  # idle blocks count as free until shared
        return self.blocks_for(request.total_tokens) - len(matched) + revived + spare <= self.pool.num_free

    def admit(self, request: Any) -> None:
        """Start the request's block table with its cached prefix and the blocks of its prefix that
        running requests are computing now (it follows them: see InFlight), then blocks for the rest."""
        matched = self._match(request)
        joined = self._join_in_flight(request, len(matched))
        self.pool.share(matched + joined)
        request.block_table = matched + joined
        request.num_computed_tokens = len(request.block_table) * self.block_size
        request.registered_blocks = len(matched)
        if self.prefix_caching and not request.options.prefill_logprobs:
            PREFIX_LOOKUP_TOKENS.inc(request.total_tokens)
            PREFIX_HIT_TOKENS.inc(request.num_computed_tokens)
        self._holders += 1
        assert self._extend(request), "can_admit checked the blocks"
        self._lead(request)

    def may_copy(self, request: Any) -> bool:
        """Whether the request may take its prompt's keys and values from an identical request's
        computed in the same step (a twin, see scheduler): with prefix caching on (the switch for
        reusing computed keys and values), not scoring its prompt, and leading no in-flight block
        (a block others read in the step's forward must be written by it; a twin's is copied after)."""
        return self.prefix_caching and not request.options.prefill_logprobs and request.id not in self._promised

    def copy_tokens(self, moves: Sequence[tuple[Any, Any, int, int]]) -> None:
        """After a step: for each (source, target, start, end), positions [start, end) of the source's
        keys and values, every layer, into the target's blocks; all in one indexed copy of the pool."""
        size, sources, targets = self.block_size, [], []
        for source, target, start, end in moves:
            positions = torch.arange(start, end)
            for request, slots in ((source, sources), (target, targets)):
                table = torch.tensor(request.block_table, dtype=torch.long)
                slots.append(table[positions // size] * size + positions % size)
        self._pool[:, :, torch.cat(targets).to(self.device)] = self._pool[:, :, torch.cat(sources).to(self.device)]

    def register_computed(self, request: Any) -> None:
        """After a step: the request's blocks computed in full join the prefix cache now, before the
        next admissions look for them."""
        self._register(request)

    def grow(self, request: Any) -> bool:
        """Before a decode step: register the request's blocks whose tokens are all computed, and
        extend its table to cover all its tokens; False if the pool is out."""
        self._register(request)
        return self._extend(request)

    def _register(self, request: Any) -> None:
        """Offer the request's full, computed blocks not offered yet to the prefix cache, up to one
        it follows another request for (that request registers it once computed)."""
        full = request.num_computed_tokens // self.block_size
        if not self.prefix_caching or full <= request.registered_blocks:
            return
        keys = self._keys(request, full)
        for i in range(request.registered_blocks, full):
            entry = self._in_flight.get(keys[i])
            if entry is not None and entry.leader is not request:
                return
            self.pool.register(request.block_table[i], keys[i])
            if entry is not None:
                del self._in_flight[keys[i]]
            request.registered_blocks = i + 1

    def _join_in_flight(self, request: Any, start: int) -> list[int]:
        """The blocks after the first `start` of the request's prefix that running requests are
        computing now (the same tokens under the same adapter), which it reads instead."""
        if not self._in_flight or not self.prefix_caching or request.options.prefill_logprobs:
            return []
        joined = []
        for key in self._keys(request, (request.total_tokens - 1) // self.block_size)[start:]:
            entry = self._in_flight.get(key)
            if entry is None:
                break
            entry.followers.append(request)
            joined.append(entry.block)
        return joined

    def _lead(self, request: Any) -> None:
        """The full blocks its prefill computes that nobody else computes now: in flight, led by it."""
        if not self.prefix_caching or request.options.prefill_logprobs:
            return
        start, full = request.num_computed_tokens // self.block_size, request.total_tokens // self.block_size
        keys, led = self._keys(request, full), []
        for index in range(start, full):
            if keys[index] not in self._in_flight:
                self._in_flight[keys[index]] = InFlight(request.block_table[index], index, request)
                led.append(keys[index])
        if led:
            self._promised[request.id] = led

    def _hand_over(self, request: Any) -> None:
        """The request leaves with blocks it led but never computed: the earliest admitted of their
        followers still holding them computes them instead, and the others follow it."""
        for key in self._promised.pop(request.id, []):
            entry = self._in_flight.get(key)
            if entry is None or entry.leader is not request:
                continue
            del self._in_flight[key]
            live = [f for f in entry.followers
                    if len(f.block_table) > entry.index and f.block_table[entry.index] == entry.block]
            if not live:
                continue
            heir = min(live, key=lambda f: f.admitted_seq)
            heir.num_computed_tokens = min(heir.num_computed_tokens, entry.index * self.block_size)
            self._in_flight[key] = InFlight(entry.block, entry.index, heir, [f for f in live if f is not heir])
            self._promised.setdefault(heir.id, []).append(key)

    def _extend(self, request: Any) -> bool:
        missing = self.blocks_for(request.total_tokens) - len(request.block_table)
        if missing <= 0:
            return True
        if missing > self.pool.num_free:
            return False
        request.block_table.extend(self.pool.take(missing))
        return True

    def _match(self, request: Any) -> list[int]:
        """Cached blocks of the request's longest cached prefix under its own adapter. At least one
        token is always left to compute (its logits are the next token's), and a request that wants
        its prompt's log-probs computes them all."""
        if not self.prefix_caching or request.options.prefill_logprobs:
            return []
        return self.pool.match(self._keys(request, (request.total_tokens - 1) // self.block_size))

    def _keys(self, request: Any, count: int) -> list[bytes]:
        """Prefix keys of the request's first `count` full blocks: each hashes the previous key and
        the block's tokens, starting from the adapter's identity (this load of it), so KV computed
        under one adapter is never read under another. A cryptographic hash: prompts are untrusted,
        and a collision would hand one tenant's KV to another."""
        keys, size, tokens = request.prefix_hashes, self.block_size, request.all_token_ids
        previous = keys[-1] if keys else str(request.adapter.serial if request.adapter else 0).encode()
        for i in range(len(keys), count):
            block = tokens[i * size : (i + 1) * size]
            previous = hashlib.blake2b(previous + b"".join(t.to_bytes(4, "little") for t in block),
                                       digest_size=16).digest()
            keys.append(previous)
        return keys[:count]

    def release(self, request: Any) -> None:
        self._register(request)  # a request that never decoded (one new token) has its prefix cached here
        self._hand_over(request)
        self.pool.give_back(request.block_table)
        request.block_table = []
        self._holders -= 1

    def ensure_capacity(self, tokens: int) -> None:
        """The pool is allocated once (the builder checks that one request of max_total_tokens fits)."""

    # -- runner side -------------------------------------------------------------------------------
    def index(self, requests: Sequence[Any], query_lens: list[int], context_lens: list[int], decode_rows: int,
              attend_len: int) -> PagedIndex:
        """The flat slots of the batch's new tokens (each sequence's query_len positions ending at its
        context_len), and of what attention reads: each decoding row's first attend_len positions
        (padding reads the zeroed block 0 under the mask), each prefilling sequence's whole context."""
        size = self.block_size
        table = torch.nn.utils.rnn.pad_sequence([torch.tensor(r.block_table, dtype=torch.long) for r in requests],
                                                batch_first=True)  # [seqs, max_blocks], padding block 0
        mapping, gather = [], None
        if decode_rows:  # one new token each, at context_len - 1: a column of what they read
            rows = torch.nn.functional.pad(table[:decode_rows],
                                           (0, max(0, self.blocks_for(attend_len) - table.shape[1])))
            reach = torch.arange(attend_len)
            gather = rows[:, reach // size] * size + reach % size  # [decode_rows, attend_len]
            lengths = torch.tensor(context_lens[:decode_rows])
            mapping.append(gather[torch.arange(decode_rows), lengths - 1])
            gather = torch.where(reach[None, :] < lengths[:, None], gather, 0)
        sequences = [row[torch.arange(n) // size] * size + torch.arange(n) % size
                     for row, n in zip(table[decode_rows:], context_lens[decode_rows:])]
        mapping += [seq[n - q :] for seq, n, q in zip(sequences, context_lens[decode_rows:], query_lens[decode_rows:])]
        return PagedIndex(torch.cat(mapping).to(self.device), None if gather is None else gather.to(self.device),
                          tuple(seq.to(self.device) for seq in sequences))

    # -- attention side ----------------------------------------------------------------------------
    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, batch: Any) -> None:
        k_cache, v_cache = self.layer(layer)
        k_cache.index_copy_(0, batch.kv_index.slot_mapping, k)
        v_cache.index_copy_(0, batch.kv_index.slot_mapping, v)

    def rotate_and_write(self, layer: int, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
                         batch: Any, norms: Optional[HeadNorms] = None) -> Optional[torch.Tensor]:
        """q and k of the fused projection's rows [tokens, (heads + 2 kv_heads) * dim] normed (`norms`,
        where given) and rotated in place and k, v written, in one pass of a fused kernel (norm_cpu.c
        on bf16 CPU rows, Triton on CUDA) instead of ~10 torch ops a layer; returns q [tokens,
        heads, dim], or None where no kernel takes these."""
        kernels = fused_kernels(qkv)
        if kernels is None or (norms is not None and not kernels.supports_head_norms):
            return None
        k_cache, v_cache = self.layer(layer)
        return kernels.rope_store(qkv, heads, self.arch.num_kv_heads, cos, sin, k_cache, v_cache,
                                  batch.kv_index.slot_mapping, norms=norms)

    def attends_in_place(self, batch: Any) -> bool:
        """Whether this step's decoding rows attend through the C kernel (decode_attention)."""
        threads = torch.get_num_threads()
        return self._attend is not None and not (threads > 1 and
                                                 batch.kv_index.gather.numel() > IN_PLACE_ATTENTION_WORK // threads)

    def decode_attention(self, layer: int, q: torch.Tensor, batch: Any, window: Optional[int],
                         scale: float) -> Optional[torch.Tensor]:
        """The decoding rows' attention [rows, heads, head_dim] for q [rows, heads, head_dim], their
        keys and values read in place through their slots by the C kernel (CPU; server/kernels), or
        None where there is none: the caller gathers them (decode_kv) for SDPA. Per layer at 32 rows
        over ~80 positions (bf16): ~90 us, against ~300 us of SDPA and ~40 of gathering."""
        if not self.attends_in_place(batch):
            return None
        k_cache, v_cache = self.layer(layer)
        return self._attend(q, k_cache, v_cache, batch.kv_index.gather, batch.kv_lens, window, scale)

    # Reads gather whole slots with index_select: on CPU ~7x faster than indexing with a tensor
    # (which goes through the general advanced-indexing kernel), the same values.
    def decode_kv(self, layer: int, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        k_cache, v_cache = self.layer(layer)
        gather = batch.kv_index.gather  # [decode rows, attend_len]
        shape = (*gather.shape, *k_cache.shape[1:])  # [rows, attend_len, kv_heads, head_dim]
        flat = gather.view(-1)
        return (k_cache.index_select(0, flat).view(shape).transpose(1, 2),
                v_cache.index_select(0, flat).view(shape).transpose(1, 2))

    def prefill_kv(self, layer: int, batch: Any, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        k_cache, v_cache = self.layer(layer)
        slots = batch.kv_index.sequences[seq - batch.num_decode_rows]  # [context_len]
        return (k_cache.index_select(0, slots).transpose(0, 1).unsqueeze(0),
                v_cache.index_select(0, slots).transpose(0, 1).unsqueeze(0))
