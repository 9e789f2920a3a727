"""SparseBatch: the one sparse input type every module speaks (after TorchRec's KeyedJaggedTensor).

A batch holds the categorical features of `num_items` items (the candidates of one query), per table a flat
int64 tensor of keys and an int64 tensor of offsets into it. Item i of table t owns keys[t][offsets[t][i] :
offsets[t][i + 1]]. For two items and tables "user" (one key each) and "hist" (two keys, then one):

    tables  = ("user", "hist")
    keys    = {"user": [17, 17],        "hist": [5, 9, 5]}
    offsets = {"user": [0, 1, 2],       "hist": [0, 2, 3]}

"Batch size" always means items per query. The server decodes requests into a SparseBatch, the scheduler
splits it by item range, the pooled-embedding module reads it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from numba import njit

from recserve.errors import InvalidInputError


@dataclass(frozen=True, slots=True)
class SparseBatch:
    tables: tuple[str, ...]
    keys: dict[str, torch.Tensor]  # per table [num_keys_t] int64
    offsets: dict[str, torch.Tensor]  # per table [num_items + 1] int64, offsets[0] == 0, monotone
    num_items: int

    # --- constructors ---

    @classmethod
    def from_lengths(cls, features: Mapping[str, tuple[object, object]], *, name: str = "input") -> SparseBatch:
        """From {table: (keys, lengths)}: lengths[i] keys belong to item i."""
        offsets = {}
        for table, (_, lengths) in features.items():
            where = f"{name}: table '{table}': lengths"
            lengths_a = _int_array(lengths, where)
            if lengths_a.ndim != 1:
                raise InvalidInputError(f"{where} must be 1-D, got shape {lengths_a.shape}")
            table_offsets = np.empty(lengths_a.size + 1, dtype=np.int64)
            negative = _running_sum(lengths_a, table_offsets)
            if negative >= 0:
                raise InvalidInputError(f"{where} must be >= 0, got {int(lengths_a[negative])} for item {negative}")
            offsets[table] = table_offsets
        return cls._build({t: (keys, offsets[t]) for t, (keys, _) in features.items()}, name, offsets_valid=True)

    @classmethod
    def from_offsets(cls, features: Mapping[str, tuple[object, object]], *, name: str = "input") -> SparseBatch:
        """From {table: (keys, offsets)}; validates every table and that all agree on the item count.

        Inputs are CPU tensors or numpy arrays (checked with numpy: a few microseconds per table, where torch's
        per-op dispatch costs tens); the batch shares their memory where the dtype is already int64.
        """
        return cls._build(features, name, offsets_valid=False)

    @classmethod
    def _build(cls, features: Mapping[str, tuple[object, object]], name: str, *, offsets_valid: bool
               ) -> SparseBatch:
        """`offsets_valid`: the offsets start at 0 and never decrease (they were summed from lengths >= 0)."""
        if not features:
            raise InvalidInputError(f"{name}: a sparse batch needs at least one table")
        keys, offsets, num_items = {}, {}, None
        for table, (table_keys, table_offsets) in features.items():
            where = f"{name}: table '{table}'"
            k = _int_array(table_keys, f"{where}: keys")
            o = _int_array(table_offsets, f"{where}: offsets")
            _check_jagged(k, o, where, offsets_valid)
            if num_items is None:
                num_items = o.size - 1
            elif o.size - 1 != num_items:
                raise InvalidInputError(f"{where}: has {o.size - 1} items, other tables have {num_items}")
            keys[table], offsets[table] = tensor_of(k), tensor_of(o)
        return cls(tables=tuple(features), keys=keys, offsets=offsets, num_items=int(num_items))

    @classmethod
    def empty(cls, tables: Iterable[str]) -> SparseBatch:
        names = tuple(tables)
        return cls(
            tables=names,
            keys={t: torch.empty(0, dtype=torch.int64) for t in names},
            offsets={t: torch.zeros(1, dtype=torch.int64) for t in names},
            num_items=0,
        )

    # --- verbs ---

    def lengths(self, table: str) -> torch.Tensor:
        return self.offsets[table].diff()

    def slice(self, start: int, stop: int) -> SparseBatch:
        """Items [start, stop): a view of the keys, offsets rebased to 0. Cheap: no key is copied."""
        if not 0 <= start <= stop <= self.num_items:
            raise InvalidInputError(f"item range [{start}, {stop}) is outside [0, {self.num_items})")
        keys, offsets = {}, {}
        for table in self.tables:
            o = self.offsets[table][start : stop + 1]
            first, last = int(o[0]), int(o[-1])
            keys[table] = self.keys[table][first:last]
            offsets[table] = o - first
        return SparseBatch(self.tables, keys, offsets, stop - start)

    def split(self, items_per_batch: int) -> list[SparseBatch]:
        """Consecutive sub-batches of at most items_per_batch items, in item order."""
        if items_per_batch <= 0:
            raise InvalidInputError(f"items_per_batch must be > 0, got {items_per_batch}")
        starts = range(0, self.num_items, items_per_batch)
        return [self.slice(s, min(s + items_per_batch, self.num_items)) for s in starts]

    def select(self, tables: Iterable[str]) -> SparseBatch:
        names = tuple(tables)
        missing = [t for t in names if t not in self.keys]
        if missing:
            raise InvalidInputError(f"sparse batch lacks tables {missing} (has {list(self.tables)})")
        return SparseBatch(names, {t: self.keys[t] for t in names}, {t: self.offsets[t] for t in names}, self.num_items)

    def to(self, device: torch.device | str) -> SparseBatch:
        return SparseBatch(
            self.tables,
            {t: k.to(device) for t, k in self.keys.items()},
            {t: o.to(device) for t, o in self.offsets.items()},
            self.num_items,
        )


def _int_array(value: object, where: str) -> np.ndarray:
    """An int64 numpy array; other integer types widen, floats and bools are refused."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu":
            raise InvalidInputError(f"{where} must be on the cpu to build a batch (move the batch after), "
                                    f"got {value.device}")
        value = value.detach().numpy()
    array = np.asarray(value)
    if array.dtype == np.int64:
        return array
    if array.dtype.kind not in "iu" and not (array.size == 0 and array.dtype.kind == "f"):
        raise InvalidInputError(f"{where} must be int64, got {array.dtype}")
    if array.dtype == np.uint64 and array.size and int(array.max()) > np.iinfo(np.int64).max:
        raise InvalidInputError(f"{where}: values beyond the int64 range")
    return array.astype(np.int64)


SHARE_READ_ONLY_BYTES = 1 << 16


def _spend_read_only_warning() -> None:
    """torch warns the first time (only) a tensor shares read-only memory. Spend that warning here, silenced,
    at import: silencing it on every call instead (catch_warnings) cost 7 us a tensor, a tenth of the HTTP front
    end's Python time for a 256-item query."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.from_numpy(np.frombuffer(bytes(8), dtype=np.int64))


_spend_read_only_warning()


def tensor_of(array: np.ndarray) -> torch.Tensor:
    """A tensor of a request's array, which the model only reads.

    A request's arrays arrive in read-only buffers (1.3 MB of keys for a 256-item RMC1 query). Nothing writes
    them, so big ones are shared, not copied; small ones cost next to nothing to copy, and are."""
    if not array.flags.aligned or (not array.flags.writeable and array.nbytes < SHARE_READ_ONLY_BYTES):
        array = array.copy()
    return torch.from_numpy(array)


@njit(nogil=True, cache=True)
def _running_sum(lengths, offsets):
    """offsets = [0, cumsum(lengths)]; the index of the first negative length, or -1. One compiled pass: numpy's
    min, cumsum and checks cost ~30 us a table, which a 1-item query of 8 tables pays 8 times."""
    total = 0
    offsets[0] = 0
    for i in range(lengths.size):
        if lengths[i] < 0:
            return i
        total += lengths[i]
        offsets[i + 1] = total
    return -1


def _check_jagged(keys: np.ndarray, offsets: np.ndarray, where: str, offsets_valid: bool = False) -> None:
    if keys.ndim != 1:
        raise InvalidInputError(f"{where}: keys must be 1-D, got shape {keys.shape}")
    if offsets.ndim != 1 or offsets.size == 0:
        raise InvalidInputError(
            f"{where}: offsets must be 1-D with num_items + 1 entries, got shape {offsets.shape}"
        )
    if not offsets_valid and int(offsets[0]) != 0:
        raise InvalidInputError(f"{where}: offsets must start at 0, got {int(offsets[0])}")
    if not offsets_valid and offsets.size > 1 and bool((offsets[1:] < offsets[:-1]).any()):
        raise InvalidInputError(f"{where}: offsets must not decrease")
    if int(offsets[-1]) != keys.size:
        raise InvalidInputError(
            f"{where}: offsets end at {int(offsets[-1])} but there are {keys.size} keys "
            "(lengths must sum to the number of keys)"
        )
