"""The one interface every storage level implements, so that backends swap freely (as HPS's database backends).

A tier maps (table, int64 key) -> row. Keys reaching a tier are already validated, 1-D int64 and unique; rows
are float32 [n, dim] whatever the tier stores. The hierarchical PS asks the tiers fastest first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np

from recserve.errors import InvalidInputError


@dataclass(frozen=True, slots=True)
class LookupResult:
    rows: np.ndarray  # [num_keys, dim] float32; rows where found is False hold garbage
    found: np.ndarray  # [num_keys] bool


class PooledResult(NamedTuple):  # a tuple: made per table per query, where a dataclass costs 3x the time
    pooled: np.ndarray  # [num_bags, dim] float32: each bag's found rows, summed
    missing: np.ndarray  # positions of the keys not found, increasing
    hits: int  # keys read and found: distinct keys if the tier deduplicated them, else every occurrence


@dataclass(frozen=True, slots=True)
class TierTableStats:
    """What a tier holds of one table and what its capacity policy did."""

    rows: int
    capacity_rows: int | None = None  # None: unbounded (the persistent tier)
    evictions: int = 0
    rejected: int = 0


@runtime_checkable
class Tier(Protocol):
    name: str

    def lookup(self, table: str, keys: np.ndarray) -> LookupResult:
        """Rows of the keys this tier holds, and which those are."""
        ...

    def insert(self, table: str, keys: np.ndarray, rows: np.ndarray, *, unless_updated_since: int | None = None
               ) -> None:
        """Insert or overwrite rows (a bounded tier may evict others, or refuse, by its policy).

        With `unless_updated_since` (a token from `update_token`), do nothing if a write began since: that is how
        rows read from a slower tier are promoted without overwriting a newer row written meanwhile.
        """
        ...

    def update_token(self, table: str) -> int | None:
        """A token for a later conditional insert; None where no write can race a promotion."""
        ...

    def begin_update(self, table: str) -> None:
        """A write of this table, through to the slower tiers, is starting; promotions must wait it out."""
        ...

    def end_update(self, table: str) -> None:
        ...

    def update(self, table: str, keys: np.ndarray, rows: np.ndarray) -> int:
        """Overwrite the rows of keys this tier already holds; returns how many it held."""
        ...

    def evict(self, table: str, keys: np.ndarray) -> int:
        """Drop keys; returns how many were held."""
        ...

    def stats(self) -> dict[str, TierTableStats]:
        ...

    def close(self) -> None:
        ...


class ReadOnlyTier:
    """A view of tiers that someone else owns and writes (a worker's pipe to the serving process, the serving
    process's view of the tiers below its DRAM tier): every write refused with `refusal()`, nothing promoted into
    it, nothing held of its own to report. Subclasses give `name`, `lookup`, `close` and `refusal`."""

    name: str

    def insert(self, table: str, keys: np.ndarray, rows: np.ndarray, *, unless_updated_since: int | None = None
               ) -> None:
        raise self.refusal()

    def update_token(self, table: str) -> int | None:
        return None

    def begin_update(self, table: str) -> None:
        raise self.refusal()

    def end_update(self, table: str) -> None:
        raise self.refusal()

    def update(self, table: str, keys: np.ndarray, rows: np.ndarray) -> int:
        raise self.refusal()

    def evict(self, table: str, keys: np.ndarray) -> int:
        raise self.refusal()

    def stats(self) -> dict[str, TierTableStats]:
        return {}  # what the tiers behind it hold, their owner reports

    def refusal(self) -> Exception:
        raise NotImplementedError


def check_rows(table: str, rows: np.ndarray, num_keys: int, dim: int) -> None:
    """Rows written to a tier must be a real-valued [num_keys, dim] array."""
    if not isinstance(rows, np.ndarray):
        raise InvalidInputError(f"table '{table}': rows must be a numpy array, got {type(rows).__name__}")
    if rows.dtype.kind != "f":
        raise InvalidInputError(f"table '{table}': rows must be floating point, got dtype {rows.dtype}")
    if rows.shape != (num_keys, dim):
        raise InvalidInputError(
            f"table '{table}': rows must have shape ({num_keys}, {dim}) for {num_keys} keys, got {rows.shape}"
        )


@runtime_checkable
class PoolingTier(Protocol):
    """A tier that can also look up and pool in one pass (the DRAM tier): the PS then skips deduplicating
    whatever this tier holds, and sends only its misses down the other tiers."""

    def lookup_pooled(self, table: str, keys: np.ndarray, offsets: np.ndarray) -> PooledResult:
        """Per bag keys[offsets[b]:offsets[b + 1]], the sum of the rows this tier holds; where the others are."""
        ...

    def lookup_pooled_tables(self, tables: Sequence[str], keys: Sequence[np.ndarray],
                             offsets: Sequence[np.ndarray]) -> list[PooledResult]:
        """`lookup_pooled` of each table, in one pass where the tier can."""
        ...
