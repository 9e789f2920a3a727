"""`recserve demo`, the main job: serve RMC1, measure the static baseline, tune, report.

    1. RMC1 (`tiny` tables) with seeded weights, its tables imported into RocksDB and a DRAM tier in front that
       fills as keys are first read; queries draw keys with Zipf(1.05) popularity (a temporary repository);
    2. `recserve serve` started on free loopback ports;
    3. DeepRecSys's static baseline (each query whole, one worker with every thread) and the tuner's hill climb,
       each setting's capacity measured as the highest Poisson load whose p95 meets the target, queries of
       lognormal(5.1, 0.2) items (DeepRecSys's size distribution);
    4. the chosen (B, W, k), both capacities and their ratio, the parameter server's hit rates per tier, plots.

`recserve demo --lookups` runs the parameter-server demo instead: a 1M-row table, Zipf lookups, hit rates.
Everything runs on embedded defaults (temporary folders, shared memory, loopback), no external server.
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


def run_lookup_demo(rows: int, dim: int, dram_fraction: float, batches: int, store: Path | None) -> dict:
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


def run_serving_demo(out: Path, target_ms: float = 100.0, duration_s: float = 1.5, max_items: int = 512,
                     progress: bool = True, confirm_rounds: int = 2) -> dict:
    import os

    from recserve.config import ArrivalProcess, LoadConfig, SizeDistribution
    from recserve.loadgen.jobs import Endpoint, tune_job
    from recserve.serve.app import spawn_server
    from recserve.serve.repository import write_model_folder

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="recserve-demo-") as scratch:
        repo = Path(scratch)
        serving = {
            "scheduler": {"batch_size": max_items, "num_workers": 1, "threads_per_worker": cores,
                          "latency_target_ms": 10 * target_ms, "max_queue": 4096},
            # RocksDB holds the full copy; the DRAM tier starts empty and fills by promotion as keys are read
            "rocksdb": {"enabled": True, "path": "store"}, "max_items": max_items,
        }
        print("recserve demo: RMC1 (8 tables x 80 lookups per item; tables imported into RocksDB, a DRAM tier in "
              "front filled on first read), DeepRecSched tuning under Poisson arrivals, lognormal(5.1, 0.2) items "
              "per query, Zipf(1.05) keys")
        write_model_folder(repo / "rmc1", "rmc1", "tiny", seed=0, serving=serving)
        # The load generator shares the machine's cores with the server: passing the queries' inputs through
        # shared memory leaves more of them to the server (benchmarks/NOTES.md, the demo's load through shared
        # memory), for the baseline and the tuned settings alike.
        server = spawn_server(repo, "--allow-client-shm")
        try:
            print(f"server ready: HTTP {server.http}, gRPC {server.grpc}")
            endpoint = Endpoint(grpc=server.grpc, http=server.http, shared_memory=True)
            load = LoadConfig(model="rmc1", duration_s=duration_s, arrivals=ArrivalProcess(qps=20.0),
                              sizes=SizeDistribution(kind="lognormal", mu=5.1, sigma=0.2, max_items=max_items))
            document = tune_job(endpoint, load, out, target_ms=target_ms, progress=progress,
                                confirm_rounds=confirm_rounds)
            document["hit_rates"] = _hit_rates(server.http)
        finally:
            server.stop()
    for tier, rate in document["hit_rates"].items():
        print(f"  {tier:<8} tier hit rate {rate:8.3%} (of the unique keys that reached it)")
    print(f"plots and JSON: {out}/latency_vs_load.png, {out}/tune.json")
    return document


def _hit_rates(http: str) -> dict[str, float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://{http}/metrics", timeout=30).read().decode()
    hits: dict[str, float] = {}
    misses: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "recserve_ps_hits_total":
                hits[sample.labels["tier"]] = hits.get(sample.labels["tier"], 0.0) + sample.value
            elif sample.name == "recserve_ps_misses_total":
                misses[sample.labels["tier"]] = misses.get(sample.labels["tier"], 0.0) + sample.value
    return {tier: hits[tier] / max(1.0, hits[tier] + misses.get(tier, 0.0)) for tier in hits}
