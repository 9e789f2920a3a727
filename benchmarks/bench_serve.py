"""Served vs in-process: RMC1 through `recserve serve` with tritonclient (gRPC, HTTP binary), and 1-item latency.

    python benchmarks/bench_serve.py            # 400 queries of 256 items per mode and round, 3 rounds
    python benchmarks/bench_serve.py --quick    # 60

RMC1 `tiny` (the full structure: 8 tables x 80 lookups per item, the paper's MLPs; 1,000-row tables, all in
the DRAM tier). In-process: the same model and weights called in a closed loop in this process with every
core. Served: `recserve serve` in its own process (W workers x k threads, B items per sub-batch, from the
flags), driven in a closed loop by `--clients` tritonclient clients (4), each with one query in flight: a query
passes three stages in turn (the client encodes it, the server process receives it, a worker computes it), and
with two in flight the cores sat idle between them. Client and server share the machine's cores, as a sidecar
client would. Served twice more with each client's inputs in its own region of system shared memory (the server
runs with --allow-client-shm): the request then only says where they lie. The five modes run in turn, `--rounds`
times, and each mode's median run counts: the machine's speed drifts by 2x within minutes. The last line is one
JSON object: `grpc_vs_inprocess` and `http_vs_inprocess` (served items/s / in-process items/s),
`grpc_shm_vs_inprocess` and `http_shm_vs_inprocess` (the same with the inputs in shared memory),
`p50_1item_ms` (gRPC, one client, 1-item queries: the server's own overhead), the same query's in-process p50
back to back and after
8 ms idle (`inprocess_1item_hot_ms`, `inprocess_1item_after_idle_ms`: what a woken core costs here), and the
raw figures. With them, the CPU each 256-item query cost in-process and served (client, server process,
workers; from /proc): on a machine whose every core is busy, their quotient is the throughput ratio to expect,
and without the server process's share, its ceiling.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http

from recserve.allocator import retain_freed_memory
from recserve.config import DramTierConfig, PSConfig, RocksTierConfig, SchedulerConfig
from recserve.loadgen.targets import ClientRegion, triton_inputs
from recserve.loadgen.workload import Query as LoadQuery
from recserve.loadgen.workload import as_v2_arrays
from recserve.models import table_configs
from recserve.models.checkpoint import checkpoint_spec, load_checkpoint
from recserve.models.specs import ModelSpec
from recserve.models.synthetic import Query, QueryGenerator
from recserve.ps.server import HierarchicalPS
from recserve.serve.app import spawn_server
from recserve.serve.repository import write_model_folder

ITEMS = 256


def v2_arrays(spec: ModelSpec, query: Query) -> dict[str, np.ndarray]:
    return as_v2_arrays(spec, LoadQuery(dense=query.dense.numpy(), sparse=query.sparse))


def summary(latencies: list[float], items: int, wall_s: float) -> dict[str, float]:
    p50, p99 = np.percentile(np.asarray(latencies) * 1e3, [50, 99])
    return {"items_per_s": round(items / wall_s, 1), "p50_ms": round(float(p50), 3), "p99_ms": round(float(p99), 3),
            "queries": len(latencies)}


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, every thread of it (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    return [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()]


def cpu_bounds(inprocess_ms: float, served: dict[str, dict]) -> dict:
    """CPU per query decides throughput when every core is busy: the in-process CPU over the served CPU is the
    ratio to expect (`cpu_bound_*`), and over the client's and workers' CPU alone, the ceiling were the server's
    own process free (`ceiling_*`): the client shares this machine's cores."""
    figures: dict = {"cpu_ms_per_query": {"inprocess": inprocess_ms}}
    for protocol, result in served.items():
        parts = result["cpu_ms_per_query"]
        figures["cpu_ms_per_query"][protocol] = parts
        figures[f"cpu_bound_{protocol}_vs_inprocess"] = round(inprocess_ms / sum(parts.values()), 3)
        figures[f"ceiling_{protocol}_vs_inprocess"] = round(inprocess_ms / (parts["client"] + parts["workers"]), 3)
    return figures


class InProcess:
    """The same model and weights in this process, called in a closed loop with every core."""

    def __init__(self, folder: Path) -> None:
        spec = checkpoint_spec(folder)
        config = PSConfig(tables=table_configs(spec), dram=DramTierConfig(num_partitions=8),
                          rocksdb=RocksTierConfig(enabled=False))
        torch.set_num_threads(os.cpu_count() or 1)
        self.ps = HierarchicalPS.from_config(config)
        self.model = load_checkpoint(folder, self.ps)

    def run(self, queries: list[Query]) -> dict:
        with torch.inference_mode():
            for q in queries[:5]:
                self.model(q.dense, q.sparse)
            latencies = []
            started, cpu_started = time.perf_counter(), cpu_s(os.getpid())
            for q in queries:
                t = time.perf_counter()
                self.model(q.dense, q.sparse)
                latencies.append(time.perf_counter() - t)
            wall, cpu = time.perf_counter() - started, cpu_s(os.getpid()) - cpu_started
        return summary(latencies, sum(q.sparse.num_items for q in queries), wall) | {
            "cpu_ms_per_query": round(cpu / len(queries) * 1e3, 3)}

    def one_item_p50_ms(self, queries: list[Query], idle_s: float, count: int = 200) -> float:
        """p50 of 1-item queries called one at a time, each after idle_s of sleep: on this machine a core that
        sat idle for a few ms runs the same work 2-3x slower than one kept busy, and a served query always
        wakes one (a one-client loop leaves the server idle while the answer travels back)."""
        latencies = []
        with torch.inference_mode():
            for i in range(count):
                if idle_s:
                    time.sleep(idle_s)
                q = queries[i % len(queries)]
                t = time.perf_counter()
                self.model(q.dense, q.sparse)
                latencies.append(time.perf_counter() - t)
        return round(float(np.percentile(latencies, 50)) * 1e3, 3)

    def close(self) -> None:
        self.ps.close()


class ShmCall:
    """A client whose queries' inputs go through its region of shared memory (`--allow-client-shm`): each call
    writes its query's arrays into the region, and the request only says where they lie."""

    def __init__(self, module: ModuleType, address: str, pool: list[dict[str, np.ndarray]]) -> None:
        self.client = module.InferenceServerClient(address)
        self.pool = pool
        size = max(sum(array.nbytes for array in arrays.values()) for arrays in pool)
        self.region = ClientRegion(self.client, module, f"bench-serve-{uuid.uuid4().hex[:12]}", size)
        self.prepared = [self.region.inputs(arrays) for arrays in pool]

    def __call__(self, i: int) -> None:
        self.region.write_all(self.pool[i % len(self.pool)])
        self.client.infer("rmc1", self.prepared[i % len(self.prepared)])

    def close(self) -> None:
        self.region.close()


def median_run(runs: list[dict]) -> dict:
    """The run with the median items/s (its other figures with it)."""
    return sorted(runs, key=lambda run: run["items_per_s"])[len(runs) // 2]


def closed_loop(make_call: Callable[[], Callable[[int], None]], num_queries: int, clients: int,
                items: int, cpu: Callable[[], dict[str, float]] | None = None) -> dict:
    """`clients` threads, each with its own client and one query in flight, until num_queries are answered.

    Each thread makes its own client: tritonclient's HTTP client is not to be shared between threads. With
    `cpu` (CPU seconds by process), also the CPU milliseconds each query cost, from the start signal to the end."""
    latencies: list[float] = []
    counter = iter(range(num_queries))
    lock = threading.Lock()
    ready = threading.Barrier(clients + 1)

    def run() -> None:
        try:
            call = make_call()
            call(0)  # connect and warm up
        except BaseException:
            ready.abort()  # the others, and the caller, stop waiting for this client
            raise
        ready.wait()
        try:
            while True:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                t = time.perf_counter()
                call(index)
                elapsed = time.perf_counter() - t
                with lock:
                    latencies.append(elapsed)
        finally:
            if isinstance(call, ShmCall):
                call.close()  # on the client's own thread: tritonclient's HTTP client is bound to it

    threads = [threading.Thread(target=run) for _ in range(clients)]
    for thread in threads:
        thread.start()
    ready.wait()  # every client made and warmed up: count from here
    before = cpu() if cpu else {}
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    result: dict = summary(latencies, items * num_queries, time.perf_counter() - started)
    if cpu:
        after = cpu()
        result["cpu_ms_per_query"] = {part: round((after[part] - before[part]) / num_queries * 1e3, 3)
                                      for part in before}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--queries", type=int, default=None, help="queries of 256 items per mode")
    parser.add_argument("--clients", type=int, default=4, help="closed-loop clients, one query in flight each")
    parser.add_argument("--workers", type=int, default=2, help="W")
    parser.add_argument("--threads", type=int, default=1, help="k")
    parser.add_argument("--batch-size", type=int, default=256, help="B")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of in-process, gRPC, HTTP in turn")
    parser.add_argument("--idle-spin-us", type=int, default=0,
                        help="scheduler.idle_spin_us of the served model (0, the default: workers sleep at once)")
    parser.add_argument("--inline-max-items", type=int, default=SchedulerConfig().inline_max_items,
                        help="scheduler.inline_max_items of the served model (0: every query runs on the workers)")
    args = parser.parse_args()
    num_queries = args.queries or (60 if args.quick else 400)
    retain_freed_memory()  # as `recserve serve` does; tritonclient's client here gains from it as much

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        repo = Path(tmp)
        serving = {"scheduler": {"batch_size": args.batch_size, "num_workers": args.workers,
                                 "threads_per_worker": args.threads, "latency_target_ms": 60_000,
                                 "max_queue": 1024, "idle_spin_us": args.idle_spin_us,
                                 "inline_max_items": args.inline_max_items}, "dram": {"num_partitions": 8}}
        write_model_folder(repo / "rmc1", "rmc1", "tiny", seed=0, serving=serving)
        spec = checkpoint_spec(repo / "rmc1")
        generator = QueryGenerator(spec, seed=1)
        pool = [generator.query(ITEMS) for _ in range(16)]
        queries = [pool[i % len(pool)] for i in range(num_queries)]
        one_item = [generator.query(1) for _ in range(16)]

        server = spawn_server(repo, "--allow-client-shm")
        local_model = InProcess(repo / "rmc1")
        http_address, grpc_address = server.http, server.grpc
        try:
            def grpc_call(pool_: list[Query]) -> Callable[[], Callable[[int], None]]:
                def make() -> Callable[[int], None]:
                    client = triton_grpc.InferenceServerClient(grpc_address)
                    prepared = [triton_inputs(triton_grpc, v2_arrays(spec, q)) for q in pool_]
                    return lambda i: client.infer("rmc1", prepared[i % len(prepared)])
                return make

            def http_call(pool_: list[Query]) -> Callable[[], Callable[[int], None]]:
                def make() -> Callable[[int], None]:
                    client = triton_http.InferenceServerClient(http_address, network_timeout=600)
                    prepared = [triton_inputs(triton_http, v2_arrays(spec, q)) for q in pool_]
                    outputs = [triton_http.InferRequestedOutput("scores", binary_data=True)]
                    return lambda i: client.infer("rmc1", prepared[i % len(prepared)], outputs=outputs)
                return make

            def shm_call(module: ModuleType, address: str, pool_: list[Query]) -> Callable[[], ShmCall]:
                return lambda: ShmCall(module, address, [v2_arrays(spec, q) for q in pool_])

            workers = children(server.process.pid)

            def cpu() -> dict[str, float]:
                return {"client": cpu_s(os.getpid()), "server": cpu_s(server.process.pid),
                        "workers": sum(cpu_s(w) for w in workers)}

            # in turn, so that the machine's drift (2x within minutes here) falls on every mode alike
            runs: dict[str, list[dict]] = {"inprocess": [], "grpc": [], "http": [], "grpc_shm": [], "http_shm": []}
            for round_ in range(args.rounds):
                runs["inprocess"].append(local_model.run(queries))
                runs["grpc"].append(closed_loop(grpc_call(pool), num_queries, args.clients, ITEMS, cpu))
                runs["http"].append(closed_loop(http_call(pool), num_queries, args.clients, ITEMS, cpu))
                runs["grpc_shm"].append(closed_loop(shm_call(triton_grpc, grpc_address, pool), num_queries,
                                                    args.clients, ITEMS, cpu))
                runs["http_shm"].append(closed_loop(shm_call(triton_http, http_address, pool), num_queries,
                                                    args.clients, ITEMS, cpu))
                print(f"round {round_ + 1}: " + ", ".join(f"{mode} {r[-1]['items_per_s']:.0f} items/s"
                                                          for mode, r in runs.items()), flush=True)
            torch.set_num_threads(1)  # as a worker runs it (k = 1)
            one_item_hot = local_model.one_item_p50_ms(one_item, idle_s=0)
            one_item_after_idle = local_model.one_item_p50_ms(one_item, idle_s=0.008)
            print(f"1-item in-process p50: {one_item_hot} ms back to back, {one_item_after_idle} ms after 8 ms idle",
                  flush=True)
            local_model.close()  # its threads and memory stay out of the latency runs
            local, served_grpc, served_http, shm_grpc, shm_http = (
                median_run(runs[mode]) for mode in ("inprocess", "grpc", "http", "grpc_shm", "http_shm"))
            print(f"in-process      {local}\nserved gRPC     {served_grpc}\nserved HTTP     {served_http}\n"
                  f"gRPC + shm      {shm_grpc}\nHTTP + shm      {shm_http}", flush=True)
            single = max(200, num_queries)
            one_grpc = closed_loop(grpc_call(one_item), single, 1, 1)
            print(f"1-item gRPC     {one_grpc}", flush=True)
            one_http = closed_loop(http_call(one_item), single, 1, 1)
            print(f"1-item HTTP     {one_http}", flush=True)
        finally:
            local_model.close()
            server.stop()

    print(json.dumps({
        "grpc_vs_inprocess": round(served_grpc["items_per_s"] / local["items_per_s"], 3),
        "http_vs_inprocess": round(served_http["items_per_s"] / local["items_per_s"], 3),
        "grpc_shm_vs_inprocess": round(shm_grpc["items_per_s"] / local["items_per_s"], 3),
        "http_shm_vs_inprocess": round(shm_http["items_per_s"] / local["items_per_s"], 3),
        "p50_1item_ms": one_grpc["p50_ms"],
        "p50_1item_http_ms": one_http["p50_ms"],
        "inprocess_1item_hot_ms": one_item_hot, "inprocess_1item_after_idle_ms": one_item_after_idle,
        **cpu_bounds(local["cpu_ms_per_query"], {"grpc": served_grpc, "http": served_http, "grpc_shm": shm_grpc,
                                                 "http_shm": shm_http}),
        "inprocess": local, "grpc": served_grpc, "http": served_http, "grpc_shm": shm_grpc, "http_shm": shm_http,
        "grpc_1item": one_grpc, "http_1item": one_http,
        "rounds": {mode: [r["items_per_s"] for r in mode_runs] for mode, mode_runs in runs.items()},
        "config": {"items_per_query": ITEMS, "workers": args.workers, "threads_per_worker": args.threads,
                   "batch_size": args.batch_size, "clients": args.clients, "idle_spin_us": args.idle_spin_us,
                   "inline_max_items": args.inline_max_items,
                   "cores": os.cpu_count()},
    }))


if __name__ == "__main__":
    main()
