"""The DRAM tier: one partitioned hash map per table, in shared memory, read by every worker process.

A table lives in one file under /dev/shm (the owner creates and, on close, removes it); other processes
`attach` to it through a picklable `DramTableHandle` and read the same bytes, so N workers keep one copy of
the embeddings. Writers take the table's lock (a thread lock plus flock on the file, which the kernel frees
if a writer dies); readers take none. The kernels and the consistency protocol are in `_hashmap.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import math
import mmap
import os
import threading
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

import numba
import numpy as np
from numba import typed

from recserve.config import DramTierConfig, RowDtype, TableConfig, capacity_rows
from recserve.errors import NotFoundError
from recserve.ps import _hashmap as hm
from recserve.ps._shm import collapse_to_huge_pages, map_file, whole_huge_pages
from recserve.ps.keys import unique_inverse
from recserve.ps.pooling import add_to_bags, pool
from recserve.ps.rows import STORAGE_DTYPE, row_bytes, to_float32, to_storage
from recserve.ps.tiers import LookupResult, PooledResult, TierTableStats, check_rows

log = logging.getLogger(__name__)

_POLICY_CODES = {
    "evict_lru": hm.POLICY_LRU,
    "evict_lfu": hm.POLICY_LFU,
    "evict_random": hm.POLICY_RANDOM,
    "reject": hm.POLICY_REJECT,
}
# a pooled lookup deduplicates its keys first when there are more than capacity / DEDUPE_ABOVE_SHARE or
# FUSED_MAX_KEYS of them (see lookup_pooled)
DEDUPE_ABOVE_SHARE = 4
FUSED_MAX_KEYS = 32_768
_NO_POSITIONS = np.empty(0, dtype=np.int64)
# Tables smaller than this stay on 4 KiB pages: the TLB covers most of them anyway, and a huge page would commit
# up to 2 MiB of memory for a table of a few rows.
HUGE_PAGES_MIN_BYTES = 16 << 20


@dataclass(frozen=True, slots=True)
class DramTableHandle:
    """Everything another process needs to attach to a table: where it is and how it is laid out."""

    path: str  # shared-memory file; "" for memory private to the creating process
    name: str
    dim: int
    dtype: RowDtype
    num_partitions: int
    num_slots: int  # index slots per partition, a power of two >= 2 x capacity
    capacity: int  # rows per partition
    policy: int
    keep: int  # rows a full partition is cut down to when it must evict
    huge_pages: bool = False  # the creator asks the kernel for 2 MiB pages (see _shm.py)

    @property
    def shared(self) -> bool:
        return bool(self.path)

    @property
    def words(self) -> int:
        """int64 words per record: header, then the values padded to 8 bytes."""
        return hm.RECORD_HEADER_WORDS + math.ceil(row_bytes(self.dtype, self.dim) / 8)

    def sizes(self) -> dict[str, int]:
        """int64 words of each array, in file order."""
        p, s, c = self.num_partitions, self.num_slots, self.capacity
        return {"clock": 8, "part": p * 8, "slots": p * s * 2, "free": p * c, "rec": p * c * self.words}

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays; the file is rounded up to whole huge pages when it asks for them."""
        return 8 * sum(self.sizes().values())

    @property
    def file_bytes(self) -> int:
        return whole_huge_pages(self.nbytes) if self.huge_pages else self.nbytes


def plan_table(table: TableConfig, config: DramTierConfig, path: str) -> DramTableHandle:
    total = capacity_rows(table, config)
    num_partitions = min(config.num_partitions, total)
    share = total / num_partitions
    # Keys spread over partitions by hash, not evenly: without headroom a table sized to its row count would
    # evict. 4 standard deviations of the binomial share make that practically impossible (+0.4% at 1M rows).
    capacity = math.ceil(share + (4 * math.sqrt(share) if num_partitions > 1 else 0))
    num_slots = 1 << max(3, math.ceil(math.log2(2 * capacity)))
    keep = min(capacity - 1, math.floor(capacity * config.overflow_resolution_target))
    handle = DramTableHandle(
        path=path, name=table.name, dim=table.dim, dtype=table.dtype, num_partitions=num_partitions,
        num_slots=num_slots, capacity=capacity, policy=_POLICY_CODES[table.overflow_policy], keep=keep,
    )
    wants_huge_pages = config.huge_pages and handle.shared and handle.nbytes >= HUGE_PAGES_MIN_BYTES
    return dataclasses.replace(handle, huge_pages=True) if wants_huge_pages else handle


class DramTable:
    """One table's hash map, mapped from its shared-memory file."""

    def __init__(self, handle: DramTableHandle, *, create: bool) -> None:
        self.handle = handle
        self._owner = create
        self._fd = self._open_file(handle, create) if handle.shared else None
        if create and handle.shared:  # also on exit of an owner that never called close()
            self._unlink_at_exit = weakref.finalize(self, Path(handle.path).unlink, missing_ok=True)
        offset = 0
        self.huge_pages = False  # whether the kernel backed this map with 2 MiB pages (as far as we know)
        if self._fd is None:
            if not create:
                raise NotFoundError(f"dram: table '{handle.name}' lives in one process's private memory")
            self._map = mmap.mmap(-1, handle.nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        else:
            try:
                self._map, offset = map_file(self._fd, handle.file_bytes)
            except BaseException:
                os.close(self._fd)
                raise
            if create and handle.huge_pages:
                self.huge_pages = collapse_to_huge_pages(self._map, offset, handle.file_bytes)
        # Private memory gets transparent huge pages on request where they are on (`madvise` or `always`), and so
        # does a file on a tmpfs mounted with huge=advise.
        with contextlib.suppress(OSError, AttributeError):
            self._map.madvise(mmap.MADV_HUGEPAGE)
        words = np.frombuffer(self._map, dtype=np.int64, count=handle.nbytes // 8, offset=offset)
        arrays, start = {}, 0
        for part_name, size in handle.sizes().items():
            arrays[part_name] = words[start : start + size]
            start += size
        self.clock = arrays["clock"]
        self.part = arrays["part"].reshape(handle.num_partitions, 8)
        self.slots = arrays["slots"]
        self.free = arrays["free"]
        self.rec = arrays["rec"]
        storage = STORAGE_DTYPE[handle.dtype]
        self.values = self.rec.view(storage).reshape(-1, handle.words * 8 // storage.itemsize)
        self._offset = hm.RECORD_HEADER_WORDS * 8 // storage.itemsize
        self._storage = storage
        self._thread_lock = threading.Lock()
        if create:
            hm.init_table(self.part, self.slots, self.free, handle.capacity)

    @staticmethod
    def _open_file(handle: DramTableHandle, create: bool) -> int:
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(handle.path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, handle.file_bytes)
        except BaseException:
            os.close(fd)
            os.unlink(handle.path)
            raise
        return fd

    # --- reads (lock-free) ---

    def lookup(self, keys: np.ndarray) -> LookupResult:
        h = self.handle
        out = np.empty((keys.size, h.dim), dtype=self._storage)
        found = np.empty(keys.size, dtype=np.bool_)
        args = (self.clock, self.part, self.slots, self.rec, self.values, keys, out, found, h.num_slots, h.words,
                self._offset, h.policy == hm.POLICY_LFU)
        if keys.size >= hm.PARALLEL_MIN_KEYS:
            hm.lookup_kernel(*args, numba.get_num_threads())
        else:
            hm.lookup_kernel_serial(*args)
        return LookupResult(rows=to_float32(out, h.dtype), found=found)

    @property
    def max_fused_keys(self) -> int:
        """The most keys a pooled lookup runs the fused kernel for (look up and sum as it goes); -1: none."""
        h = self.handle
        # Reading a repeated key again is cheap while its row is in cache, and skipping the deduplication then
        # wins (RMC1 `full`, 20k keys of a query into 4M-row tables: 1.2x; one item's 80 keys: 2x). A batch
        # large next to its table repeats most keys, and reading each once wins by far (RMC1 `tiny`, 1,000-row
        # tables, 20k keys: 3x); so does a batch whose rows no longer stay in cache (80k keys into 4M rows in
        # shared memory: 1.4x). The fused kernel adds float32 and bfloat16 rows (widening a bfloat16 is a
        # shift); numba has no float16, so float16 tables deduplicate first.
        if h.dtype == "float16":
            return -1
        return min(FUSED_MAX_KEYS, h.capacity * h.num_partitions // DEDUPE_ABOVE_SHARE)

    def lookup_pooled(self, keys: np.ndarray, offsets: np.ndarray) -> PooledResult:
        """The found rows of each bag keys[offsets[b]:offsets[b + 1]], summed; where the missing keys are."""
        h = self.handle
        if keys.size > self.max_fused_keys:
            unique, inverse = unique_inverse(keys)
            result = self.lookup(unique)
            hits = int(np.count_nonzero(result.found))
            if hits == unique.size:
                return PooledResult(pool(result.rows, inverse, offsets), missing=_NO_POSITIONS, hits=hits)
            found = result.found[inverse]
            positions = np.flatnonzero(found)
            pooled = np.zeros((offsets.size - 1, h.dim), dtype=np.float32)
            add_to_bags(pooled, offsets, positions, result.rows, inverse[positions])
            return PooledResult(pooled=pooled, missing=np.flatnonzero(~found), hits=hits)
        pooled = np.zeros((offsets.size - 1, h.dim), dtype=np.float32)
        found = np.empty(keys.size, dtype=np.bool_)
        args = (self.clock, self.part, self.slots, self.rec, self.values, keys, offsets, pooled, found,
                h.num_slots, h.words, self._offset, h.policy == hm.POLICY_LFU)
        if keys.size >= hm.PARALLEL_MIN_KEYS:
            num_missing = hm.pooled_lookup_kernel(*args, numba.get_num_threads())
        else:
            num_missing = hm.pooled_lookup_kernel_serial(*args)
        missing = np.flatnonzero(~found) if num_missing else _NO_POSITIONS  # finding none costs ~8 us a call
        return PooledResult(pooled=pooled, missing=missing, hits=keys.size - num_missing)

    # --- writes (one writer per table, across threads and processes) ---

    def update_token(self) -> int:
        """Writes begun so far, or -1 while one is in flight (no promotion may then land)."""
        started = int(self.clock[hm.CLOCK_WRITES_STARTED])
        return started if int(self.clock[hm.CLOCK_WRITES_FINISHED]) == started else -1

    def begin_update(self) -> None:
        with self._write_lock():
            self.clock[hm.CLOCK_WRITES_STARTED] += 1

    def end_update(self) -> None:
        with self._write_lock():
            self.clock[hm.CLOCK_WRITES_FINISHED] += 1

    def write(self, keys: np.ndarray, rows: np.ndarray, *, insert_new: bool,
              unless_updated_since: int | None = None) -> np.ndarray | None:
        """Upsert rows (insert_new) or overwrite only held keys; returns a status code per key.

        With `unless_updated_since`, writes nothing (returns None) if a write began after that token.
        """
        h = self.handle
        stored = to_storage(rows, h.dtype, h.name)
        order, starts = self._group_by_partition(keys)
        status = np.empty(keys.size, dtype=np.int8)
        with self._write_lock():
            if unless_updated_since is not None and (
                unless_updated_since < 0 or self.clock[hm.CLOCK_WRITES_STARTED] != unless_updated_since
            ):
                return None
            hm.write_kernel(
                self.clock, self.part, self.slots, self.rec, self.free, self.values, keys, stored, order,
                starts, status, h.num_slots, h.capacity, h.words, self._offset, h.policy, h.keep, insert_new,
            )
        return status

    def evict(self, keys: np.ndarray) -> int:
        h = self.handle
        order, starts = self._group_by_partition(keys)
        removed = np.zeros(keys.size, dtype=np.bool_)
        with self._write_lock():
            hm.evict_kernel(
                self.part, self.slots, self.rec, self.free, keys, order, starts, removed,
                h.num_slots, h.capacity, h.words,
            )
        return int(removed.sum())

    # --- introspection ---

    def stats(self) -> TierTableStats:
        part = self.part
        return TierTableStats(
            rows=int(part[:, hm.P_SIZE].sum()),
            capacity_rows=self.handle.capacity * self.handle.num_partitions,
            evictions=int(part[:, hm.P_EVICTIONS].sum()),
            rejected=int(part[:, hm.P_REJECTED].sum()),
        )

    def held_keys(self) -> np.ndarray:
        return hm.held_keys(self.part, self.slots, self.handle.num_slots)

    def close(self) -> None:
        if not hasattr(self, "rec"):  # closed already (the map itself may stay open while a caller holds a view)
            return
        # numpy views keep the mmap's buffer exported; drop them before closing the map.
        for attr in ("clock", "part", "slots", "free", "rec", "values"):
            delattr(self, attr)
        with contextlib.suppress(BufferError):  # a caller still holds a view; the pages go when it does
            self._map.close()
        if self._fd is not None:
            os.close(self._fd)
            if self._owner:
                self._unlink_at_exit()

    # --- helpers ---

    def _write_lock(self) -> _TableWriteLock:
        return _TableWriteLock(self._thread_lock, self._fd)

    def _group_by_partition(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        partitions = hm.partitions_of(keys, self.handle.num_partitions)
        order = np.argsort(partitions, kind="stable")
        counts = np.bincount(partitions, minlength=self.handle.num_partitions)
        starts = np.zeros(self.handle.num_partitions + 1, dtype=np.int64)
        np.cumsum(counts, out=starts[1:])
        return order, starts


class _TableWriteLock:
    """Excludes other threads (thread lock) and other processes (flock, when shared) from writing one table."""

    def __init__(self, thread_lock: threading.Lock, fd: int | None) -> None:
        self._thread_lock, self._fd = thread_lock, fd

    def __enter__(self) -> None:
        self._thread_lock.acquire()
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._thread_lock.release()


def remove_stale_files(shm_dir: Path) -> None:
    """Delete tables left by owners that were killed (their pid is in the file name and no longer runs)."""
    for path in shm_dir.glob("recserve-*-*"):
        pid = path.name.split("-")[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            log.warning("dram: removing %s, left by process %s, which has exited", path, pid)
            path.unlink(missing_ok=True)


class DramTier:
    """The DRAM tier of the parameter server: a `DramTable` per table."""

    name = "dram"

    def __init__(self, tables: dict[str, DramTable]) -> None:
        self._tables = tables
        self._groups: dict[tuple[str, ...], _TableGroup] = {}  # tables pooled in one call, by their names
        # the most keys of a table that go into such a call: a batch for the fused kernel too small for its
        # parallel version
        self._one_call_limits = {
            name: limit for name, table in tables.items()
            if (limit := min(hm.PARALLEL_MIN_KEYS - 1, table.max_fused_keys)) > 0
        }
        # A call takes every table's rows in one typed list, of one array type: float32 and bfloat16 tables go
        # in separate calls. Known here, so that a tier of one row type (the usual) pays nothing per query.
        self._one_call_dtypes = {name: tables[name].handle.dtype for name in self._one_call_limits}
        self._mixed_dtypes = len(set(self._one_call_dtypes.values())) > 1

    @classmethod
    def create(cls, tables: list[TableConfig], config: DramTierConfig) -> DramTier:
        if config.shared_memory:
            remove_stale_files(config.shm_dir)
        run = f"recserve-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        created: dict[str, DramTable] = {}
        try:
            for table in tables:
                path = str(config.shm_dir / f"{run}-{table.name}") if config.shared_memory else ""
                created[table.name] = DramTable(plan_table(table, config, path), create=True)
        except BaseException:
            for made in created.values():
                made.close()
            raise
        return cls(created)

    @classmethod
    def attach(cls, handles: list[DramTableHandle]) -> DramTier:
        """Map tables another process created (the handles come from its `handles()`)."""
        return cls({h.name: DramTable(h, create=False) for h in handles})

    def handles(self) -> list[DramTableHandle]:
        return [table.handle for table in self._tables.values()]

    def table(self, name: str) -> DramTable:
        try:
            return self._tables[name]
        except KeyError:
            raise NotFoundError(f"dram: unknown table '{name}'") from None

    def lookup(self, table: str, keys: np.ndarray) -> LookupResult:
        return self.table(table).lookup(keys)

    def lookup_pooled(self, table: str, keys: np.ndarray, offsets: np.ndarray) -> PooledResult:
        return self.table(table).lookup_pooled(keys, offsets)

    def lookup_pooled_tables(self, tables: Sequence[str], keys: Sequence[np.ndarray],
                             offsets: Sequence[np.ndarray]) -> list[PooledResult]:
        """`lookup_pooled` of each table in turn, with the small batches of the fused kernel all in one call."""
        limits = self._one_call_limits
        together = [i for i, (name, k) in enumerate(zip(tables, keys, strict=True))
                    if name in limits and k.size <= limits[name]]
        if len(together) == len(tables) > 1 and not self._mixed_dtypes:  # the usual case: a model's small query
            return self._group(tuple(tables)).lookup(keys, offsets)
        calls: dict[str, list[int]] = {}
        for i in together:
            calls.setdefault(self._one_call_dtypes[tables[i]], []).append(i)
        results: list[PooledResult | None] = [None] * len(tables)
        for call in calls.values():
            if len(call) > 1:
                group = self._group(tuple(tables[i] for i in call))
                for i, result in zip(call, group.lookup([keys[i] for i in call], [offsets[i] for i in call]),
                                     strict=True):
                    results[i] = result
        for i, name in enumerate(tables):
            if results[i] is None:
                results[i] = self.lookup_pooled(name, keys[i], offsets[i])
        return results  # type: ignore[return-value]

    def _group(self, names: tuple[str, ...]) -> _TableGroup:
        group = self._groups.get(names)
        if group is None:  # a model asks for the same tables query after query: built once
            group = self._groups[names] = _TableGroup([self._tables[name] for name in names])
        return group

    def insert(self, table: str, keys: np.ndarray, rows: np.ndarray, *, unless_updated_since: int | None = None
               ) -> None:
        target = self.table(table)
        check_rows(table, rows, keys.size, target.handle.dim)
        target.write(keys, rows, insert_new=True, unless_updated_since=unless_updated_since)

    def update_token(self, table: str) -> int:
        return self.table(table).update_token()

    def begin_update(self, table: str) -> None:
        self.table(table).begin_update()

    def end_update(self, table: str) -> None:
        self.table(table).end_update()

    def update(self, table: str, keys: np.ndarray, rows: np.ndarray) -> int:
        target = self.table(table)
        check_rows(table, rows, keys.size, target.handle.dim)
        return int((target.write(keys, rows, insert_new=False) == hm.UPDATED).sum())

    def evict(self, table: str, keys: np.ndarray) -> int:
        return self.table(table).evict(keys)

    def stats(self) -> dict[str, TierTableStats]:
        return {name: table.stats() for name, table in self._tables.items()}

    def close(self) -> None:
        self._groups.clear()  # their lists hold views of the tables' maps, which cannot close while they live
        for table in self._tables.values():
            table.close()


class _TableGroup:
    """Tables whose small pooled batches one compiled call reads (`hm.pooled_lookup_tables_kernel`): each
    array of each table in a numba list, built once, so a call hands over five lists instead of five arrays a
    table (numba checks the type of every argument on every call, ~0.3 us an array)."""

    def __init__(self, tables: list[DramTable]) -> None:
        self.clocks = typed.List([t.clock for t in tables])
        self.parts = typed.List([t.part for t in tables])
        self.slots = typed.List([t.slots for t in tables])
        self.recs = typed.List([t.rec for t in tables])
        self.values = typed.List([t.values for t in tables])
        self.geometry = np.array([
            (t.handle.num_slots, t.handle.words, t._offset, t.handle.policy == hm.POLICY_LFU, t.handle.dim)
            for t in tables
        ], dtype=np.int64)
        self.dims = self.geometry[:, 4].tolist()  # as Python ints: the per-query arithmetic stays in Python

    def lookup(self, keys: Sequence[np.ndarray], offsets: Sequence[np.ndarray]) -> list[PooledResult]:
        # Plain Python over the per-table sizes: a numpy call costs a microsecond or more whatever its size,
        # and this runs once per table per query.
        key_counts = [k.size for k in keys]
        bags = [o.size - 1 for o in offsets]
        key_starts = list(accumulate(key_counts, initial=0))
        offset_starts = list(accumulate((b + 1 for b in bags), initial=0))
        out_starts = list(accumulate((b * d for b, d in zip(bags, self.dims, strict=True)), initial=0))
        out = np.zeros(out_starts[-1], dtype=np.float32)
        found = np.empty(key_starts[-1], dtype=np.bool_)
        missing = np.empty(len(key_counts), dtype=np.int64)
        hm.pooled_lookup_tables_kernel(
            self.clocks, self.parts, self.slots, self.recs, self.values, self.geometry, np.concatenate(keys),
            np.array(key_starts, dtype=np.int64), np.concatenate(offsets), np.array(offset_starts, dtype=np.int64),
            out, np.array(out_starts, dtype=np.int64), found, missing,
        )
        return [
            PooledResult(out[out_starts[t] : out_starts[t + 1]].reshape(bags[t], dim),
                         np.flatnonzero(~found[key_starts[t] : key_starts[t + 1]]) if lost else _NO_POSITIONS,
                         key_counts[t] - lost)
            for t, (dim, lost) in enumerate(zip(self.dims, missing.tolist(), strict=True))
        ]
