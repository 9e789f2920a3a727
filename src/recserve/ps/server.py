"""HierarchicalPS: exact embedding lookups across tiers, fastest first, as HugeCTR's HPS.

lookup(table, keys):
    keys --dedupe--> unique keys --cache--> misses --DRAM--> misses --RocksDB--> misses --> default row
                                 <--- rows found in a slower tier are promoted into every faster one
    rows[inverse] -> Tensor [len(keys), dim]

The device cache (when configured) takes its promotions as HPS does: a batch whose cache hit rate reaches the
table's threshold inserts its misses in the background, one below it before answering. Either way the answer
is exact; only with `hps_compat_default_on_miss` does a batch over the threshold answer its cache misses with
the default row and fetch them in the background (HPS's behaviour: faster, inexact until the fill lands).

Exact: a key present in any tier returns its row. Writes go to the slowest tier (the full copy) first: a
crash between tiers can leave a faster tier without the new row (it is then read from below), never with a
row the persistent copy lacks.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from recserve.config import PSConfig, TableConfig
from recserve.errors import InvalidInputError, NotFoundError
from recserve.ps.cache import CacheTier
from recserve.ps.keys import as_keys, unique_inverse
from recserve.ps.pooling import add_to_bags, as_offsets
from recserve.ps.tiers import (
    LookupResult,
    PooledResult,
    PoolingTier,
    ReadOnlyTier,
    Tier,
    TierTableStats,
    check_rows,
)
from recserve.stats import HistogramSnapshot, LatencyHistogram

# a pooled lookup of this many tables or more goes to their first tier in one call (`lookup_pooled_tables`); for
# fewer, gathering them saves little (NCF's four tables, one key each, gathered: 0.90-0.93x the items/s in runs
# minutes apart, within this machine's noise but no gain)
ONE_CALL_MIN_TABLES = 6

if TYPE_CHECKING:
    from recserve.ps.rocks import RocksTier


@dataclass(frozen=True, slots=True)
class TierView:
    """One tier's view of one table: what it answered and what it holds."""

    hits: int
    misses: int
    latency: HistogramSnapshot
    held: TierTableStats


@dataclass(frozen=True, slots=True)
class TableStats:
    lookups: int
    keys: int
    unique_keys: int
    not_found: int  # unique keys no tier held: answered with the default row
    tiers: dict[str, TierView]


@dataclass(frozen=True, slots=True)
class LookupCounts:
    """A table's lookup counters alone: cheap to take and to send between processes."""

    lookups: int
    keys: int
    unique_keys: int
    not_found: int
    hits: dict[str, int]  # per tier name
    misses: dict[str, int]


@dataclass(frozen=True, slots=True)
class PSStats:
    tables: dict[str, TableStats]


@dataclass(slots=True)
class _Counters:
    lookups: int = 0
    keys: int = 0
    unique_keys: int = 0
    not_found: int = 0
    hits: dict[str, int] = field(default_factory=dict)
    misses: dict[str, int] = field(default_factory=dict)
    latency: dict[str, LatencyHistogram] = field(default_factory=dict)


class HierarchicalPS:
    """The parameter server of one node. Thread-safe; tiers are shared by every caller."""

    def __init__(self, tables: list[TableConfig], tiers: list[Tier]) -> None:
        if not tiers:
            raise InvalidInputError("a parameter server needs at least one tier")
        self.tiers = tiers
        self._tables = {t.name: t for t in tables}
        # the tiers that hold each table: all of them, less a cache that leaves the table out
        self._tiers_of = {
            t.name: [tier for tier in tiers if not isinstance(tier, CacheTier) or tier.caches(t.name)]
            for t in tables
        }
        # the first tier of each table when it can look up and pool in one pass (see lookup_pooled)
        self._pooling_tier_of = {
            name: held[0] if held and isinstance(held[0], PoolingTier) else None
            for name, held in self._tiers_of.items()
        }
        self._defaults = {t.name: t.default_row() for t in tables}
        self._counters = {t.name: self._new_counters() for t in tables}
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: PSConfig) -> HierarchicalPS:
        """Device cache, DRAM tier, Redis, RocksDB, as enabled in the config."""
        from recserve.ps.dram import DramTier
        from recserve.ps.redis import RedisTier
        from recserve.ps.rocks import RocksTier

        tiers: list[Tier] = []
        try:
            if config.cache.enabled:
                tiers.append(CacheTier.create(config.tables, config.cache, config.dram))
            if config.dram.enabled:
                tiers.append(DramTier.create(config.tables, config.dram))
            if config.redis.enabled:
                tiers.append(RedisTier(config.redis, config.tables))
            if config.rocksdb.enabled:
                tiers.append(RocksTier(config.rocksdb, config.tables))
        except BaseException:
            for tier in tiers:
                tier.close()
            raise
        return cls(config.tables, tiers)

    @property
    def tables(self) -> dict[str, TableConfig]:
        return dict(self._tables)

    def table(self, name: str) -> TableConfig:
        try:
            return self._tables[name]
        except KeyError:
            known = ", ".join(sorted(self._tables)) or "none"
            raise NotFoundError(f"unknown table '{name}' (known: {known})") from None

    # --- reads ---

    def lookup(self, table: str, keys: object) -> torch.Tensor:
        """Rows of keys, [len(keys), dim] float32; keys in no tier get the table's default row."""
        return torch.from_numpy(self.lookup_numpy(table, keys))

    def lookup_numpy(self, table: str, keys: object, *, assume_unique: bool = False) -> np.ndarray:
        """As `lookup`, as a numpy array. `assume_unique`: the caller already deduplicated the keys."""
        spec = self.table(table)
        keys = as_keys(keys, table)
        if keys.size == 0:
            return np.empty((0, spec.dim), dtype=np.float32)
        if assume_unique:
            unique, inverse = keys, None
        else:
            unique, inverse = unique_inverse(keys)
        rows = self._lookup_unique(table, unique)
        with self._lock:
            counters = self._counters[table]
            counters.lookups += 1
            counters.keys += keys.size
            counters.unique_keys += unique.size
        # unique keys come in order of first appearance: with no repeats, rows are already in key order
        return rows if inverse is None or unique.size == keys.size else rows[inverse]

    def lookup_pooled(self, table: str, keys: object, offsets: object, mode: str = "sum") -> np.ndarray:
        """Rows of each bag keys[offsets[b]:offsets[b + 1]] pooled ("sum" or "mean"), [len(offsets) - 1, dim].

        Equal to pooling `lookup`'s rows, and faster: a first tier that can pool (the DRAM tier) looks up
        and sums in one pass, deduplicating only where that pays; its misses are deduplicated and read as
        `lookup` reads keys, through every tier again from the first (a row promoted meanwhile is found there;
        the first tier counts them as its misses), and promoted. Where it did not deduplicate, its hits count
        once per occurrence in `unique_keys` and its hit counter.
        """
        return self.lookup_pooled_tables([table], [keys], [offsets], mode)[0]

    def lookup_pooled_tables(self, tables: Sequence[str], keys: Sequence[object], offsets: Sequence[object],
                             mode: str = "sum") -> list[np.ndarray]:
        """`lookup_pooled` of several tables (keys[i] and offsets[i] of tables[i]), in that order. From
        ONE_CALL_MIN_TABLES tables on, their first tier pools them in one pass where it can: the DRAM tier reads
        the small batches of all of them in one compiled call (a 1-item query of a model with many tables then
        costs little else)."""
        if mode not in ("sum", "mean"):
            raise InvalidInputError(f"pooling mode must be 'sum' or 'mean', got {mode!r}")
        if not len(tables) == len(keys) == len(offsets):
            raise InvalidInputError(f"{len(tables)} tables, {len(keys)} key arrays and {len(offsets)} offset "
                                    "arrays: one of each per table")
        for table in tables:
            if table not in self._tables:
                self.table(table)  # NotFoundError naming the known ones
        checked = [as_keys(k, t) for k, t in zip(keys, tables, strict=True)]
        bags = [as_offsets(o, k.size, t) for o, k, t in zip(offsets, checked, tables, strict=True)]
        if len(tables) < ONE_CALL_MIN_TABLES:
            first = [self._pool_in_first_tier(t, k, o) for t, k, o in zip(tables, checked, bags, strict=True)]
        else:
            first = self._pool_in_first_tiers(tables, checked, bags)
        results, uniques = [], []
        for table, table_keys, table_bags, ((pooled, missing, _), _) in zip(tables, checked, bags, first,
                                                                             strict=True):
            unique = missing
            if missing.size:
                unique, inverse = unique_inverse(table_keys[missing])
                add_to_bags(pooled, table_bags, missing, self._lookup_unique(table, unique), inverse)
            if mode == "mean":
                pooled /= np.maximum(np.diff(table_bags), 1)[:, None]
            results.append(pooled)
            uniques.append(unique.size)
        with self._lock:
            for table, table_keys, unique_count, ((_, _, hits), spent) in zip(tables, checked, uniques, first,
                                                                                 strict=True):
                counters = self._counters[table]
                counters.lookups += 1
                counters.keys += table_keys.size
                counters.unique_keys += unique_count + hits  # the first tier's hits, and what went below it
                tier = self._pooling_tier_of[table]
                if tier is not None:
                    counters.hits[tier.name] += hits  # its misses count when read through below
                    counters.latency[tier.name].record(spent)
        return results

    def _pool_in_first_tier(self, table: str, keys: np.ndarray, offsets: np.ndarray
                            ) -> tuple[PooledResult, float]:
        """What the table's first tier pooled (the rows it holds summed, where the other keys are; all of them
        when that tier cannot pool), and the seconds it took."""
        tier = self._pooling_tier_of[table]
        if tier is None:
            zeros = np.zeros((offsets.size - 1, self._tables[table].dim), dtype=np.float32)
            return PooledResult(zeros, np.arange(keys.size), 0), 0.0
        started = time.perf_counter()
        result = tier.lookup_pooled(table, keys, offsets)
        return result, time.perf_counter() - started

    def _pool_in_first_tiers(self, tables: Sequence[str], keys: list[np.ndarray], offsets: list[np.ndarray]
                             ) -> list[tuple[PooledResult, float]]:
        """`_pool_in_first_tier` of each table, those with the same first tier in one call to it; each is
        charged its share of that call's time, by keys."""
        results: list[tuple[PooledResult, float] | None] = [None] * len(tables)
        by_tier: dict[int, tuple[PoolingTier, list[int]]] = {}
        for i, table in enumerate(tables):
            tier = self._pooling_tier_of[table]
            if tier is None:
                results[i] = self._pool_in_first_tier(table, keys[i], offsets[i])
            else:
                by_tier.setdefault(id(tier), (tier, []))[1].append(i)
        for tier, members in by_tier.values():
            started = time.perf_counter()
            pooled = tier.lookup_pooled_tables([tables[i] for i in members], [keys[i] for i in members],
                                               [offsets[i] for i in members])
            per_key = (time.perf_counter() - started) / max(1, sum(keys[i].size for i in members))
            for i, result in zip(members, pooled, strict=True):
                results[i] = result, per_key * keys[i].size
        return results  # type: ignore[return-value]

    def lookup_found(self, table: str, keys: np.ndarray) -> LookupResult:
        """Rows of unique int64 keys and which any tier held, without default rows (what a faster tier above
        this PS needs: see `ReadThrough`)."""
        tiers = self._tiers_of[table]
        rows, pending = self._read_through(table, keys, tiers, [tier.update_token(table) for tier in tiers])
        found = np.ones(keys.size, dtype=bool)
        found[pending] = False
        return LookupResult(rows, found)

    def _lookup_unique(self, table: str, keys: np.ndarray) -> np.ndarray:
        tiers = self._tiers_of[table]
        # taken before any read: a promotion lands only if no write-through began since (else it could put back
        # a row that a concurrent update has just replaced below)
        tokens = [tier.update_token(table) for tier in tiers]
        rows, pending = self._read_through(table, keys, tiers, tokens)
        if pending.size:
            rows[pending] = self._defaults[table]
            with self._lock:
                self._counters[table].not_found += pending.size
        return rows

    def _read_through(self, table: str, keys: np.ndarray, tiers: list[Tier], tokens: list
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Rows of keys from the fastest tier holding each, and the positions no tier held (their rows: garbage)."""
        counters = self._counters[table]
        rows: np.ndarray | None = None
        pending = np.arange(keys.size)
        cache_later = False  # the batch hit the cache well enough to fill it off the request's path
        for level, tier in enumerate(tiers):
            started = time.perf_counter()
            result = tier.lookup(table, keys[pending])
            counters.latency[tier.name].record(time.perf_counter() - started)
            num_hits = int(np.count_nonzero(result.found))
            with self._lock:
                counters.hits[tier.name] += num_hits
                counters.misses[tier.name] += pending.size - num_hits
            if rows is None and num_hits == pending.size:
                return result.rows, pending[:0]  # everything in the first tier: no copy
            if rows is None:
                rows = np.empty((keys.size, result.rows.shape[1]), dtype=np.float32)
            found_at = pending[result.found]
            rows[found_at] = result.rows[result.found]
            if level > 0 and found_at.size:
                self._promote(tiers[:level], table, keys[found_at], rows[found_at], tokens, cache_later)
            pending = pending[~result.found]
            if isinstance(tier, CacheTier):
                cache_later = num_hits >= tier.hit_rate_threshold(table) * keys.size
                if cache_later and tier.config.hps_compat_default_on_miss:
                    self._fill_cache_later(tier, table, keys[pending], tiers[1:], tokens)
                    rows[pending] = self._defaults[table]
                    return rows, pending[:0]
            if pending.size == 0:
                break
        assert rows is not None
        return rows, pending

    def _promote(self, faster: list[Tier], table: str, keys: np.ndarray, rows: np.ndarray, tokens: list,
                 cache_later: bool) -> None:
        for tier, token in zip(faster, tokens, strict=False):
            if cache_later and isinstance(tier, CacheTier):
                tier.insert_later(table, keys, rows, token)
            else:
                tier.insert(table, keys, rows, unless_updated_since=token)

    def _fill_cache_later(self, cache: CacheTier, table: str, keys: np.ndarray, below: list[Tier],
                          tokens: list) -> None:
        """HPS's inexact path: fetch the cache's misses from the tiers below in the background, then cache them."""
        if keys.size == 0 or not below:
            return

        def fill() -> None:
            rows, missing = self._read_through(table, keys, below, tokens[1:])
            found = np.ones(keys.size, dtype=bool)
            found[missing] = False
            cache.insert(table, keys[found], np.ascontiguousarray(rows[found]), unless_updated_since=tokens[0])

        cache.run_later(fill)

    # --- writes ---

    def insert(self, table: str, keys: object, rows: np.ndarray) -> None:
        """Write rows to every tier, the persistent copy first (a dynamic cache only refreshes rows it holds)."""
        keys, rows = self._checked_write(table, keys, rows)
        with self._writing_through(table):
            for tier in reversed(self._tiers_of[table]):
                if isinstance(tier, CacheTier):
                    tier.write(table, keys, rows)
                else:
                    tier.insert(table, keys, rows)

    def update(self, table: str, keys: object, rows: np.ndarray) -> None:
        """Online update: the full copy takes every row; faster tiers refresh only rows they already hold."""
        keys, rows = self._checked_write(table, keys, rows)
        *faster, last = self._tiers_of[table]
        with self._writing_through(table):
            last.insert(table, keys, rows)
            for tier in reversed(faster):
                tier.update(table, keys, rows)

    @contextlib.contextmanager
    def _writing_through(self, table: str) -> Iterator[None]:
        """Marks a write in flight on every tier, so that no lookup promotes a row read before it."""
        for tier in self.tiers:
            tier.begin_update(table)
        try:
            yield
        finally:
            for tier in self.tiers:
                tier.end_update(table)

    def import_table(
        self, table: str, keys: np.ndarray, rows: np.ndarray, progress: Callable[[int], None] | None = None
    ) -> int:
        """Replace a table's contents in the persistent tier, then drop what faster tiers held of it."""
        from recserve.ps.dram import DramTier
        from recserve.ps.redis import RedisTier

        persistent = self._persistent_tier(table, "import")
        with self._writing_through(table):
            count = persistent.import_table(table, keys, rows, progress)
            for tier in self.tiers:
                if isinstance(tier, DramTier):
                    tier.evict(table, tier.table(table).held_keys())
                elif isinstance(tier, RedisTier):
                    tier.clear(table)
                elif isinstance(tier, CacheTier):
                    tier.reload(table, keys, rows)
        return count

    def bulk_load(
        self, table: str, keys: np.ndarray, rows: np.ndarray, progress: Callable[[int], None] | None = None,
        chunk_rows: int = 1 << 20,
    ) -> None:
        """Load a whole table: an import into RocksDB where there is one, else inserts into the DRAM tier."""
        if self.has_persistent_tier:
            self.import_table(table, keys, rows, progress)
            return
        for start in range(0, keys.size, chunk_rows):
            stop = min(start + chunk_rows, keys.size)
            self.insert(table, keys[start:stop], np.asarray(rows[start:stop]))
            if progress:
                progress(stop - start)

    def export_table(self, table: str) -> tuple[np.ndarray, np.ndarray]:
        """(keys, rows) of a whole table, from the persistent tier."""
        return self._persistent_tier(table, "export").export_table(table)

    @property
    def has_persistent_tier(self) -> bool:
        from recserve.ps.rocks import RocksTier

        return any(isinstance(t, RocksTier) for t in self.tiers)

    def _persistent_tier(self, table: str, action: str) -> RocksTier:
        from recserve.ps.rocks import RocksTier

        self.table(table)
        for tier in self.tiers:
            if isinstance(tier, RocksTier):
                return tier
        raise NotFoundError(f"{action} needs the RocksDB tier, which this configuration disables")

    def _checked_write(self, table: str, keys: object, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        spec = self.table(table)
        keys = as_keys(keys, table)
        if isinstance(rows, torch.Tensor):
            rows = rows.detach().cpu().numpy()
        check_rows(table, rows, keys.size, spec.dim)
        unique, inverse = unique_inverse(keys)
        if unique.size != keys.size:  # the last row written for a key wins, as in a dict
            last = np.empty(unique.size, dtype=np.int64)
            last[inverse] = np.arange(keys.size)
            return unique, np.ascontiguousarray(rows[last], dtype=np.float32)
        return keys, np.ascontiguousarray(rows, dtype=np.float32)

    # --- stats and lifetime ---

    def stats(self) -> PSStats:
        held = {tier.name: tier.stats() for tier in self.tiers}
        tables = {}
        with self._lock:
            for name, c in self._counters.items():
                tables[name] = TableStats(
                    lookups=c.lookups, keys=c.keys, unique_keys=c.unique_keys, not_found=c.not_found,
                    tiers={
                        tier.name: TierView(
                            hits=c.hits[tier.name], misses=c.misses[tier.name],
                            latency=c.latency[tier.name].snapshot(),
                            held=held[tier.name].get(name, TierTableStats(rows=0)),
                        )
                        for tier in self.tiers
                    },
                )
        return PSStats(tables=tables)

    def counts(self) -> dict[str, LookupCounts]:
        with self._lock:
            return {
                name: LookupCounts(c.lookups, c.keys, c.unique_keys, c.not_found, dict(c.hits), dict(c.misses))
                for name, c in self._counters.items()
            }

    def reset_counts(self) -> None:
        """Zero the lookup counters and latency histograms (what the tiers hold is untouched)."""
        with self._lock:
            self._counters = {name: self._new_counters() for name in self._counters}

    def close(self) -> None:
        for tier in self.tiers:
            tier.close()

    def __enter__(self) -> HierarchicalPS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _new_counters(self) -> _Counters:
        names = [tier.name for tier in self.tiers]
        return _Counters(
            hits=dict.fromkeys(names, 0), misses=dict.fromkeys(names, 0),
            latency={n: LatencyHistogram() for n in names},
        )


class ReadThrough(ReadOnlyTier):
    """Tiers read as one, fastest first, rows found below promoted upward; writes go through the HierarchicalPS
    that owns the tiers. How the serving process answers its workers' DRAM misses from the tiers below its DRAM
    tier: Redis, then RocksDB."""

    def __init__(self, tables: list[TableConfig], tiers: list[Tier]) -> None:
        self.name = "+".join(tier.name for tier in tiers)
        self._ps = HierarchicalPS(tables, tiers)

    def lookup(self, table: str, keys: np.ndarray) -> LookupResult:
        return self._ps.lookup_found(table, keys)

    def close(self) -> None:
        pass  # the tiers are the owner's to close

    def refusal(self) -> Exception:
        return InvalidInputError(f"{self.name}: a read-only view; write through the parameter server that owns it")
