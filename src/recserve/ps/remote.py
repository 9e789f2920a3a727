"""A tier that lives in another process, reached over a pipe: how worker processes read the persistent tier.

The serving process owns the read-write RocksDB store (one process may open it for writing). Workers attach the
shared-memory DRAM tier directly and send only its misses here; `serve_lookups` answers them from the owner's
tier. Workers never write through this view: rows found below are promoted into the DRAM tier (shared memory)
by the worker itself, and every write of the model goes through the owner's HierarchicalPS.
"""

from __future__ import annotations

import threading
from multiprocessing.connection import Connection

import numpy as np

from recserve.errors import RecserveError, TierUnavailableError
from recserve.ps.tiers import LookupResult, ReadOnlyTier, Tier


class RemoteTier(ReadOnlyTier):
    """The worker side: `lookup` asks the owning process; writes are refused (they go through the owner)."""

    def __init__(self, name: str, connection: Connection) -> None:
        self.name = name
        self._connection = connection
        self._lock = threading.Lock()  # one request in flight per pipe

    def lookup(self, table: str, keys: np.ndarray) -> LookupResult:
        with self._lock:
            try:
                self._connection.send((table, keys))
                ok, payload = self._connection.recv()
            except (EOFError, OSError) as error:
                raise TierUnavailableError(self.name, f"the owning process is gone: {error}") from None
        if not ok:
            raise TierUnavailableError(self.name, payload)
        rows, found = payload
        return LookupResult(rows=rows, found=found)

    def close(self) -> None:
        self._connection.close()

    def refusal(self) -> Exception:
        return TierUnavailableError(self.name, "read-only view from a worker: write through the owning process")


def serve_lookups(tier: Tier, connection: Connection) -> None:
    """Answer a RemoteTier's lookups from `tier` until the other end closes. Errors travel back as messages."""
    while True:
        try:
            table, keys = connection.recv()
        except (EOFError, OSError):
            return
        try:
            result = tier.lookup(table, keys)
            reply: tuple[bool, object] = (True, (result.rows, result.found))
        except RecserveError as error:
            reply = (False, str(error))
        try:
            connection.send(reply)
        except (BrokenPipeError, OSError):
            return
