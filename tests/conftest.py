"""Shared builders for the tests: configs, parameter servers and rows that are easy to check."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings

from recserve.config import DramTierConfig, PSConfig, RocksTierConfig, RowDtype, TableConfig
from recserve.ps.server import HierarchicalPS

# The first example of a test may compile numba kernels (seconds on a fresh clone): no per-example deadline.
settings.register_profile("recserve", deadline=None)
settings.load_profile("recserve")


def make_table(name: str = "t", dim: int = 8, **fields: object) -> TableConfig:
    return TableConfig(name=name, dim=dim, **fields)


def make_ps_config(store: Path, tables: list[TableConfig], *, dram: bool = True, partitions: int = 4,
                   target: float = 0.8) -> PSConfig:
    return PSConfig(
        tables=tables,
        dram=DramTierConfig(enabled=dram, num_partitions=partitions, overflow_resolution_target=target),
        rocksdb=RocksTierConfig(path=store, block_cache_bytes=8 << 20),
    )


def rows_for(keys: np.ndarray, dim: int, version: int = 0) -> np.ndarray:
    """Rows whose values encode (key, version, column): any mix-up shows."""
    keys = np.asarray(keys, dtype=np.int64)
    cols = np.arange(dim, dtype=np.float64)
    return (keys[:, None] * 1000.0 + version * 10.0 + cols[None, :] / 100.0).astype(np.float32)


def cast_through(rows: np.ndarray, dtype: str) -> np.ndarray:
    """What a table of this dtype must give back for float32 rows: torch's own cast there and back."""
    narrow = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    return torch.tensor(rows).to(narrow).to(torch.float32).numpy()


def replay_against_dict(ps: object, table: str, ops: list, dim: int) -> dict[int, np.ndarray]:
    """Run (kind, keys) ops on a PS, checking after each that a lookup answers like a dict of the last rows
    written; kind is insert, update, lookup, or evict (from the PS's first tier). Returns the dict."""
    reference: dict[int, np.ndarray] = {}
    for step, (kind, keys) in enumerate(ops):
        keys_arr = np.asarray(keys, dtype=np.int64)
        rows = rows_for(keys_arr, dim, version=step)
        if kind in ("insert", "update"):
            getattr(ps, kind)(table, keys_arr, rows)
            reference.update(zip(keys, rows, strict=True))
        elif kind == "evict":
            ps.tiers[0].evict(table, np.unique(keys_arr))
        out = ps.lookup(table, keys_arr).numpy()
        np.testing.assert_array_equal(out, np.stack([reference.get(k, np.zeros(dim, np.float32)) for k in keys]))
    return reference


@pytest.fixture
def ps(tmp_path: Path) -> Iterator[HierarchicalPS]:
    """A PS with one 8-dim table 't': DRAM tier of 16 rows in front of RocksDB."""
    config = make_ps_config(tmp_path / "store", [make_table(dram_capacity_rows=16)], partitions=2)
    with HierarchicalPS.from_config(config) as server:
        yield server


def reference_model(folder: Path, dtype: RowDtype = "float32") -> tuple:  # -> (RecModel, HierarchicalPS)
    """The model of a repository folder loaded in-process (private DRAM tier, no workers, rows stored as dtype):
    the scores a served model must reproduce."""
    from recserve.models import table_configs
    from recserve.models.checkpoint import checkpoint_spec, load_checkpoint

    spec = checkpoint_spec(folder)
    tables = table_configs(spec, dtype=dtype)
    config = PSConfig(tables=tables, dram=DramTierConfig(num_partitions=2, shared_memory=False),
                      rocksdb=RocksTierConfig(enabled=False))
    ps = HierarchicalPS.from_config(config)
    return load_checkpoint(folder, ps), ps


def v2_inputs(spec: object, dense: object, sparse: object) -> dict[str, np.ndarray]:
    """A query as the served model's named inputs: <table>_keys, <table>_lengths, dense."""
    from recserve.loadgen.workload import Query, as_v2_arrays

    return as_v2_arrays(spec, Query(dense=None if dense is None else np.asarray(dense), sparse=sparse))  # type: ignore[arg-type]


class RedisServer:
    """A real redis-server on loopback, which a test may stop and start again on the same port."""

    def __init__(self, folder: Path) -> None:
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is missing: `make test` installs it (Debian package redis-server)")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._folder = folder
        self._process: subprocess.Popen | None = None

    def start(self, *options: str) -> None:
        import redis

        self._process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self._folder), *options], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self._process.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.kill()
            self._process.wait()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for a module's tests (hypothesis examples flush it as they start)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


def wait_for(condition: object, timeout_s: float = 20.0, what: str = "condition") -> None:
    """Polls condition() until true; fails the test naming what it waited for."""
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.01)
