"""The `recserve` command: demo, import, publish, follow, lookup, stats, serve, repo.

Thin: parse, build, call, print.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from recserve.allocator import retain_freed_memory
from recserve.errors import RecserveError

if TYPE_CHECKING:
    from recserve.config import RecserveConfig
    from recserve.ps.formats import TableSource
    from recserve.ps.server import HierarchicalPS
    from recserve.ps.updates import UpdateConsumer

ImportJobs = list[tuple[str, "TableSource"]]


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    retain_freed_memory()  # every command moves large buffers: serving, loading, importing
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.run(args) or 0)
    except RecserveError as error:
        print(f"recserve: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recserve", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="serve RMC1, tune its scheduler against the static baseline, report")
    demo.add_argument("--out", type=Path, default=Path("recserve-demo"), help="plots and JSON go here")
    demo.add_argument("--target-ms", type=float, default=100.0, help="p95 latency target (the paper's for RMC1)")
    demo.add_argument("--duration", type=float, default=1.5, help="seconds of load per measurement")
    demo.add_argument("--confirm", type=int, default=2, metavar="N", help="after tuning, measure the baseline "
                      "and the tuned setting N more times each, in turn, and report the medians' ratio")
    demo.add_argument("--lookups", action="store_true", help="the parameter-server demo instead: import a "
                      "synthetic power-law table and benchmark lookups (the options below)")
    demo.add_argument("--rows", type=int, default=1_000_000, help="rows in the synthetic table")
    demo.add_argument("--dim", type=int, default=64, help="values per row")
    demo.add_argument("--dram-fraction", type=float, default=0.1, help="DRAM tier capacity, fraction of rows")
    demo.add_argument("--batches", type=int, default=40, help="lookup batches of 65,536 Zipf keys")
    demo.add_argument("--store", type=Path, default=None, help="RocksDB folder (default: a temporary one)")
    demo.set_defaults(run=_run_demo)

    imp = commands.add_parser("import", help="import embedding tables into the store (SST ingestion)")
    imp.add_argument("--config", type=Path, required=True, help="our YAML/JSON config or an HPS JSON file")
    imp.add_argument("--table", help="table to import into (omit to import every model's sparse_files)")
    imp.add_argument("--format", choices=["hugectr", "npy", "torch"], help="default: guessed from the paths")
    imp.add_argument("--tensor", help="torch: name of the weight tensor in the state_dict")
    imp.add_argument("--key-map", type=Path, help="torch: .npy of the key of each row (default: row i = key i)")
    imp.add_argument("--state-dict", type=Path, help="a trained model's state_dict: tables go to the PS, the "
                     "rest to --dense-out")
    imp.add_argument("--dense-out", type=Path, help="with --state-dict: where the dense weights are written")
    imp.add_argument("paths", type=Path, nargs="*", help="HugeCTR folder | keys.npy rows.npy | weights.pt")
    imp.set_defaults(run=_run_import)

    publish = commands.add_parser("publish", help="publish updated rows of a table on a Redis stream or Kafka "
                                  "topic, which serving nodes apply (online updates)")
    publish.add_argument("--via", choices=["redis_streams", "kafka"], default="redis_streams")
    publish.add_argument("--address", help="Redis host:port or redis:// URL (default 127.0.0.1:6379), or Kafka "
                         "brokers (default 127.0.0.1:9092)")
    publish.add_argument("--stream", required=True, help="the stream or topic: a served model reads recserve.<model> "
                         "unless its serve.yaml names another")
    publish.add_argument("--table", help="table the rows belong to (a served model also takes its inputs' short "
                         "names, e.g. t0)")
    publish.add_argument("--dim", type=int, help="values per row: needed for a HugeCTR folder, checked otherwise")
    publish.add_argument("--format", choices=["hugectr", "npy", "torch"], help="default: guessed from the paths")
    publish.add_argument("--tensor", help="torch: name of the weight tensor in the state_dict")
    publish.add_argument("--key-map", type=Path, help="torch: .npy of the key of each row (default: row i = key i)")
    publish.add_argument("--rows-per-message", type=int, default=4096)
    publish.add_argument("--trim-before", metavar="ID", help="instead of publishing: drop the stream's entries "
                         "older than ID (once a checkpoint that nodes start from holds them)")
    publish.add_argument("paths", type=Path, nargs="*", help="HugeCTR folder | keys.npy rows.npy | weights.pt")
    publish.set_defaults(run=_run_publish)

    follow = commands.add_parser("follow", help="apply the config's update_source to the store, as it arrives")
    follow.add_argument("--config", type=Path, required=True)
    follow.add_argument("--stream", default="recserve.updates", help="when the config's update_source names none")
    follow.add_argument("--until-caught-up", action="store_true",
                        help="stop once what the stream holds now is applied, instead of following it")
    follow.add_argument("--report-s", type=float, default=10.0, help="seconds between progress lines")
    follow.set_defaults(run=_run_follow)

    lookup = commands.add_parser("lookup", help="print the rows of keys")
    lookup.add_argument("--config", type=Path, required=True)
    lookup.add_argument("--table", required=True)
    lookup.add_argument("keys", type=int, nargs="+")
    lookup.set_defaults(run=_run_lookup)

    stats = commands.add_parser("stats", help="print what the store holds per table")
    stats.add_argument("--config", type=Path, required=True)
    stats.set_defaults(run=_run_stats)

    serve = commands.add_parser("serve", help="serve a model repository over KServe v2 HTTP and gRPC")
    serve.add_argument("--repo", type=Path, required=True, help="model repository folder (one folder per model)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--http-port", type=int, default=8000, help="HTTP port (0: any free port)")
    serve.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (0: any free port)")
    serve.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body or message, MiB")
    serve.add_argument("--online-tune", action="store_true",
                       help="re-tune every model's scheduler on its live traffic when load or p95 drifts")
    serve.add_argument("--allow-client-shm", action="store_true",
                       help="let clients pass tensors through /dev/shm regions they register (Triton's system "
                       "shared-memory extension): for clients on this machine; a region gives whoever reaches the "
                       "server that file's contents, with the server's rights")
    serve.add_argument("--model-control", action="store_true",
                       help="let clients load, reload (a new checkpoint in the model's folder) and unload models "
                       "(Triton's explicit model control); every model still loads at start")
    serve.set_defaults(run=_run_serve)

    repo = commands.add_parser("repo", help="write a model repository of reference models with seeded weights")
    repo.add_argument("folder", type=Path)
    repo.add_argument("--models", default="all", help="comma-separated reference models, or 'all'")
    repo.add_argument("--preset", choices=["tiny", "full"], default="tiny")
    repo.add_argument("--num-tasks", type=int, default=3, help="task heads of multi-task models")
    repo.add_argument("--seed", type=int, default=0)
    repo.set_defaults(run=_run_repo)

    for name, helptext in (("bench", "run an open-loop load against a model and report tail latency"),
                           ("tune", "find the scheduler setting with the highest load under the latency target")):
        job = commands.add_parser(name, help=helptext)
        where = job.add_mutually_exclusive_group(required=True)
        where.add_argument("--grpc", help="a running server's gRPC address (load goes there)")
        where.add_argument("--http", help="a running server's HTTP address (load, and knobs for tune)")
        where.add_argument("--repo", type=Path, help="a model repository: load the model in this process")
        job.add_argument("--control", help="tune with --grpc: the server's HTTP address, for the knobs")
        job.add_argument("--shared-memory", action="store_true",
                         help="send the queries' inputs through /dev/shm (a server on this machine started with "
                         "--allow-client-shm): the load generator then takes less of the cores it shares with it")
        job.add_argument("--model", default="rmc1")
        job.add_argument("--preset", choices=["tiny", "full"], default="tiny", help="the served model's preset")
        job.add_argument("--qps", type=float, default=50.0, help="offered load (bench; tune starts there)")
        job.add_argument("--arrivals", choices=["poisson", "constant", "trace"], default="poisson")
        job.add_argument("--trace", type=Path, help="send times, one per line (with --arrivals trace)")
        job.add_argument("--sizes", choices=["fixed", "normal", "lognormal", "production", "file"],
                         default="lognormal", help="items per query (lognormal: mu 5.1 sigma 0.2, as DeepRecSys)")
        job.add_argument("--items", type=int, default=256, help="fixed size")
        job.add_argument("--sizes-file", type=Path, help="one size per line (with --sizes file)")
        job.add_argument("--max-items", type=int, default=1024, help="sizes are clipped to this")
        job.add_argument("--duration", type=float, default=10.0, help="seconds of load per run")
        job.add_argument("--seed", type=int, default=0)
        job.add_argument("--out", type=Path, default=Path("recserve-results"), help="JSON and plots go here")
        if name == "tune":
            job.add_argument("--target-ms", type=float, help="default: the paper's p95 target of the model")
            job.add_argument("--target-scale", type=float, default=1.0, help="scale the target to this machine")
            job.add_argument("--percentile", type=float, choices=[95.0, 99.0], default=95.0)
            job.add_argument("--confirm", type=int, default=0, metavar="N",
                             help="then measure the baseline and the best N more times each, in turn, and report "
                             "the medians' ratio (the best's own figure is the highest of many noisy ones)")
        job.set_defaults(run=_run_load_job, run_name=name)
    return parser


def _run_load_job(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from recserve.config import ArrivalProcess, LoadConfig, SizeDistribution, describe_errors
    from recserve.errors import ConfigError
    from recserve.loadgen.jobs import Endpoint, bench, tune_job

    try:
        load = LoadConfig(
            model=args.model, duration_s=args.duration, seed=args.seed,
            arrivals=ArrivalProcess(kind=args.arrivals, qps=args.qps, path=args.trace),
            sizes=SizeDistribution(kind=args.sizes, items=args.items, path=args.sizes_file, max_items=args.max_items),
        )
    except ValidationError as error:
        raise ConfigError(describe_errors(error)) from None
    if args.shared_memory and args.repo is not None:
        raise ConfigError("--shared-memory is for a running server (--grpc or --http), not --repo")
    endpoint = Endpoint(grpc=args.grpc, http=args.http or args.control, repo=args.repo, preset=args.preset,
                        shared_memory=args.shared_memory)
    if args.run_name == "bench":
        document = bench(endpoint, load, args.out)
        return 1 if document["summary"].errors else 0  # a run with failed queries is not a measurement
    tune_job(endpoint, load, args.out, args.target_ms, args.percentile, args.target_scale,
             confirm_rounds=args.confirm)
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    from recserve.serve.app import ServeOptions, run

    run(ServeOptions(repo=args.repo, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                     max_body_bytes=int(args.max_body_mb * (1 << 20)), online_tuning=args.online_tune,
                     allow_client_shm=args.allow_client_shm, model_control=args.model_control))
    return 0


def _run_repo(args: argparse.Namespace) -> int:
    from recserve.errors import InvalidInputError
    from recserve.models.specs import MODEL_NAMES
    from recserve.serve.repository import write_model_folder

    names = list(MODEL_NAMES) if args.models == "all" else [m.strip() for m in args.models.split(",")]
    unknown = [m for m in names if m not in MODEL_NAMES]
    if unknown:
        raise InvalidInputError(f"unknown models {unknown} (known: {', '.join(MODEL_NAMES)})")
    for name in names:
        write_model_folder(args.folder / name, name, args.preset, args.num_tasks, args.seed)
        print(f"{args.folder / name}: {name} ({args.preset})")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from recserve.demo import run_lookup_demo, run_serving_demo

    if args.lookups:
        run_lookup_demo(rows=args.rows, dim=args.dim, dram_fraction=args.dram_fraction, batches=args.batches,
                        store=args.store)
    else:
        run_serving_demo(args.out, target_ms=args.target_ms, duration_s=args.duration,
                         confirm_rounds=args.confirm)
    return 0


def _run_import(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from recserve.config import load_config
    from recserve.ps import formats
    from recserve.ps.server import HierarchicalPS

    config = load_config(args.config)
    jobs = _state_dict_jobs(args, config) if args.state_dict else _import_jobs(args, config)
    with HierarchicalPS.from_config(config.ps) as ps:
        for table, source in jobs:
            spec = ps.table(table)
            formats.validate(source, spec)
            with tqdm(total=int(source.keys.size), unit="rows", desc=f"import {table}") as bar:
                count = ps.import_table(table, formats.as_int64_keys(source), source.rows, bar.update)
            print(f"{table}: imported {count} rows of dim {spec.dim} from {source.origin}")
    return 0


def _import_jobs(args: argparse.Namespace, config: RecserveConfig) -> ImportJobs:
    from recserve.errors import InvalidInputError
    from recserve.ps import formats

    if args.table is None:
        if args.paths:
            raise InvalidInputError("name the --table the paths go into")
        jobs = []
        for model in config.models:
            for table, folder in zip(model.tables, model.sparse_files, strict=False):
                jobs.append((table, formats.read_hugectr(Path(folder), config.ps.table(table).dim)))
        if not jobs:
            raise InvalidInputError(f"{args.config}: no model lists sparse_files; give --table and paths")
        return jobs
    try:
        spec = config.ps.table(args.table)
    except KeyError:
        raise InvalidInputError(f"table '{args.table}' is not in {args.config}") from None
    return [(args.table, _read_source(args, spec.dim))]


def _read_source(args: argparse.Namespace, dim: int | None) -> TableSource:
    """One table's rows from the command's paths (--format, or guessed), --tensor and --key-map."""
    from recserve.errors import InvalidInputError
    from recserve.ps import formats

    kind = args.format or _guess_format(args.paths)
    if kind == "hugectr" and len(args.paths) == 1:
        if dim is None:
            raise InvalidInputError("a HugeCTR folder does not record its rows' width: give --dim")
        return formats.read_hugectr(args.paths[0], dim)
    if kind == "npy" and len(args.paths) == 2:
        return formats.read_npy(args.paths[0], args.paths[1])
    if kind == "torch" and len(args.paths) == 1:
        return formats.read_torch(args.paths[0], args.tensor, args.key_map)
    raise InvalidInputError(
        f"format {kind} takes {'two paths (keys.npy rows.npy)' if kind == 'npy' else 'one path'}, "
        f"got {len(args.paths)}"
    )


def _run_publish(args: argparse.Namespace) -> int:
    from recserve.config import TableConfig
    from recserve.errors import InvalidInputError
    from recserve.ps import formats
    from recserve.ps.updates import KafkaPublisher, RedisStreamPublisher

    if args.via == "kafka":
        if args.trim_before:
            raise InvalidInputError("--trim-before is for Redis streams: a Kafka topic drops records by its retention")
        publisher: KafkaPublisher | RedisStreamPublisher = KafkaPublisher(args.address or "127.0.0.1:9092",
                                                                          args.stream)
    else:
        publisher = RedisStreamPublisher(args.address or "127.0.0.1:6379", args.stream)
    try:
        if args.trim_before:
            if args.paths or args.table:
                raise InvalidInputError("--trim-before takes no --table or paths")
            assert isinstance(publisher, RedisStreamPublisher)
            print(f"{args.stream}: dropped {publisher.trim_before(args.trim_before)} entries before {args.trim_before}")
            return 0
        if not args.table or not args.paths:
            raise InvalidInputError("name the --table and the paths of its rows")
        source = _read_source(args, args.dim)
        dim = args.dim or (source.rows.shape[1] if source.rows.ndim == 2 else 0)
        formats.validate(source, TableConfig(name=args.table, dim=max(dim, 1)))
        ids = publisher.publish(args.table, formats.as_int64_keys(source), source.rows, args.rows_per_message)
        print(f"{args.stream}: {source.keys.size} rows of table {args.table} in {len(ids)} messages, "
              f"{ids[0]} .. {ids[-1]}" if ids else f"{args.stream}: no rows in {source.origin}")
    finally:
        publisher.close()
    return 0


def _state_dict_jobs(args: argparse.Namespace, config: RecserveConfig) -> ImportJobs:
    """Split a trained model's state_dict: embedding tables become import jobs, dense weights a file."""
    import numpy as np
    import torch

    from recserve.errors import InvalidInputError
    from recserve.models.checkpoint import split_state_dict
    from recserve.ps import formats

    if args.dense_out is None or args.paths or args.table:
        raise InvalidInputError("--state-dict takes --dense-out, and no --table or paths")
    source = formats.read_torch_state_dict(args.state_dict)
    dense, tables = split_state_dict(source)
    known = {t.name for t in config.ps.tables}
    unknown = sorted(set(tables) - known)
    if unknown:
        raise InvalidInputError(f"{args.state_dict}: tables {unknown} are not in {args.config}")
    torch.save(dense, args.dense_out)
    print(f"dense weights ({len(dense)} tensors) -> {args.dense_out}")
    return [
        (name, formats.TableSource(np.arange(w.shape[0], dtype=np.int64), w.detach().float().numpy(),
                                   f"{args.state_dict}:{name}"))
        for name, w in tables.items()
    ]


def _guess_format(paths: list[Path]) -> str:
    from recserve.errors import InvalidInputError

    if len(paths) == 1 and paths[0].is_dir():
        return "hugectr"
    if paths and all(p.suffix == ".npy" for p in paths):
        return "npy"
    if len(paths) == 1 and paths[0].suffix in {".pt", ".pth", ".bin"}:
        return "torch"
    raise InvalidInputError(f"cannot tell the format of {[str(p) for p in paths]}; pass --format")


def _run_follow(args: argparse.Namespace) -> int:
    import time

    from recserve.config import load_config
    from recserve.errors import ConfigError, TierUnavailableError
    from recserve.ps.server import HierarchicalPS
    from recserve.ps.updates import UpdateConsumer, open_source

    config = load_config(args.config)
    settings = config.update_source
    if settings.type == "disabled":
        raise ConfigError(f"{args.config}: update_source.type is 'disabled': there is nothing to follow")
    source = open_source(settings, args.stream)
    with HierarchicalPS.from_config(config.ps) as ps:
        consumer = UpdateConsumer.configured(ps, source, settings).start()
        try:
            while not (args.until_caught_up and consumer.catch_up(timeout_s=args.report_s)):
                if args.until_caught_up and consumer.stats().read_errors:  # a batch job fails rather than waits
                    raise TierUnavailableError("update source", consumer.stats().last_error)
                if not args.until_caught_up:
                    time.sleep(args.report_s)
                print(_update_progress(consumer), flush=True)
        finally:
            consumer.close()
        print(_update_progress(consumer))
    return 0


def _update_progress(consumer: UpdateConsumer) -> str:
    s = consumer.stats()
    return (f"applied {s.applied_messages} messages ({s.applied_rows} rows), skipped {s.skipped_messages}, "
            f"failed reads {s.read_errors}, failed writes {s.write_errors}; at {s.position}"
            + (f"; last error: {s.last_error}" if s.last_error else ""))


def _open_read_only(config_path: Path) -> HierarchicalPS:
    """The store as the config describes it, read-only so that a running server can keep writing it."""
    from recserve.config import load_config
    from recserve.ps.server import HierarchicalPS

    config = load_config(config_path)
    ps_config = config.ps.model_copy(
        update={"rocksdb": config.ps.rocksdb.model_copy(update={"read_only": True})}
    )
    return HierarchicalPS.from_config(ps_config)


def _run_lookup(args: argparse.Namespace) -> int:
    import numpy as np

    with _open_read_only(args.config) as ps:
        rows = ps.lookup_numpy(args.table, np.asarray(args.keys, dtype=np.int64))
        not_found = ps.stats().tables[args.table].not_found
        with np.printoptions(precision=5, suppress=True, linewidth=120):
            for key, row in zip(args.keys, rows, strict=True):
                print(f"{key}: {row}")
    if not_found:
        print(f"({not_found} keys found in no tier: default row shown)", file=sys.stderr)
    return 0


def _run_stats(args: argparse.Namespace) -> int:
    with _open_read_only(args.config) as ps:
        stats = ps.stats()
        print(f"{'table':<24}{'dim':>6}{'dtype':>9}  " + "  ".join(f"{t.name + ' rows':>16}" for t in ps.tiers))
        for name, table in stats.tables.items():
            spec = ps.table(name)
            held = "  ".join(f"{table.tiers[t.name].held.rows:>16,}" for t in ps.tiers)
            print(f"{name:<24}{spec.dim:>6}{spec.dtype:>9}  {held}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
