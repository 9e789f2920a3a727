"""Device embedding cache on cpu (and on cuda too when a GPU is present), each figure against its rival in one run.

    python benchmarks/bench_cache.py            # 10M rows x 64 float32, Zipf(1.05) keys, batches of 65,536
    python benchmarks/bench_cache.py --quick    # 1M rows

Figures:
- hit_rate: size (1%, 5%, 20% of rows) -> policy (lru, lfu) -> share of each batch's distinct keys the cache
  held, over a stream of batches after a warm-up that fills it (misses inserted after every batch, as the PS
  does);
- with_cache_vs_without: keys/s of cache (5% of rows) + DRAM (10%) + RocksDB lookups vs DRAM + RocksDB,
  batches taken in turns by the two on the same tiers;
- query_vs_gather: one `query` of 65,536 keys at 100% hits vs a torch gather of as many rows by known index
  from a table of the cache's size (the limit); also the DRAM tier on the same keys (`cache_vs_dram_hit`),
  which decides whether the cache is on by default on cpu.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from recserve.config import DeviceCacheConfig, DramTierConfig, PSConfig, RocksTierConfig, TableConfig
from recserve.ps.cache import EmbeddingCache
from recserve.ps.server import HierarchicalPS
from recserve.synthetic import ZipfKeys, random_rows

BATCH = 65_536
DIM = 64
SIZES = {"1%": 0.01, "5%": 0.05, "20%": 0.20}


def median_seconds(run: Callable[[], object], repeats: int = 7) -> float:
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def cache_step(cache: EmbeddingCache, zipf: ZipfKeys, device: str) -> tuple[int, int]:
    """One batch's distinct keys: query, insert the misses; (hits, keys)."""
    keys = torch.from_numpy(np.unique(zipf.sample(BATCH))).to(device)
    _, hit = cache.query(keys)
    missed = keys[~hit]
    cache.insert(missed, torch.zeros((missed.numel(), DIM), device=device))
    return int(hit.sum()), keys.numel()


def hit_rates(num_rows: int, device: str, batches: int, max_warm_up: int) -> dict:
    """Cache alone under the Zipf stream: query, then insert what missed (row values do not matter here).

    Warm-up runs until the cache is 90% full (or `max_warm_up` batches), so that a big cache is not measured
    while it still misses keys merely never seen; then `batches` batches are measured."""
    rates: dict[str, dict[str, float]] = {}
    for size, fraction in SIZES.items():
        rates[size] = {}
        for policy in ("lru", "lfu"):
            zipf = ZipfKeys(num_rows, alpha=1.05, seed=1)
            cache = EmbeddingCache(int(num_rows * fraction), DIM, device=device, policy=policy)
            warm_up = 0
            while warm_up < max_warm_up and cache.stats().rows < 0.9 * cache.capacity_rows:
                cache_step(cache, zipf, device)
                warm_up += 1
            hits, seen = map(sum, zip(*(cache_step(cache, zipf, device) for _ in range(batches)), strict=True))
            rates[size][policy] = hits / seen
            fill = cache.stats().rows / cache.capacity_rows
            print(f"hit rate, cache {size} of rows, {policy}: {hits / seen:.1%} (after {warm_up} warm-up batches, "
                  f"cache {fill:.0%} full)")
    return rates


def query_vs_gather(num_rows: int, device: str) -> dict:
    """100% hits: the cache's query against a plain gather of the same number of rows."""
    capacity = max(int(num_rows * 0.2), 16 * BATCH)  # room to spare: no set may overflow
    cache = EmbeddingCache(capacity, DIM, device=device)
    keys = torch.from_numpy(np.random.default_rng(2).choice(num_rows, BATCH, replace=False)).to(device)
    cache.insert(keys, torch.randn(BATCH, DIM, device=device))
    assert bool(cache.query(keys)[1].all()), "the benchmark needs every key held"
    table = torch.randn(capacity, DIM, device=device)
    index = torch.from_numpy(np.random.default_rng(3).choice(capacity, BATCH, replace=False)).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def query() -> None:
        cache.query(keys)
        sync()

    def gather() -> None:
        torch.index_select(table, 0, index)
        sync()

    query_s, gather_s = median_seconds(query), median_seconds(gather)
    print(f"query of {BATCH} keys at 100% hits: {query_s * 1e3:.2f} ms; gather by index: {gather_s * 1e3:.2f} ms")
    return {"query_ms": query_s * 1e3, "gather_ms": gather_s * 1e3, "query_vs_gather": gather_s / query_s}


def build_ps(store: Path, num_rows: int, rows: np.ndarray, cache: bool) -> HierarchicalPS:
    table = TableConfig(name="t", dim=DIM, rows=num_rows, dram_capacity_rows=num_rows // 10)
    config = PSConfig(
        tables=[table], dram=DramTierConfig(num_partitions=8), rocksdb=RocksTierConfig(path=store),
        cache=DeviceCacheConfig(enabled=cache, fraction=0.05),
    )
    ps = HierarchicalPS.from_config(config)
    ps.import_table("t", np.arange(num_rows, dtype=np.int64), rows)
    return ps


def with_and_without(num_rows: int, rows: np.ndarray, store: Path, rounds: int) -> dict:
    """The same tiers read through two PS views, one with the cache in front; batches alternate between them."""
    with build_ps(store, num_rows, rows, cache=True) as cached:
        plain = HierarchicalPS(list(cached.tables.values()), cached.tiers[1:])
        zipf = ZipfKeys(num_rows, alpha=1.05, seed=4)
        for _ in range(rounds):  # warm-up: DRAM and cache fill
            cached.lookup_numpy("t", zipf.sample(BATCH))
        cached.tiers[0].drain()
        cached.reset_counts()
        spent = {"with": 0.0, "without": 0.0}
        for step in range(2 * rounds):
            name, ps = ("with", cached) if step % 2 == 0 else ("without", plain)
            batch = zipf.sample(BATCH)
            started = time.perf_counter()
            ps.lookup_numpy("t", batch)
            spent[name] += time.perf_counter() - started
        cached.tiers[0].drain()
        tiers = cached.stats().tables["t"].tiers
        cache_hit = tiers["cache"].hits / max(1, tiers["cache"].hits + tiers["cache"].misses)
        with_s, without_s = (rounds * BATCH / spent["with"]), (rounds * BATCH / spent["without"])
        dram_hit_s, cache_hit_s = hit_path_times(cached)
    print(f"PS keys/s with the cache (5%, hit rate {cache_hit:.1%}): {with_s:,.0f}; without: {without_s:,.0f}")
    print(f"all-hit batch: cache {cache_hit_s * 1e3:.2f} ms, DRAM tier {dram_hit_s * 1e3:.2f} ms")
    return {
        "with_cache_keys_per_s": with_s, "without_cache_keys_per_s": without_s,
        "with_cache_vs_without": with_s / without_s, "ps_cache_hit_rate": cache_hit,
        "cache_hit_batch_ms": cache_hit_s * 1e3, "dram_hit_batch_ms": dram_hit_s * 1e3,
        "cache_vs_dram_hit": dram_hit_s / cache_hit_s,
    }


def hit_path_times(cached: HierarchicalPS) -> tuple[float, float]:
    """One batch that both the cache and the DRAM tier hold whole: each tier's lookup time alone."""
    cache, dram = cached.tiers[0], cached.tiers[1]
    keys = cache.cache("t").held_keys().numpy()[:BATCH]
    keys = keys[dram.lookup("t", keys).found]
    cache.insert("t", keys, dram.lookup("t", keys).rows)
    assert cache.lookup("t", keys).found.all()
    return median_seconds(lambda: dram.lookup("t", keys)), median_seconds(lambda: cache.lookup("t", keys))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1M rows instead of 10M")
    args = parser.parse_args()
    num_rows = 1_000_000 if args.quick else 10_000_000
    rounds = 10 if args.quick else 20
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    figures: dict = {"rows": num_rows, "batch": BATCH, "dim": DIM, "torch_threads": torch.get_num_threads()}
    for device in devices:
        prefix = "" if device == "cpu" else "cuda_"
        figures[f"{prefix}hit_rate"] = hit_rates(num_rows, device, rounds, max_warm_up=10 * rounds)
        figures |= {f"{prefix}{k}": v for k, v in query_vs_gather(num_rows, device).items()}
    rows = random_rows(num_rows, DIM)
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as scratch:
        figures |= with_and_without(num_rows, rows, Path(scratch) / "store", rounds)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}, default=str))


if __name__ == "__main__":
    main()
