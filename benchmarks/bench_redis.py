"""The Redis tier against bare Redis commands on the same redis-server, in one run.

    python benchmarks/bench_redis.py            # 1M rows x 64 float32, batches of 65,536 uniform keys
    python benchmarks/bench_redis.py --quick    # 200k rows

Both sides hold the same rows on one redis-server on loopback: the tier in its partitioned hashes (8
partitions), the bare side as one Redis string per key. Reads alternate batch by batch, 3 rounds over 8 batches:
- `redis_tier_keys_per_s`: `RedisTier.lookup` (pipelined HMGETs per partition, rows decoded to float32);
- `mget_keys_per_s`: MGET in 1,000-key calls, rows joined to float32 (as `bench_lookup.py`'s `dram_vs_redis`);
- `redis_tier_vs_mget`: the two.
Writes: `redis_tier_insert_rows_per_s` (the write script, 10,000 rows a call) and `mset_rows_per_s` (MSET in
10,000-key calls), `redis_tier_insert_vs_mset`. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import redis

from bench_lookup import redis_server  # sibling scripts: their folder is on the path
from recserve.config import RedisTierConfig, TableConfig
from recserve.ps.redis import RedisTier
from recserve.synthetic import random_rows

DIM = 64
BATCH = 65_536


def mset(client: redis.Redis, keys: np.ndarray, rows: np.ndarray) -> None:
    for start in range(0, keys.size, 10_000):
        chunk = keys[start:start + 10_000]
        client.mset({int(k).to_bytes(8, "little", signed=True): rows[i].tobytes()
                     for i, k in zip(range(start, start + chunk.size), chunk.tolist(), strict=True)})


def mget(client: redis.Redis, keys: np.ndarray) -> np.ndarray:
    names = [int(k).to_bytes(8, "little", signed=True) for k in keys.tolist()]
    values = []
    for start in range(0, len(names), 1000):
        values.extend(client.mget(names[start:start + 1000]))
    return np.frombuffer(b"".join(values), dtype=np.float32).reshape(-1, DIM)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200k rows")
    args = parser.parse_args()
    num_rows = 200_000 if args.quick else 1_000_000
    keys = np.arange(num_rows, dtype=np.int64)
    rows = random_rows(num_rows, DIM)
    figures: dict = {"rows": num_rows, "dim": DIM, "batch": BATCH}
    with redis_server() as port:
        client = redis.Redis(port=port)
        tier = RedisTier(RedisTierConfig(enabled=True, address=f"127.0.0.1:{port}"), [TableConfig(name="t", dim=DIM)])
        write = {"tier": 0.0, "mset": 0.0}
        for start in range(0, num_rows, 100_000):  # the two writers in turn, 100k rows at a time
            part = slice(start, start + 100_000)
            started = time.perf_counter()
            tier.insert("t", keys[part], rows[part])
            write["tier"] += time.perf_counter() - started
            started = time.perf_counter()
            mset(client, keys[part], rows[part])
            write["mset"] += time.perf_counter() - started
        figures["redis_tier_insert_rows_per_s"] = round(num_rows / write["tier"])
        figures["mset_rows_per_s"] = round(num_rows / write["mset"])
        figures["redis_tier_insert_vs_mset"] = round(write["mset"] / write["tier"], 3)

        rng = np.random.default_rng(0)
        batches = [rng.integers(0, num_rows, BATCH) for _ in range(8)]
        result = tier.lookup("t", batches[0])
        assert result.found.all()
        np.testing.assert_array_equal(result.rows, rows[batches[0]])
        np.testing.assert_array_equal(mget(client, batches[0]), rows[batches[0]])
        times: dict[str, list[float]] = {"tier": [], "mget": []}
        for _ in range(3):
            for batch in batches:
                for name, read in (("tier", lambda b: tier.lookup("t", b)), ("mget", lambda b: mget(client, b))):
                    started = time.perf_counter()
                    read(batch)
                    times[name].append(time.perf_counter() - started)
        tier.close()
        client.close()
    figures["redis_tier_keys_per_s"] = round(BATCH / statistics.median(times["tier"]))
    figures["mget_keys_per_s"] = round(BATCH / statistics.median(times["mget"]))
    figures["redis_tier_vs_mget"] = round(statistics.median(times["mget"]) / statistics.median(times["tier"]), 3)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
