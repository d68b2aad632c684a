"""The adapter store: disk/remote sources → CPU-RAM LRU tier, loaded by background workers.

`get` returns a Future: a cold adapter is fetched, read and validated on a worker thread while
the engine keeps decoding; concurrent requests for the same cold adapter share one load. Failed
loads are not cached, so a transient failure (an S3 endpoint down) is retried by the next request.
The device tier (server.adapters.lora.ResidentAdapters) is fed from here by the scheduler.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from server.adapters.merge import MergeSpec, merge
from server.adapters.sources import AdapterSource, HubSource, LocalSource, PbaseSource, S3Source
from server.adapters.weights import AdapterKey, AdapterWeights, ReadBuffer, read_adapter
from server.errors import ValidationError
from server.model.arch import ArchConfig

log = logging.getLogger(__name__)

SOURCE_NAMES = ("pbase", "local", "hub", "s3")


@dataclass(frozen=True)
class AdapterStoreConfig:
    adapters_dir: Path
    extra_roots: tuple[Path, ...]
    s3_cache_dir: Path
    max_cpu_adapters: int
    download_timeout_s: float = 300.0  # one remote adapter download, retries included
    load_workers: int = 2


class AdapterStore:
    def __init__(self, config: AdapterStoreConfig, arch: ArchConfig, dtype: torch.dtype = torch.float32) -> None:
        """`dtype`: the serving dtype, which adapters are read into (the CPU tier holds them so)."""
        self.config, self.arch, self.dtype = config, arch, dtype
        self.sources: dict[str, AdapterSource] = {
            "pbase": PbaseSource(config.adapters_dir),
            "local": LocalSource([config.adapters_dir, *config.extra_roots]),
            "hub": HubSource(),
            "s3": S3Source(config.s3_cache_dir, config.download_timeout_s),
        }
        self._cpu: OrderedDict[AdapterKey, AdapterWeights] = OrderedDict()
        self._pending: dict[AdapterKey, Future] = {}
        self._last_used: dict[AdapterKey, float] = {}
        self._lock = threading.Lock()
        # the device tier's copy of a key (set by the engine's builder): a CPU-tier miss for an adapter
        # the device still holds takes it back from there instead of reading the disk again
        self.device_copy: Callable[[AdapterKey], Optional[AdapterWeights]] = lambda key: None
        self._unloaded: set[AdapterKey] = set()  # unloaded on purpose: read again, never taken back
        # one OpenMP thread per worker: a load parses on the core it holds, and the engine's team
        # shrinks by one while it does (busy_loaders, server.engine.cpu_threads)
        self._pool = ThreadPoolExecutor(config.load_workers, thread_name_prefix="adapter-loader",
                                        initializer=torch.set_num_threads, initargs=(1,))
        self._buffers = threading.local()  # each loader thread's ReadBuffer
        # called on the loader thread before each load (the builder: the device tier's make_pool)
        self.before_load: Callable[[], None] = lambda: None
        self._parsing = 0
        self._downloading = 0
        self.stats: Counter[str] = Counter()

    def key_for(self, adapter_id: str, source: Optional[str]) -> AdapterKey:
        source = (source or ("s3" if adapter_id.startswith("s3://") else "pbase")).lower()
        if source not in SOURCE_NAMES:
            raise ValidationError(f"adapter_source must be one of {', '.join(SOURCE_NAMES)}; got {source!r}")
        if len(adapter_id) > 512:
            raise ValidationError("adapter_id is longer than 512 characters")
        if source == "pbase":
            adapter_id = self.sources["pbase"].canonical(adapter_id)
        return AdapterKey(source, adapter_id)

    def get(self, key: AdapterKey) -> Future:
        """A Future of the adapter's AdapterWeights (already done on a CPU-tier hit)."""
        return self._get(key, lambda: self._read(key))

    def _get(self, key: AdapterKey, produce: Callable[[], AdapterWeights]) -> Future:
        with self._lock:
            self._last_used[key] = time.time()
            if key not in self._cpu and key not in self._unloaded and (held := self.device_copy(key)) is not None:
                self._keep(key, held)
                self.stats["device_hits"] += 1
            elif key in self._cpu:
                self._cpu.move_to_end(key)
                self.stats["cpu_hits"] += 1
            if key in self._cpu:
                done: Future = Future()
                done.set_result(self._cpu[key])
                return done
            if key not in self._pending:
                self._pending[key] = self._pool.submit(self._load, key, produce)
            return self._pending[key]

    def get_merged(self, spec: MergeSpec) -> Future:
        """A Future of the merged adapter, built from its parts on a worker and cached by its spec."""
        def produce() -> AdapterWeights:
            parts = [self._load_now(self.key_for(i, spec.source)) for i in spec.ids]
            with self._on_cpu():
                return merge(spec, parts)

        return self._get(spec.key, produce)

    def _load_now(self, key: AdapterKey) -> AdapterWeights:
        """On a worker: a part of a merge, from the CPU tier or read in place (no nested futures)."""
        with self._lock:
            if key in self._cpu:
                return self._cpu[key]
        return self._load(key, lambda: self._read(key))

    def _read(self, key: AdapterKey) -> AdapterWeights:
        source = self.sources[key.source]
        with self._downloading_from(source):
            directory = source.fetch(key.id)  # a download waits on the network, not a core
        with self._on_cpu():
            return read_adapter(key, directory, self.arch, self.dtype, self._buffer())

    def _buffer(self) -> ReadBuffer:
        """This loader thread's file buffer, reused load after load."""
        if not hasattr(self._buffers, "buffer"):
            self._buffers.buffer = ReadBuffer()
        return self._buffers.buffer

    @contextmanager
    def _on_cpu(self) -> Iterator[None]:
        """Parsing or merging: counts as a busy loader."""
        with self._lock:
            self._parsing += 1
        try:
            yield
        finally:
            with self._lock:
                self._parsing -= 1

    @contextmanager
    def _downloading_from(self, source: AdapterSource) -> Iterator[None]:
        remote = int(source.remote)
        with self._lock:
            self._downloading += remote
        try:
            yield
        finally:
            with self._lock:
                self._downloading -= remote

    def downloading(self) -> int:
        """Loads waiting on the network (S3, the hub) right now."""
        return self._downloading

    def busy_loaders(self) -> int:
        """Loads parsing or merging on a core right now (the engine leaves them one each)."""
        return self._parsing

    def _load(self, key: AdapterKey, produce: Callable[[], AdapterWeights]) -> AdapterWeights:
        started = time.monotonic()
        try:
            with self._on_cpu():  # (zeroing the device tier's pool takes a core like parsing)
                self.before_load()
            weights = produce()
        except Exception:
            self.stats["load_failures"] += 1
            with self._lock:
                self._pending.pop(key, None)
            raise
        with self._lock:
            self._keep(key, weights)
            self._pending.pop(key, None)
            self._unloaded.discard(key)
        self.stats["loads"] += 1
        log.info("adapter %s loaded (rank %d, %.1f MB) in %.2f s", key, weights.rank,
                 weights.size_bytes / 1e6, time.monotonic() - started)
        return weights

    def _keep(self, key: AdapterKey, weights: AdapterWeights) -> None:
        """Into the CPU tier (the lock held), evicting the least recently used beyond its size."""
        self._cpu[key] = weights
        while len(self._cpu) > self.config.max_cpu_adapters:
            evicted, _ = self._cpu.popitem(last=False)
            self.stats["cpu_evictions"] += 1
            log.info("adapter %s evicted from the CPU tier", evicted)

    def unload(self, key: AdapterKey) -> bool:
        """Drop from the CPU tier (requests already holding it finish normally)."""
        with self._lock:
            self._unloaded.add(key)
            return self._cpu.pop(key, None) is not None

    def cpu_resident(self) -> list[AdapterWeights]:
        with self._lock:
            return list(self._cpu.values())

    def last_used(self, key: AdapterKey) -> Optional[float]:
        return self._last_used.get(key)

    def known_ids(self) -> list[str]:
        with self._lock:
            loaded = {str(k) for k in self._cpu}
        return sorted(loaded | set(self.sources["pbase"].list_known()))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
