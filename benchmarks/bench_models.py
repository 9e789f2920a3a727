"""Items/s of the eight reference models over the parameter server, and RMC1 vs plain nn.EmbeddingBag.

    python benchmarks/bench_models.py            # `full` tables (tens of GB of rows in all, one model at a time)
    python benchmarks/bench_models.py --quick    # `tiny` tables
    python benchmarks/bench_models.py --models rmc1 --shm-dir /mnt/recserve-huge   # the DRAM tier's files elsewhere
    python benchmarks/bench_models.py --models rmc1 --table-dtype bfloat16   # rows stored in 2 bytes

Each model's tables live in the DRAM tier (no RocksDB), as when serving from memory. Query sizes are items
per query; keys are Zipf(1.05) per table. The last line is one JSON object: `models` (name -> {size ->
items/s}), `preset`, and `rmc1_vs_embeddingbag_256`: RMC1 over the PS vs the same network holding the same
tables in nn.EmbeddingBag with the indices precomputed (the in-RAM limit), at 256 items per query; and
`rmc1_private_vs_embeddingbag_256`, the same with the DRAM tier in this process's private memory
(`shared_memory: false`). With `--table-dtype` other than float32 the two RMC1 keys are named after it
(`rmc1_bfloat16_vs_embeddingbag_256`, ...): nn.EmbeddingBag still holds float32 rows, so that ratio is not the
float32 one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from recserve.config import DramTierConfig, PSConfig, RocksTierConfig, RowDtype
from recserve.models import MODEL_NAMES, RecModel, build_model, model_spec, table_configs
from recserve.models.synthetic import Query, QueryGenerator, table_rows, write_tables
from recserve.ps.server import HierarchicalPS

SIZES = (1, 16, 64, 256, 1024)


def items_per_s(model: RecModel, queries: list[Query], repeats: int = 3) -> float:
    with torch.no_grad():
        model(queries[0].dense, queries[0].sparse)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            for q in queries:
                model(q.dense, q.sparse)
            times.append(time.perf_counter() - started)
    return sum(q.sparse.num_items for q in queries) / statistics.median(times)


def query_set(spec: object, size: int, seed: int = 0) -> list[Query]:
    generator = QueryGenerator(spec, seed=seed)
    return [generator.query(size) for _ in range(max(3, 512 // size))]


def embedding_bag_twin(spec: object) -> RecModel:
    """The same network with the same tables held in nn.EmbeddingBag: the in-RAM limit."""
    local = build_model(spec)
    with torch.no_grad():
        for table, rows in table_rows(spec, seed=0).items():
            local.embedding.tables[table].weight.copy_(torch.from_numpy(rows))
    return local


def ratio_to(model: RecModel, local: RecModel, queries: list[Query]) -> float:
    ratios = []
    for _ in range(5):  # alternate, so both see the same machine load
        ratios.append(items_per_s(model, queries, repeats=1) / items_per_s(local, queries, repeats=1))
    return statistics.median(ratios)


def bench_model(name: str, preset: str, shm_dir: Path, *, shared_memory: bool = True, dtype: RowDtype = "float32",
                local: RecModel | None = None, sizes: tuple[int, ...] = SIZES) -> tuple[dict[int, float], float | None]:
    """Items/s by query size over a PS whose DRAM tier holds every table; with `local`, RMC1's ratio to it."""
    spec = model_spec(name, preset)
    config = PSConfig(tables=table_configs(spec, dtype=dtype), rocksdb=RocksTierConfig(enabled=False),
                      dram=DramTierConfig(num_partitions=8, shared_memory=shared_memory, shm_dir=shm_dir))
    with HierarchicalPS.from_config(config) as ps:
        write_tables(ps, spec, seed=0)
        model = build_model(spec, ps)
        speeds = {size: items_per_s(model, query_set(spec, size)) for size in sizes}
        ratio = None if local is None else ratio_to(model, local, query_set(spec, 256, seed=1))
    return speeds, ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny tables")
    parser.add_argument("--models", default=",".join(MODEL_NAMES), help="comma-separated subset")
    parser.add_argument("--shm-dir", type=Path, default=Path("/dev/shm"), help="where shared-memory tables live")
    parser.add_argument("--table-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                        help="how the PS stores the tables' rows")
    args = parser.parse_args()
    dtype = args.table_dtype
    preset = "tiny" if args.quick else "full"
    results: dict[str, dict[int, float]] = {}
    rmc1_ratio = rmc1_private_ratio = None
    for name in args.models.split(","):
        local = embedding_bag_twin(model_spec(name, preset)) if name == "rmc1" else None
        speeds, ratio = bench_model(name, preset, args.shm_dir, dtype=dtype, local=local)
        results[name] = speeds
        print(f"{name:<6} " + "  ".join(f"{size:>4} items: {speed:>10,.0f}/s" for size, speed in speeds.items()))
        if local is not None:
            rmc1_ratio = ratio
            # the DRAM tier in one process's private memory
            _, rmc1_private_ratio = bench_model(name, preset, args.shm_dir, shared_memory=False, dtype=dtype,
                                                local=local, sizes=())
            del local
    if rmc1_ratio is not None:
        print(f"rmc1 over the PS ({dtype} rows) vs nn.EmbeddingBag at 256 items: {rmc1_ratio:.3f} "
              f"(DRAM tier in private memory: {rmc1_private_ratio:.3f})")
    rmc1 = "rmc1" if dtype == "float32" else f"rmc1_{dtype}"
    print(json.dumps({
        "preset": preset, "shm_dir": str(args.shm_dir), "table_dtype": dtype,
        "models": {n: {str(k): round(v, 1) for k, v in s.items()} for n, s in results.items()},
        f"{rmc1}_vs_embeddingbag_256": None if rmc1_ratio is None else round(rmc1_ratio, 4),
        f"{rmc1}_private_vs_embeddingbag_256": None if rmc1_private_ratio is None else round(rmc1_private_ratio, 4),
    }))


if __name__ == "__main__":
    main()
