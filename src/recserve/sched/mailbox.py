"""Shared memory through which a sub-batch's arrays reach its worker: one memcpy in, zero-copy views out.

A 256-item RMC1 sub-batch is 1.4 MB of keys; pickled through a pipe it cost ~2 ms of copies plus a context switch
per 64 KB pipe buffer, several times the model's own compute. So the driver writes the arrays into a shared
file that its worker has mapped and sends only a `Letter` (where each array lies) down the pipe. One sub-batch is
in flight per worker at a time, so one mailbox per worker is reused for every sub-batch; it is replaced by a
bigger file when a sub-batch does not fit.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import uuid
import weakref
from pathlib import Path
from typing import NamedTuple

import numpy as np

ALIGN = 64  # every array starts on a cache line: aligned for any dtype and for vector loads
MIN_CAPACITY = 4 << 20


class Letter(NamedTuple):
    """Where each array of a sub-batch lies in the mailbox: columns of plain values, which pickle in a few
    microseconds (a dataclass per array took 80 us for a query of 17 arrays, more than a small query's lookups)."""

    path: str  # the mailbox file; a new path when the mailbox grew
    capacity: int
    names: tuple[str, ...]
    offsets: tuple[int, ...]
    dtypes: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]


class Mailbox:
    """The writing side (the serving process). Not thread-safe: one thread at a time holds a worker, and its
    mailbox (the worker's driver, or a submitting thread it is lent to)."""

    def __init__(self, shm_dir: Path, capacity: int = MIN_CAPACITY) -> None:
        self._shm_dir = shm_dir
        self._path = ""
        self._map: mmap.mmap | None = None
        self._bytes: np.ndarray | None = None  # the whole map as uint8, made once
        self._capacity = 0
        self._finalizer: weakref.finalize | None = None
        self._allocate(capacity)

    def put(self, arrays: dict[str, np.ndarray]) -> Letter:
        offsets, offset = [], 0
        for array in arrays.values():
            offsets.append(offset)
            offset += _aligned(array.nbytes)
        if offset > self._capacity:
            self._allocate(max(offset, 2 * self._capacity))
        assert self._bytes is not None
        for start, array in zip(offsets, arrays.values(), strict=True):
            self._bytes[start : start + array.nbytes] = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        return Letter(self._path, self._capacity, tuple(arrays), tuple(offsets),
                      tuple(a.dtype.str for a in arrays.values()), tuple(a.shape for a in arrays.values()))

    def close(self) -> None:
        self._bytes = None  # a view keeps the map's buffer exported, and the map then cannot close
        if self._finalizer is not None:
            self._finalizer()

    def _allocate(self, capacity: int) -> None:
        self.close()
        self._path = str(self._shm_dir / f"recserve-{os.getpid()}-mailbox-{uuid.uuid4().hex[:8]}")
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, capacity)
            self._map = mmap.mmap(fd, capacity)
        finally:
            os.close(fd)
        self._capacity = capacity
        self._bytes = np.frombuffer(self._map, dtype=np.uint8)
        self._finalizer = weakref.finalize(self, _release, self._map, self._path)


class MailboxReader:
    """The reading side (a worker): maps the mailbox a letter names, and gives the arrays as views into it."""

    def __init__(self) -> None:
        self._path = ""
        self._map: mmap.mmap | None = None
        self._bytes: np.ndarray | None = None

    def read(self, letter: Letter) -> dict[str, np.ndarray]:
        if letter.path != self._path:
            self.close()
            fd = os.open(letter.path, os.O_RDWR)
            try:
                self._map = mmap.mmap(fd, letter.capacity)
            finally:
                os.close(fd)
            self._path = letter.path
            self._bytes = np.frombuffer(self._map, dtype=np.uint8)
        assert self._bytes is not None
        arrays = {}
        for name, start, dtype, shape in zip(letter.names, letter.offsets, letter.dtypes, letter.shapes,
                                             strict=True):
            array_type = np.dtype(dtype)
            size = array_type.itemsize * _count(shape)
            arrays[name] = self._bytes[start : start + size].view(array_type).reshape(shape)
        return arrays

    def close(self) -> None:
        self._bytes = None
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a view is still alive: the mapping goes with the process
                self._map.close()
            self._map, self._path = None, ""


def _aligned(size: int) -> int:
    return (size + ALIGN - 1) // ALIGN * ALIGN


def _count(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _release(mapping: mmap.mmap, path: str) -> None:
    with contextlib.suppress(BufferError):
        mapping.close()
    Path(path).unlink(missing_ok=True)
