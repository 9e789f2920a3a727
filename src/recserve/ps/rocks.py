"""The persistent tier: RocksDB through rocksdict, one column family per table, the full copy of the model.

Keys are stored as 8 big-endian bytes with the sign bit flipped, so RocksDB's byte order is numeric order
(SST files must be written in sorted order); values are the raw row bytes in the table's dtype (16-bit rows as
their bits, `ps/rows.py`).

A catalog in the default column family maps each table to its current column family ("t.<table>.<gen>").
Imports write SST files, ingest them into a *new* column family, and only then repoint the catalog and drop
the old one: a failed or interrupted import leaves the previous table readable and untouched, and its
half-built column family is dropped on the next open.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recserve.config import RocksTierConfig, RowDtype, TableConfig
from recserve.errors import ConfigError, NotFoundError, TierUnavailableError
from recserve.ps.rows import from_bytes, row_bytes, to_storage
from recserve.ps.tiers import LookupResult, TierTableStats, check_rows

log = logging.getLogger(__name__)

_SIGN = np.uint64(1 << 63)
_CATALOG_PREFIX = b"recserve/table/"
SST_ROWS = 1 << 20  # rows per SST file written during an import


def encode_keys(keys: np.ndarray) -> list[bytes]:
    """int64 keys -> 8-byte keys whose byte order is numeric order."""
    raw = (keys.view(np.uint64) ^ _SIGN).astype(">u8").tobytes()
    return [raw[i : i + 8] for i in range(0, len(raw), 8)]


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    column_family: str
    dim: int
    dtype: RowDtype
    generation: int
    imported_rows: int

    def to_bytes(self) -> bytes:
        return json.dumps({s: getattr(self, s) for s in self.__slots__}).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> CatalogEntry:
        return cls(**json.loads(raw))


def _unavailable(path: Path, error: Exception) -> TierUnavailableError:
    text = str(error)
    if "lock" in text.lower():
        return TierUnavailableError(
            "rocksdb", f"store {path} is locked by another process (one writer at a time; open it "
            f"read_only to share it): {text}"
        )
    return TierUnavailableError("rocksdb", f"cannot open store {path}: {text}")


class RocksTier:
    """Implements `Tier` over one RocksDB directory."""

    name = "rocksdb"

    def __init__(self, config: RocksTierConfig, tables: list[TableConfig]) -> None:
        import rocksdict  # heavy; loaded when a store is opened

        self._rd = rocksdict
        self._config = config
        self._path = Path(config.path)
        self._lock = threading.Lock()
        self._specs = {t.name: t for t in tables}
        self._block_cache = rocksdict.Cache(config.block_cache_bytes) if config.block_cache_bytes else None
        options = self._options()
        options.create_if_missing(True)
        if not config.read_only:
            self._path.mkdir(parents=True, exist_ok=True)
        elif not (self._path / "CURRENT").exists():
            raise NotFoundError(f"rocksdb: no store at {self._path} (create one with `recserve import`)")
        families = self._existing_families()
        access = rocksdict.AccessType.read_only() if config.read_only else rocksdict.AccessType.read_write()
        try:
            self._db = rocksdict.Rdict(
                str(self._path), options, column_families={cf: self._options() for cf in families},
                access_type=access,
            )
        except Exception as error:
            raise _unavailable(self._path, error) from None
        self._catalog = self._read_catalog()
        self._families = {name: self._db.get_column_family(e.column_family) for name, e in self._catalog.items()}
        if not config.read_only:
            self._drop_orphans(families)
        for table in tables:
            self._ensure_table(table)

    # --- Tier ---

    def lookup(self, table: str, keys: np.ndarray) -> LookupResult:
        family, entry = self._family(table)
        size = row_bytes(entry.dtype, entry.dim)
        rows = np.zeros((keys.size, entry.dim), dtype=np.float32)
        found = np.zeros(keys.size, dtype=np.bool_)
        step = self._config.max_get_batch_size
        # Asked in key order: RocksDB's multi-get sorts only 32 keys at a time, and sorted keys walk the files'
        # index blocks in order, one search's path still in cache for the next (0.84-0.93x the time,
        # benchmarks/NOTES.md).
        order = np.argsort(keys)
        in_order = keys[order]
        for start in range(0, keys.size, step):
            values = family.get(encode_keys(in_order[start : start + step]))
            hit = np.fromiter((v is not None for v in values), dtype=np.bool_, count=len(values))
            present = values if hit.all() else [v for v in values if v is not None]
            raw = b"".join(present)
            if len(raw) != len(present) * size:
                raise TierUnavailableError("rocksdb", f"table '{table}': stored rows are not {size} bytes")
            idx = order[np.flatnonzero(hit) + start]
            rows[idx] = from_bytes(raw, entry.dtype, entry.dim)
            found[idx] = True
        return LookupResult(rows=rows, found=found)

    def insert(self, table: str, keys: np.ndarray, rows: np.ndarray, *, unless_updated_since: int | None = None
               ) -> None:
        """Write rows; the persistent tier is the source of truth, so no token ever holds a write back."""
        _, entry = self._family(table)
        check_rows(table, rows, keys.size, entry.dim)
        data = to_storage(rows, entry.dtype, table).tobytes()
        size = row_bytes(entry.dtype, entry.dim)
        batch = self._batch_for(entry)
        for i, key in enumerate(encode_keys(keys)):
            batch.put(key, data[i * size : (i + 1) * size])
        self._write(batch)

    def update(self, table: str, keys: np.ndarray, rows: np.ndarray) -> int:
        """The persistent tier holds every key, so an update writes all of them."""
        self.insert(table, keys, rows)
        return int(keys.size)

    def update_token(self, table: str) -> None:
        return None

    def begin_update(self, table: str) -> None:
        pass

    def end_update(self, table: str) -> None:
        pass

    def evict(self, table: str, keys: np.ndarray) -> int:
        family, entry = self._family(table)
        present = family.get(encode_keys(keys))  # to report how many were held
        batch = self._batch_for(entry)
        for key in encode_keys(keys):
            batch.delete(key)
        self._write(batch)
        return sum(v is not None for v in present)

    def stats(self) -> dict[str, TierTableStats]:
        out = {}
        for name, (family, _) in ((n, self._family(n)) for n in self._catalog):
            estimate = family.property_int_value("rocksdb.estimate-num-keys") or 0
            out[name] = TierTableStats(rows=int(estimate))
        return out

    def close(self) -> None:
        self._families.clear()
        self._db.close()

    def export_table(self, table: str) -> tuple[np.ndarray, np.ndarray]:
        """Every (key, row) of a table, keys ascending: the inverse of `import_table`."""
        family, entry = self._family(table)
        raw_keys, raw_rows = [], []
        for key, value in family.items():
            raw_keys.append(key)
            raw_rows.append(value)
        keys = np.frombuffer(b"".join(raw_keys), dtype=">u8").astype(np.uint64) ^ _SIGN
        rows = from_bytes(b"".join(raw_rows), entry.dtype, entry.dim)
        return keys.view(np.int64), np.require(rows, requirements="W")  # float32 rows are a view of the bytes

    # --- bulk import ---

    def import_table(
        self, table: str, keys: np.ndarray, rows: np.ndarray, progress: Callable[[int], None] | None = None
    ) -> int:
        """Replace a table's contents by (keys, rows) through SST ingestion; atomic for readers.

        `keys` must be unique (the caller checks, naming its file); `rows` may be a memory map: rows are read
        in key order, one SST file at a time.
        """
        if self._config.read_only:
            raise TierUnavailableError("rocksdb", f"store {self._path} is open read-only; cannot import")
        old = self._catalog.get(table)
        spec = self._specs[table]
        check_rows(table, rows[:0], 0, spec.dim)
        entry = CatalogEntry(
            column_family=f"t.{table}.{(old.generation + 1) if old else 1}", dim=spec.dim, dtype=spec.dtype,
            generation=(old.generation + 1) if old else 1, imported_rows=int(keys.size),
        )
        staging = self._path / f"import-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        family = None
        try:
            family = self._db.create_column_family(entry.column_family, self._options())
            files = self._write_ssts(staging, table, keys, rows, entry, progress)
            if files:
                ingest = self._rd.IngestExternalFileOptions()
                ingest.set_move_files(True)
                family.ingest_external_file([str(f) for f in files], ingest)
            self._swap(table, entry, family, old)
        except Exception as error:
            if family is not None and self._catalog.get(table) != entry:
                self._db.drop_column_family(entry.column_family)
            if isinstance(error, (OSError, self._rd.DbClosedError)) or "IO error" in str(error):
                raise TierUnavailableError(
                    "rocksdb", f"import of table '{table}' failed; the previous contents are untouched: {error}"
                ) from error
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return int(keys.size)

    def _write_ssts(
        self, staging: Path, table: str, keys: np.ndarray, rows: np.ndarray, entry: CatalogEntry,
        progress: Callable[[int], None] | None,
    ) -> list[Path]:
        order = np.argsort(keys, kind="stable")
        size = row_bytes(entry.dtype, entry.dim)
        files = []
        for start in range(0, keys.size, SST_ROWS):
            chunk = order[start : start + SST_ROWS]
            # fancy-index the (possibly memory-mapped) rows in ascending file order, then reorder by key
            by_position = np.sort(chunk)
            block = to_storage(rows[by_position], entry.dtype, table, by_position)
            block = block[np.searchsorted(by_position, chunk)]
            data = block.tobytes()
            path = staging / f"{start // SST_ROWS:06d}.sst"
            writer = self._rd.SstFileWriter(options=self._options())
            writer.open(str(path))
            for i, key in enumerate(encode_keys(keys[chunk])):
                writer[key] = data[i * size : (i + 1) * size]
            writer.finish()
            files.append(path)
            if progress:
                progress(chunk.size)
        return files

    def _swap(self, table: str, entry: CatalogEntry, family: object, old: CatalogEntry | None) -> None:
        write_options = self._rd.WriteOptions()
        write_options.sync = True
        self._db.put(_CATALOG_PREFIX + table.encode(), entry.to_bytes(), write_options)
        with self._lock:
            self._catalog[table] = entry
            self._families[table] = family
        if old is not None:
            self._db.drop_column_family(old.column_family)

    # --- helpers ---

    def _family(self, table: str) -> tuple[object, CatalogEntry]:
        with self._lock:
            try:
                return self._families[table], self._catalog[table]
            except KeyError:
                raise NotFoundError(f"rocksdb: unknown table '{table}'") from None

    def _options(self) -> object:
        options = self._rd.Options(raw_mode=True)
        # Embedding rows are random-looking floats: compression saves no space, and trying it on every block
        # slows the import.
        options.set_compression_type(self._rd.DBCompressionType.none())
        # A point read of a row in the page cache then costs a memory access instead of a pread and a copy
        # into the block cache: 1.5x the keys/s measured on a 4M-row table (benchmarks/NOTES.md, RocksDB
        # reads).
        options.set_allow_mmap_reads(self._config.mmap_reads)
        if self._block_cache is not None:  # one cache shared by every table's column family
            table_options = self._rd.BlockBasedOptions()
            table_options.set_block_cache(self._block_cache)
            table_options.set_bloom_filter(10, False)
            options.set_block_based_table_factory(table_options)
        return options

    def _existing_families(self) -> list[str]:
        if not (self._path / "CURRENT").exists():
            return []
        try:
            return self._rd.Rdict.list_cf(str(self._path))
        except Exception as error:
            raise _unavailable(self._path, error) from None

    def _read_catalog(self) -> dict[str, CatalogEntry]:
        catalog = {}
        for key, value in self._db.items(from_key=_CATALOG_PREFIX):
            if not key.startswith(_CATALOG_PREFIX):
                break
            catalog[key[len(_CATALOG_PREFIX) :].decode()] = CatalogEntry.from_bytes(value)
        return catalog

    def _drop_orphans(self, families: list[str]) -> None:
        live = {e.column_family for e in self._catalog.values()}
        for family in families:
            if family.startswith("t.") and family not in live:
                log.warning("rocksdb: dropping column family %s left by an interrupted import", family)
                self._db.drop_column_family(family)
        for leftover in self._path.glob("import-*"):
            shutil.rmtree(leftover, ignore_errors=True)

    def _ensure_table(self, table: TableConfig) -> None:
        entry = self._catalog.get(table.name)
        if entry is not None:
            if (entry.dim, entry.dtype) != (table.dim, table.dtype):
                raise ConfigError(
                    f"table '{table.name}': the store at {self._path} holds dim {entry.dim} {entry.dtype}, "
                    f"the config says dim {table.dim} {table.dtype}"
                )
            return
        if self._config.read_only:
            raise NotFoundError(f"rocksdb: table '{table.name}' is not in the read-only store {self._path}")
        entry = CatalogEntry(f"t.{table.name}.0", table.dim, table.dtype, generation=0, imported_rows=0)
        family = self._db.create_column_family(entry.column_family, self._options())
        self._swap(table.name, entry, family, None)

    def _batch_for(self, entry: CatalogEntry) -> object:
        """A write batch aimed at the table's current column family."""
        batch = self._rd.WriteBatch(raw_mode=True)
        batch.set_default_column_family(self._db.get_column_family_handle(entry.column_family))
        return batch

    def _write(self, batch: object) -> None:
        if self._config.read_only:
            raise TierUnavailableError("rocksdb", f"store {self._path} is open read-only; cannot write")
        try:
            self._db.write(batch)
        except Exception as error:
            raise TierUnavailableError("rocksdb", f"write failed: {error}") from error
