"""`recserve demo`: import a synthetic power-law table into RocksDB, put a DRAM tier in front, and measure.

Runs on embedded defaults only (a temporary RocksDB folder, shared memory), no external server.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from recserve.config import DramTierConfig, PSConfig, RocksTierConfig, TableConfig
from recserve.ps.server import HierarchicalPS
from recserve.synthetic import ZipfKeys, random_rows

BATCH = 65_536


def run_demo(rows: int, dim: int, dram_fraction: float, batches: int, store: Path | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="recserve-demo-") as scratch:
        path = store or Path(scratch) / "store"
        capacity = max(1, int(rows * dram_fraction))
        table = TableConfig(name="items", dim=dim, dram_capacity_rows=capacity)
        config = PSConfig(
            tables=[table], dram=DramTierConfig(num_partitions=8), rocksdb=RocksTierConfig(path=path)
        )
        print(f"recserve demo: table 'items' = {rows:,} rows x {dim} float32 "
              f"({rows * dim * 4 / 2**20:,.0f} MiB), DRAM tier holds {dram_fraction:.0%} ({capacity:,} rows)")
        with HierarchicalPS.from_config(config) as ps:
            keys = np.arange(rows, dtype=np.int64)
            values = random_rows(rows, dim, seed=1)
            started = time.perf_counter()
            with tqdm(total=rows, unit="rows", desc="import (SST ingestion)") as bar:
                ps.import_table("items", keys, values, bar.update)
            import_s = time.perf_counter() - started
            summary = _measure(ps, ZipfKeys(rows, alpha=1.05, seed=2), batches, values)
        summary["import_rows_per_s"] = rows / import_s
        _print_summary(summary, path if store else "a temporary folder, removed on exit")
        return summary


def _measure(ps: HierarchicalPS, zipf: ZipfKeys, batches: int, values: np.ndarray) -> dict:
    latencies = []
    checked = 0
    for _ in tqdm(range(batches), unit="batch", desc=f"lookups (Zipf 1.05, {BATCH:,} keys)"):
        batch = zipf.sample(BATCH)
        started = time.perf_counter()
        out = ps.lookup_numpy("items", batch)
        latencies.append(time.perf_counter() - started)
        if not np.array_equal(out, values[batch]):  # exact lookups: every row is the imported one
            raise AssertionError("demo: a lookup returned a row that differs from the imported table")
        checked += batch.size
    stats = ps.stats().tables["items"]
    dram, rocks = stats.tiers["dram"], stats.tiers["rocksdb"]
    steady = np.array(latencies[len(latencies) // 2 :])  # second half: the DRAM tier is warm
    return {
        "keys_checked": checked,
        "dram_hit_rate": dram.hits / max(1, dram.hits + dram.misses),
        "unique_key_fraction": stats.unique_keys / max(1, stats.keys),
        "rocksdb_reads": rocks.hits + rocks.misses,
        "dram_evictions": dram.held.evictions,
        "warm_keys_per_s": BATCH * steady.size / steady.sum(),
        "warm_p50_ms": float(np.percentile(steady, 50) * 1e3),
        "warm_p99_ms": float(np.percentile(steady, 99) * 1e3),
    }


def _print_summary(s: dict, path: Path | str) -> None:
    print()
    print("lookup summary (every returned row checked against the imported table)")
    print(f"  import                     {s['import_rows_per_s']:>14,.0f} rows/s")
    print(f"  keys looked up             {s['keys_checked']:>14,}")
    print(f"  unique keys per batch      {s['unique_key_fraction']:>14.1%}")
    print(f"  DRAM tier hit rate         {s['dram_hit_rate']:>14.1%}   (of unique keys)")
    print(f"  RocksDB reads              {s['rocksdb_reads']:>14,}")
    print(f"  DRAM evictions             {s['dram_evictions']:>14,}")
    print(f"  warm lookups               {s['warm_keys_per_s']:>14,.0f} keys/s")
    print(f"  warm batch latency         p50 {s['warm_p50_ms']:.1f} ms, p99 {s['warm_p99_ms']:.1f} ms")
    print(f"  store                      {path}")
