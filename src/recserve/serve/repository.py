"""The model repository: one folder per served model, each a checkpoint plus how to serve it.

    repo/<name>/model.json    which reference model, preset, tasks      (models/checkpoint.py writes these three)
    repo/<name>/dense.pt      dense weights (a state_dict, loaded weights-only)
    repo/<name>/sparse/<table>/  embedding tables, HugeCTR format, imported into the model's parameter server
    repo/<name>/serve.yaml    optional ServingConfig: scheduler knobs, latency target, PS tiers, limits

Inputs of every model (the README shows a tritonclient example):
    <table>_keys     INT64 [total keys]      keys of every item, item after item
    <table>_lengths  INT32 or INT64 [items]  keys per item
    dense            FP32 [items, width]     only for models with dense features
Output: scores FP32 [items, tasks]. <table> is the table's name without the model's prefix ("t0", "ad").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from pydantic import ValidationError

from recserve.config import PSConfig, ServingConfig, describe_errors
from recserve.errors import ConfigError, InvalidInputError, NotFoundError
from recserve.models import table_configs
from recserve.models.checkpoint import checkpoint_spec, import_tables
from recserve.models.specs import ModelSpec
from recserve.ps.dram import DramTier
from recserve.ps.server import HierarchicalPS, ReadThrough
from recserve.ps.tiers import Tier
from recserve.ps.updates import UpdateConsumer, UpdateSource, open_source
from recserve.sched.executor import Executor
from recserve.sched.inline import InlineReplica
from recserve.sched.policy import SchedulerKnobs
from recserve.sched.worker import WorkerSetup
from recserve.serve.codec import DATATYPE_OF
from recserve.sparse import SparseBatch

log = logging.getLogger(__name__)

SERVING_FILE = "serve.yaml"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatypes: tuple[str, ...]  # accepted v2 datatypes; the first is the one advertised
    shape: tuple[int, ...]  # -1: any size


@dataclass(frozen=True, slots=True)
class ModelSignature:
    """What a model takes and gives, and how to turn checked tensors into (dense, SparseBatch).

    The tensor lists are built once here: `decode` runs on every request, and DIN has 506 inputs.
    """

    spec: ModelSpec
    max_items: int
    inputs: tuple[TensorSpec, ...] = field(init=False)
    outputs: tuple[TensorSpec, ...] = field(init=False)
    _features: tuple[tuple[str, str, str], ...] = field(init=False)  # (table, keys input, lengths input)
    _input_names: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        features = tuple((t.name, f"{short_name(self.spec, t.name)}_keys", f"{short_name(self.spec, t.name)}_lengths")
                         for t in self.spec.tables)
        inputs = []
        for _, keys, lengths in features:
            inputs.append(TensorSpec(keys, ("INT64",), (-1,)))
            inputs.append(TensorSpec(lengths, ("INT64", "INT32"), (-1,)))
        if self.spec.dense_features:
            inputs.append(TensorSpec("dense", ("FP32",), (-1, self.spec.dense_features)))
        object.__setattr__(self, "_features", features)  # frozen: set once, here
        object.__setattr__(self, "inputs", tuple(inputs))
        object.__setattr__(self, "_input_names", frozenset(t.name for t in inputs))
        object.__setattr__(self, "outputs", (TensorSpec("scores", ("FP32",), (-1, self.spec.num_tasks)),))

    def decode(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray | None, SparseBatch]:
        """Check names, datatypes and shapes, and build the query. Errors name the input at fault."""
        missing = [t.name for t in self.inputs if t.name not in inputs]
        extra = [name for name in inputs if name not in self._input_names]
        if extra:
            raise InvalidInputError(f"model '{self.spec.name}': unexpected inputs {extra[:5]}")
        if missing:
            raise InvalidInputError(f"model '{self.spec.name}': missing inputs {missing[:5]}"
                                    + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        for tensor_spec in self.inputs:
            _check_tensor(inputs[tensor_spec.name], tensor_spec)
        features = {}
        for table, keys_name, lengths_name in self._features:
            lengths = inputs[lengths_name]
            self._check_items(lengths.shape[0], lengths_name)
            features[table] = (inputs[keys_name], lengths)
        sparse = SparseBatch.from_lengths(features, name=f"model '{self.spec.name}'")
        dense = None
        if self.spec.dense_features:
            dense = inputs["dense"]
            if dense.shape[0] != sparse.num_items:
                raise InvalidInputError(
                    f"input 'dense' has {dense.shape[0]} items, the lengths inputs have {sparse.num_items}"
                )
        return dense, sparse

    def _check_items(self, items: int, where: str) -> None:
        if items == 0:
            raise InvalidInputError(f"empty query: input '{where}' has 0 items")
        if items > self.max_items:
            raise InvalidInputError(
                f"input '{where}' has {items} items, model '{self.spec.name}' takes at most {self.max_items} per "
                "query (serve.yaml max_items)"
            )


def short_name(spec: ModelSpec, table: str) -> str:
    prefix = f"{spec.name}_"
    return table[len(prefix):] if table.startswith(prefix) else table


def _check_tensor(tensor: np.ndarray, spec: TensorSpec) -> None:
    datatype = DATATYPE_OF.get(tensor.dtype)
    if datatype not in spec.datatypes:
        raise InvalidInputError(f"input '{spec.name}': datatype must be {' or '.join(spec.datatypes)}, got "
                                f"{datatype or tensor.dtype}")
    shape = tensor.shape
    if len(shape) != len(spec.shape) or any(
        want != -1 and got != want for got, want in zip(shape, spec.shape, strict=True)
    ):
        wanted = ["N" if d == -1 else d for d in spec.shape]
        raise InvalidInputError(f"input '{spec.name}': shape must be {wanted}, got {list(tensor.shape)}")


@dataclass
class ServedModel:
    name: str
    folder: Path
    signature: ModelSignature
    config: ServingConfig
    ps: HierarchicalPS  # the owner: holds the shared-memory tables and the read-write persistent store
    executor: Executor
    updates: UpdateConsumer | None = None  # applies the update stream to ps, when serve.yaml names one
    alternate_store: bool = False  # its RocksDB store is `<path>.alt` (see `load_model`)

    def close(self) -> None:
        if self.updates:
            self.updates.close()
        self.executor.close()
        self.ps.close()


def read_serving_config(folder: Path) -> ServingConfig:
    path = folder / SERVING_FILE
    if not path.exists():
        return ServingConfig()
    try:
        data = yaml.safe_load(path.read_text()) or {}
        return ServingConfig.model_validate(data)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    except ValidationError as error:
        raise ConfigError(f"{path}: {describe_errors(error)}") from None


def model_folders(repo: Path) -> list[Path]:
    if not repo.is_dir():
        raise NotFoundError(f"model repository {repo} is not a folder")
    folders = sorted(p for p in repo.iterdir() if p.is_dir() and (p / "model.json").exists())
    if not folders:
        raise NotFoundError(f"model repository {repo} has no model folders (each needs a model.json)")
    return folders


def load_model(folder: Path, alternate_store: bool = False) -> ServedModel:
    """Import the model's tables into its own parameter server, start its workers; ready to serve.

    `alternate_store`: the RocksDB store's twin directory (`<path>.alt`) instead of `<path>`: a reload builds the
    new copy while the old one, still serving, holds its store open (RocksDB lets one process open it)."""
    spec = checkpoint_spec(folder)
    config = read_serving_config(folder)
    source = _update_source(folder, config)
    ps = _parameter_server(folder, spec, config, alternate_store)
    try:
        import_tables(folder, spec, ps)
        dram = [t for t in ps.tiers if isinstance(t, DramTier)]
        persistent = _tiers_below_dram(ps)
        s = config.scheduler
        setup = WorkerSetup(folder=folder, spec=spec, tables=list(ps.tables.values()),
                            dram=dram[0].handles() if dram else [],
                            remote_tier=persistent.name if persistent else None, idle_spin_s=s.idle_spin_us / 1e6)
        knobs = SchedulerKnobs(s.batch_size, s.num_workers, s.threads_per_worker, s.accelerator_threshold,
                               s.max_queue)
        # the inline replica reads what the workers read: the DRAM tier, then the persistent store
        inline = InlineReplica(setup, [*dram[:1], *([persistent] if persistent else [])],
                               s.inline_max_items) if s.inline_max_items else None
        executor = Executor(folder.name, setup, knobs, s.latency_target_ms / 1e3, persistent,
                            inline=inline).start()
    except BaseException:
        ps.close()
        if source:
            source.close()
        raise
    signature = ModelSignature(spec, config.max_items)
    return ServedModel(folder.name, folder, signature, config, ps, executor,
                       _start_updates(folder, spec, config, ps, source) if source else None, alternate_store)


def _tiers_below_dram(ps: HierarchicalPS) -> Tier | None:
    """What answers the workers' DRAM misses in the serving process: RocksDB, or Redis then RocksDB as one."""
    below = [t for t in ps.tiers if not isinstance(t, DramTier)]
    if len(below) <= 1:
        return below[0] if below else None
    return ReadThrough(list(ps.tables.values()), below)


def _update_source(folder: Path, config: ServingConfig) -> UpdateSource | None:
    if config.update_source.type == "disabled":
        return None
    try:
        return open_source(config.update_source, default_stream=f"recserve.{folder.name}")
    except ConfigError as error:
        raise ConfigError(f"{folder / SERVING_FILE}: {error}") from None


def _start_updates(folder: Path, spec: ModelSpec, config: ServingConfig, ps: HierarchicalPS,
                   source: UpdateSource) -> UpdateConsumer:
    """Applies the stream on top of the checkpoint just imported: from its first message, as a restarted node
    must; the model reports ready once what the stream holds now is applied (or the wait times out)."""
    settings = config.update_source
    names = {t.name: t.name for t in spec.tables} | {short_name(spec, t.name): t.name for t in spec.tables}
    updates = UpdateConsumer.configured(ps, source, settings, table_names=names).start()
    if not updates.catch_up(settings.catch_up_timeout_s):
        log.warning("model %s: serving before the update stream is applied (%s)", folder.name,
                    updates.stats().last_error or "still catching up")
    return updates


def _parameter_server(folder: Path, spec: ModelSpec, config: ServingConfig,
                      alternate_store: bool = False) -> HierarchicalPS:
    where = folder / SERVING_FILE
    if not config.dram.shared_memory:
        raise ConfigError(f"{where}: dram.shared_memory must be true: worker processes attach the DRAM tier")
    if not config.rocksdb.enabled and (not config.dram.enabled or config.dram_fraction < 1.0):
        raise ConfigError(f"{where}: without the rocksdb tier the DRAM tier must hold every row "
                          "(dram.enabled true, dram_fraction 1.0)")
    rocksdb = config.rocksdb
    if not rocksdb.path.is_absolute():
        rocksdb = rocksdb.model_copy(update={"path": folder / rocksdb.path})
    if alternate_store:
        rocksdb = rocksdb.model_copy(update={"path": rocksdb.path.with_name(rocksdb.path.name + ".alt")})
    tables = table_configs(spec, config.dram_fraction, config.table_dtype)
    ps_config = PSConfig(tables=tables, dram=config.dram, redis=config.redis, rocksdb=rocksdb)
    return HierarchicalPS.from_config(ps_config)


def write_model_folder(folder: Path, model: str, preset: str = "tiny", num_tasks: int = 3, seed: int = 0,
                       serving: dict | None = None) -> None:
    """A servable model folder: a checkpoint of the reference model with seeded weights and tables, and its
    serve.yaml (defaults unless `serving` says otherwise, checked against ServingConfig)."""
    from recserve.models import build_model
    from recserve.models.checkpoint import save_checkpoint
    from recserve.models.specs import model_spec

    spec = model_spec(model, preset, num_tasks)  # type: ignore[arg-type]
    settings = ServingConfig.model_validate(serving or {})
    save_checkpoint(build_model(spec, seed=seed), folder, preset)
    write_serving_config(folder, settings)


def write_serving_config(folder: Path, settings: ServingConfig) -> None:
    """The folder's serve.yaml: only what differs from the defaults."""
    (folder / SERVING_FILE).write_text(yaml.safe_dump(settings.model_dump(mode="json", exclude_defaults=True)
                                                      or {}, sort_keys=False))
