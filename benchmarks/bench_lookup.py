"""Parameter-server lookup speed, each figure against its limit or rival measured in the same run.

    python benchmarks/bench_lookup.py            # 10M keys x 64 float32 (about 14 GB of RAM at peak)
    python benchmarks/bench_lookup.py --quick    # 1M keys, for CI-sized machines
    python benchmarks/bench_lookup.py --shm-dir /mnt/recserve-huge   # the DRAM tier's files elsewhere

Batches of 65,536 keys. Prints every figure; the last line is one JSON object whose ratio keys are dram_vs_gather,
dram_vs_redis, dram_vs_dict, rocks_vs_dbbench, dram_private_vs_gather (the DRAM tier in one process's private
memory instead of shared memory) and dram_huge_vs_4k_pages (the shared DRAM tier on 2 MiB pages, which
`dram_huge_pages` says the kernel gave it, against the same on 4 KiB pages). `two_level_gather_keys_per_s` reads
the same rows through the DRAM tier's own index and records, each key's index entry found beforehand: the floor its
layout sets (two dependent reads a key) with no hashing, probing or checks; `two_level_gather_vs_gather` is then
the ratio no lookup in that layout can pass, and `dram_vs_two_level_gather` what the lookup itself costs on top.
Each rival runs in turn with the DRAM tier, pass by pass (Redis and the dict on 4 of the batches, against the DRAM
tier on the same 4: `dram_beside_redis_keys_per_s`, `dram_beside_dict_keys_per_s`), so that a slow minute of the
machine falls on both sides of a ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from numba import njit, prange

from recserve.config import DramTierConfig, PSConfig, RocksTierConfig, TableConfig
from recserve.ps import _hashmap as hm
from recserve.ps._atomics import prefetch
from recserve.ps.dram import DramTier
from recserve.ps.rocks import RocksTier
from recserve.ps.server import HierarchicalPS
from recserve.synthetic import ZipfKeys, random_rows

BATCH = 65_536
DIM = 64


@njit(parallel=True, nogil=True, cache=True)
def gather_rows(table, index, out):
    for i in prange(index.size):
        row = index[i]
        for c in range(table.shape[1]):
            out[i, c] = table[row, c]


# Not cached: numba's cache of a function keys on its own file only, and these inline the DRAM tier's probing
# from another; a cached copy would outlive a change to it and find the wrong slots.
@njit
def slot_entries(slots, num_partitions, num_slots, keys):
    """The index entry of each key in a DRAM table (all present)."""
    out = np.empty(keys.size, dtype=np.int64)
    for i in range(keys.size):
        out[i] = hm.find_slot(slots, hm.partition_of(keys[i], num_partitions), num_slots, keys[i])
    return out


@njit(parallel=True, nogil=True)
def two_level_gather(slots, rec, values, entries, words, offset, out):
    """Each key's record through its index entry, found beforehand: the DRAM tier's layout (an index slot, then a
    record) read as its lookup reads it, a block of keys per phase with the next reads prefetched, but without
    hashing, probing or the seqlock checks."""
    block = hm.LOOKUP_BLOCK
    for task in prange((entries.size + block - 1) // block):
        lo, hi = task * block, min(entries.size, task * block + block)
        for i in range(lo, hi):
            prefetch(slots, 2 * entries[i] + 1)
        for i in range(lo, hi):
            hm.prefetch_record(rec, slots[2 * entries[i] + 1], words)
        for i in range(lo, hi):
            record = slots[2 * entries[i] + 1]
            for c in range(out.shape[1]):
                out[i, c] = values[record, np.uint64(offset + c)]  # unsigned: no negative-index test (4x here)


def keys_per_s(run: Callable[[np.ndarray], object], batches: list[np.ndarray], repeats: int = 3) -> float:
    """Median over repeats of the whole pass over `batches` (one warm-up pass first)."""
    return alternated({"run": run}, batches, repeats)["run"]


def alternated(runs: dict[str, Callable[[np.ndarray], object]], batches: list[np.ndarray], rounds: int = 5
               ) -> dict[str, float]:
    """Keys/s of each run: a pass over `batches` each in turn, `rounds` times, the median pass of each; so that
    the machine's drift (2x within minutes here) falls on every run alike. One warm-up pass each first."""
    for run in runs.values():
        run(batches[0])
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            started = time.perf_counter()
            for batch in batches:
                run(batch)
            times[name].append(time.perf_counter() - started)
    return {name: sum(b.size for b in batches) / statistics.median(t) for name, t in times.items()}


def build_dram(num_rows: int, rows: np.ndarray, shm: Path, shared: bool = True, huge_pages: bool = True
               ) -> DramTier:
    table = TableConfig(name="t", dim=DIM, dram_capacity_rows=num_rows)
    config = DramTierConfig(num_partitions=8, shm_dir=shm, shared_memory=shared, huge_pages=huge_pages)
    tier = DramTier.create([table], config)
    keys = np.arange(num_rows, dtype=np.int64)
    for start in range(0, num_rows, 1 << 20):
        tier.insert("t", keys[start : start + (1 << 20)], rows[start : start + (1 << 20)])
    return tier


def bench_dram(num_rows: int, rows: np.ndarray, batches: list[np.ndarray], shm: Path) -> dict:
    """The DRAM tier (shared memory on huge pages, on 4 KiB pages, private memory), the gather and the layout's
    floor, alternated; then the DRAM tier alternated with Redis, and with a Python dict. About 3.5 GB of memory
    per DRAM tier at 10M rows."""
    started = time.perf_counter()
    tier = build_dram(num_rows, rows, shm)
    insert_rows_per_s = num_rows / (time.perf_counter() - started)
    others = {"dram_4k_pages": build_dram(num_rows, rows, shm, huge_pages=False),
              "dram_private": build_dram(num_rows, rows, shm, shared=False)}
    try:
        assert all(tier.lookup("t", b).found.all() for b in batches[:2])
        held = tier.table("t")
        plan = held.handle
        entries = {id(b): slot_entries(held.slots, plan.num_partitions, plan.num_slots, b) for b in batches}
        assert all((e >= 0).all() for e in entries.values())

        def gather(batch: np.ndarray) -> None:
            gather_rows(rows, batch, np.empty((batch.size, DIM), dtype=np.float32))

        def layout_floor(batch: np.ndarray) -> None:
            out = np.empty((batch.size, DIM), dtype=np.float32)
            two_level_gather(held.slots, held.rec, held.values, entries[id(batch)], plan.words, held._offset, out)

        runs: dict[str, Callable[[np.ndarray], object]] = {
            "dram": lambda b: tier.lookup("t", b), "gather": gather, "two_level_gather": layout_floor,
        }
        runs |= {name: (lambda b, other=other: other.lookup("t", b)) for name, other in others.items()}
        speeds = alternated(runs, batches)
        huge_pages = held.huge_pages
        for other in others.values():  # the rest of the run needs their memory
            other.close()
        rivals = bench_rivals(runs["dram"], rows, batches[:4])
    finally:
        for made in (tier, *others.values()):
            made.close()
    return {f"{name}_keys_per_s": speed for name, speed in speeds.items()} | rivals | {
        "dram_huge_pages": huge_pages, "dram_insert_rows_per_s": insert_rows_per_s}


def bench_rivals(dram: Callable[[np.ndarray], object], rows: np.ndarray, batches: list[np.ndarray]) -> dict:
    """Redis MGET and a Python dict of rows (+ np.stack), each alternated with the DRAM tier pass by pass."""
    with redis_mget(rows, batches) as mget:
        beside_redis = alternated({"dram": dram, "redis": mget}, batches, rounds=3)
    table = {k: rows[k] for k in range(rows.shape[0])}  # the whole table, as the DRAM tier holds it
    beside_dict = alternated({"dram": dram, "dict": lambda b: np.stack([table[k] for k in b.tolist()])}, batches,
                             rounds=3)
    return {"redis_mget_keys_per_s": beside_redis["redis"], "dram_beside_redis_keys_per_s": beside_redis["dram"],
            "dict_keys_per_s": beside_dict["dict"], "dram_beside_dict_keys_per_s": beside_dict["dram"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def redis_server() -> Iterator[int]:
    """A redis-server on loopback, answering; its port."""
    import redis

    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is missing: run `make system-deps` (Debian package redis-server)")
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        client.close()
        yield port
    finally:
        server.terminate()
        server.wait(timeout=30)


@contextlib.contextmanager
def redis_mget(rows: np.ndarray, batches: list[np.ndarray]) -> Iterator[Callable[[np.ndarray], np.ndarray]]:
    """MGET of the batches' rows, 1,000 keys per call, from a redis-server on loopback holding those keys."""
    import redis

    with redis_server() as port:
        client = redis.Redis(port=port)
        wanted = np.unique(np.concatenate(batches))
        for start in range(0, wanted.size, 10_000):
            chunk = wanted[start : start + 10_000]
            client.mset({int(k).to_bytes(8, "little", signed=True): rows[k].tobytes() for k in chunk})

        def mget(batch: np.ndarray) -> np.ndarray:
            names = [int(k).to_bytes(8, "little", signed=True) for k in batch.tolist()]
            values = []
            for start in range(0, len(names), 1000):
                values.extend(client.mget(names[start : start + 1000]))
            return np.frombuffer(b"".join(values), dtype=np.float32).reshape(-1, DIM)

        np.testing.assert_array_equal(mget(batches[0]), rows[batches[0]])
        yield mget


def read_whole_folder(folder: Path) -> None:
    """Pull a database's files into the OS page cache, so both RocksDB readers start equally warm."""
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                while f.read(1 << 24):
                    pass


def bench_rocks(num_rows: int, rows: np.ndarray, batches: list[np.ndarray], store: Path) -> dict:
    table = TableConfig(name="t", dim=DIM)
    tier = RocksTier(RocksTierConfig(path=store), [table])
    started = time.perf_counter()
    tier.import_table("t", np.arange(num_rows, dtype=np.int64), rows)
    import_rows_per_s = num_rows / (time.perf_counter() - started)
    read_whole_folder(store)
    try:
        rocks = keys_per_s(lambda b: tier.lookup("t", b), batches[:8], repeats=1)
        np.testing.assert_array_equal(tier.lookup("t", batches[0]).rows, rows[batches[0]])
    finally:
        tier.close()
    return {"rocks_keys_per_s": rocks, "rocks_import_rows_per_s": import_rows_per_s}


def bench_dbbench(num_rows: int, reads: int, folder: Path) -> dict:
    """db_bench's own multireadrandom on a DB of the same key count and value size (the RocksDB limit)."""
    if shutil.which("db_bench") is None:
        raise SystemExit("db_bench is missing: run `make system-deps` (Debian package rocksdb-tools)")
    common = [f"--db={folder}", f"--num={num_rows}", "--key_size=8", f"--value_size={DIM * 4}",
              "--compression_type=snappy", f"--cache_size={256 << 20}", "--threads=1"]
    subprocess.run(["db_bench", "--benchmarks=fillseq", *common], check=True, capture_output=True)
    read_whole_folder(folder)
    out = subprocess.run(
        ["db_bench", "--benchmarks=multireadrandom", "--use_existing_db=1", f"--reads={reads}",
         "--batch_size=10000", "--bloom_bits=10", *common],
        check=True, capture_output=True, text=True,
    ).stdout
    match = re.search(r"multireadrandom\s*:\s*[\d.]+ micros/op (\d+) ops/sec", out)
    if not match:
        raise SystemExit(f"could not read db_bench's output:\n{out}")
    return {"dbbench_multireadrandom_keys_per_s": float(match.group(1))}


def bench_zipf(num_rows: int, store: Path, shm: Path) -> dict:
    """The PS with the DRAM tier at 10% of rows in front of the imported RocksDB, under Zipf(1.05) keys."""
    table = TableConfig(name="t", dim=DIM, dram_capacity_rows=num_rows // 10)
    config = PSConfig(tables=[table], dram=DramTierConfig(num_partitions=8, shm_dir=shm),
                      rocksdb=RocksTierConfig(path=store))
    zipf = ZipfKeys(num_rows, alpha=1.05, seed=3)
    with HierarchicalPS.from_config(config) as ps:
        # Warm until the tier has filled and then evicted for a while (read twice its rows from RocksDB), as under
        # a live stream: 20 batches, as before, held 318 k distinct keys of 10M, a third of the tier, and measured
        # a cold tier's hit rate (57.5%).
        warm_batches = 0
        while ps.stats().tables["t"].tiers["dram"].misses < 2 * table.dram_capacity_rows and warm_batches < 2_000:
            ps.lookup_numpy("t", zipf.sample(BATCH))
            warm_batches += 1
        before = ps.stats().tables["t"].tiers["dram"]
        batches = [zipf.sample(BATCH) for _ in range(20)]
        speed = keys_per_s(lambda b: ps.lookup_numpy("t", b), batches, repeats=1)
        after = ps.stats().tables["t"].tiers["dram"]
    hits, misses = after.hits - before.hits, after.misses - before.misses
    return {"zipf_dram10_hit_rate": hits / (hits + misses), "zipf_dram10_keys_per_s": speed,
            "zipf_dram10_warm_batches": warm_batches}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1M keys instead of 10M")
    parser.add_argument("--shm-dir", type=Path, default=Path("/dev/shm"),
                        help="where the shared DRAM tier lives; e.g. a tmpfs mounted with huge=always")
    args = parser.parse_args()
    num_rows = 1_000_000 if args.quick else 10_000_000
    rng = np.random.default_rng(0)
    rows = random_rows(num_rows, DIM, seed=0)
    batches = [rng.integers(0, num_rows, BATCH).astype(np.int64) for _ in range(16)]
    figures: dict[str, float | str | bool] = {"num_rows": num_rows, "dim": DIM, "batch": BATCH,
                                              "shm_dir": str(args.shm_dir)}
    with tempfile.TemporaryDirectory(prefix="recserve-bench-") as scratch:
        scratch_path = Path(scratch)
        with tempfile.TemporaryDirectory(prefix="recserve-bench-", dir=args.shm_dir) as shm:
            figures |= bench_dram(num_rows, rows, batches, Path(shm))
            figures |= bench_rocks(num_rows, rows, batches, scratch_path / "store")
            figures |= bench_dbbench(num_rows, 8 * BATCH, scratch_path / "dbbench")
            figures |= bench_zipf(num_rows, scratch_path / "store", Path(shm))
    figures["dram_vs_gather"] = figures["dram_keys_per_s"] / figures["gather_keys_per_s"]
    figures["dram_vs_two_level_gather"] = figures["dram_keys_per_s"] / figures["two_level_gather_keys_per_s"]
    figures["two_level_gather_vs_gather"] = figures["two_level_gather_keys_per_s"] / figures["gather_keys_per_s"]
    figures["dram_private_vs_gather"] = figures["dram_private_keys_per_s"] / figures["gather_keys_per_s"]
    figures["dram_huge_vs_4k_pages"] = figures["dram_keys_per_s"] / figures["dram_4k_pages_keys_per_s"]
    figures["dram_vs_redis"] = figures["dram_beside_redis_keys_per_s"] / figures["redis_mget_keys_per_s"]
    figures["dram_vs_dict"] = figures["dram_beside_dict_keys_per_s"] / figures["dict_keys_per_s"]
    figures["rocks_vs_dbbench"] = figures["rocks_keys_per_s"] / figures["dbbench_multireadrandom_keys_per_s"]
    for name, value in figures.items():
        print(f"{name:<36} {value:>16,.3f}" if isinstance(value, float) else f"{name:<36} {value:>16}")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}))


if __name__ == "__main__":
    main()
