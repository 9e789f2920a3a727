"""Triton's system shared-memory extension: clients on the same machine pass tensors through /dev/shm.

A client creates a POSIX shared-memory object (`shm_open` key "/name", the file /dev/shm/name), registers a region
of it with the server (name, key, offset, byte size), writes its inputs there and sends a request whose inputs
name region, offset and size instead of carrying the bytes: a 256-item RMC1 query is then ~2 KB on the wire
instead of 1.4 MB, and neither side pays for moving the rest through a socket. Outputs can travel the same way.
tritonclient's `utils.shared_memory` and `register_system_shared_memory` drive it unchanged.

Off unless the server starts with `--allow-client-shm` (Triton's flag, and its default): a registered region lets
whoever reaches the server read and write a file of /dev/shm with the server's rights. The server's own files
there (`recserve-*`: the DRAM tier's tables, the workers' mailboxes) are refused even then.

Why `pread`/`pwrite` on a descriptor and not a memory map: a client may shrink its file at any time, and a mapped
read past the new end is SIGBUS, which kills the server; `pread` comes back short and the request gets a 400.
Reading also copies each tensor out once, which it must be anyway: the client may rewrite its region while the
server checks the query (lengths that sum to the keys) and after, and checked bytes must not change under a worker.
"""

from __future__ import annotations

import math
import os
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recserve.errors import InvalidInputError, NotFoundError

SHM_DIR = Path("/dev/shm")  # where glibc's shm_open puts "/name"
OWN_FILE_PREFIX = "recserve-"  # the DRAM tier's and the mailboxes' files: never a client's to read or write
MAX_REGIONS = 1024
PARAM_REGION, PARAM_OFFSET, PARAM_BYTE_SIZE = "shared_memory_region", "shared_memory_offset", "shared_memory_byte_size"


@dataclass(frozen=True, slots=True)
class TensorRef:
    """Where a tensor lies: its `shared_memory_*` parameters."""

    region: str
    offset: int
    byte_size: int

    @staticmethod
    def from_parameters(parameters: Mapping[str, object], where: str) -> TensorRef | None:
        """The tensor's place if its parameters name a region, else None; both region and size, or neither."""
        if PARAM_REGION not in parameters and PARAM_BYTE_SIZE not in parameters:
            if PARAM_OFFSET in parameters:
                raise InvalidInputError(f"{where}: {PARAM_OFFSET} given without {PARAM_REGION}")
            return None
        if PARAM_REGION not in parameters or PARAM_BYTE_SIZE not in parameters:
            raise InvalidInputError(f"{where}: {PARAM_REGION} and {PARAM_BYTE_SIZE} must be given together")
        region = parameters[PARAM_REGION]
        if not isinstance(region, str) or not region:
            raise InvalidInputError(f"{where}: {PARAM_REGION} must be a region's name, got {region!r}")
        return TensorRef(region, _count(parameters.get(PARAM_OFFSET, 0), f"{where}: {PARAM_OFFSET}"),
                         _count(parameters[PARAM_BYTE_SIZE], f"{where}: {PARAM_BYTE_SIZE}"))

    def parameters(self) -> dict[str, object]:
        """As a response describes an output written to the region."""
        described: dict[str, object] = {PARAM_REGION: self.region, PARAM_BYTE_SIZE: self.byte_size}
        if self.offset:
            described[PARAM_OFFSET] = self.offset
        return described


# An input that lies in shared memory, read once the whole request is checked: (name, place, dtype, shape)
SharedInput = tuple[str, TensorRef, np.dtype, list[int]]


@dataclass(frozen=True, slots=True)
class Region:
    name: str
    key: str
    offset: int  # into the file
    byte_size: int
    file: _File

    def status(self) -> dict[str, object]:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}


class _File:
    """A region's open descriptor, closed when the last holder lets go: unregistering while another thread reads
    must not close the number under it (the kernel could hand it to the next file opened, and the read would
    then come from that file)."""

    def __init__(self, fd: int, writable: bool) -> None:
        self.fd = fd
        self.writable = writable

    def __del__(self) -> None:
        os.close(self.fd)


class SharedMemoryRegistry:
    """The regions clients registered; thread-safe (both front ends and their threads share one)."""

    def __init__(self, enabled: bool, max_request_bytes: int) -> None:
        self.enabled = enabled
        self.max_request_bytes = max_request_bytes  # the inputs one request may read, as its body may carry
        self._regions: dict[str, Region] = {}
        self._lock = threading.Lock()

    # --- the extension's API ---

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self._check_enabled()
        if not isinstance(name, str) or not name:
            raise InvalidInputError(f"a region needs a name, got {name!r}")
        offset = _count(offset, f"region '{name}': offset")
        byte_size = _count(byte_size, f"region '{name}': byte_size")
        path = _path_of(key, name)
        with self._lock:
            if name in self._regions:
                raise InvalidInputError(f"region '{name}' is already registered (key '{self._regions[name].key}')")
            if len(self._regions) >= MAX_REGIONS:
                raise InvalidInputError(f"at most {MAX_REGIONS} regions may be registered; unregister some first")
            self._regions[name] = Region(name, key, offset, byte_size, _open(path, key, name, offset + byte_size))

    def unregister(self, name: str = "") -> None:
        """One region, or every one when name is empty. An unknown name is no error (as in Triton)."""
        self._check_enabled()
        with self._lock:
            if name:
                self._regions.pop(name, None)
            else:
                self._regions.clear()

    def status(self, name: str = "") -> list[dict[str, object]]:
        self._check_enabled()
        if name:
            return [self._region(name, "status").status()]
        with self._lock:
            return [region.status() for region in self._regions.values()]

    def close(self) -> None:
        with self._lock:
            self._regions.clear()

    # --- tensors ---

    def read_inputs(self, wanted: list[SharedInput]) -> dict[str, np.ndarray]:
        """Each (input name, place, dtype, shape) read out of its region into an array of its own."""
        self._check_enabled()
        total = sum(ref.byte_size for _, ref, _, _ in wanted)
        if total > self.max_request_bytes:
            raise InvalidInputError(f"the inputs in shared memory are {total} bytes, more than the "
                                    f"{self.max_request_bytes} a request may carry")
        return {name: self._read(ref, dtype, shape, f"input '{name}'") for name, ref, dtype, shape in wanted}

    def check_output(self, ref: TensorRef, where: str) -> Region:
        """The region of an output's place, refused before the query runs where it cannot take the output."""
        self._check_enabled()
        region = self._region(ref.region, where)
        self._check_within(region, ref, where)
        if not region.file.writable:
            raise InvalidInputError(f"{where}: region '{region.name}' (key '{region.key}') is read-only to the server")
        return region

    def write_output(self, ref: TensorRef, tensor: np.ndarray, where: str) -> TensorRef:
        """Write tensor at its place; the place as the response describes it (byte size: what was written)."""
        region = self.check_output(ref, where)  # again: the client may have unregistered it meanwhile
        data = np.ascontiguousarray(tensor)
        if data.nbytes > ref.byte_size:
            raise InvalidInputError(f"{where}: {PARAM_BYTE_SIZE} is {ref.byte_size}, the output needs {data.nbytes}")
        written = os.pwrite(region.file.fd, data.data.cast("B"), region.offset + ref.offset)
        if written != data.nbytes:
            raise InvalidInputError(f"{where}: region '{region.name}' took {written} of {data.nbytes} bytes")
        return TensorRef(ref.region, ref.offset, data.nbytes)

    def _read(self, ref: TensorRef, dtype: np.dtype, shape: list[int], where: str) -> np.ndarray:
        region = self._region(ref.region, where)
        needed = math.prod(shape) * dtype.itemsize
        if ref.byte_size != needed:
            raise InvalidInputError(f"{where}: {PARAM_BYTE_SIZE} is {ref.byte_size}, shape {shape} of "
                                    f"{dtype.name} needs {needed}")
        self._check_within(region, ref, where)
        out = np.empty(shape, dtype=dtype)
        got = os.preadv(region.file.fd, [out.data.cast("B")], region.offset + ref.offset) if needed else 0
        if got != needed:
            raise InvalidInputError(f"{where}: region '{region.name}' (key '{region.key}') holds only "
                                    f"{region.offset + ref.offset + got} bytes now; its file shrank")
        return out

    def _region(self, name: str, where: str) -> Region:
        with self._lock:
            region = self._regions.get(name)
        if region is None:
            raise NotFoundError(f"{where}: no shared memory region '{name}' is registered")
        return region

    @staticmethod
    def _check_within(region: Region, ref: TensorRef, where: str) -> None:
        if ref.offset + ref.byte_size > region.byte_size:
            raise InvalidInputError(f"{where}: {ref.byte_size} bytes at offset {ref.offset} run past region "
                                    f"'{region.name}', which has {region.byte_size}")

    def _check_enabled(self) -> None:
        if not self.enabled:
            raise InvalidInputError("system shared memory is off on this server (start it with --allow-client-shm)")


def _count(value: object, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidInputError(f"{where} must be an integer >= 0, got {value!r}")
    return value


def _path_of(key: object, name: str) -> Path:
    """/dev/shm/<name> for key "/<name>", as shm_open resolves it; nothing outside /dev/shm, nothing of ours."""
    if not isinstance(key, str):
        raise InvalidInputError(f"region '{name}': key must be a string, got {key!r}")
    base = key[1:] if key.startswith("/") else key
    if not base or "/" in base or "\0" in base or base in (".", "..") or len(base) > 255:
        raise InvalidInputError(f"region '{name}': key must be a shared-memory name like '/input0', got {key!r}")
    if base.startswith(OWN_FILE_PREFIX):
        raise InvalidInputError(f"region '{name}': key {key!r} names one of the server's own files")
    return SHM_DIR / base


def _open(path: Path, key: str, name: str, end: int) -> _File:
    """The region's file, read-write where the server may write it (else read-only: inputs only)."""
    flags = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        try:
            fd, writable = os.open(path, os.O_RDWR | flags), True
        except PermissionError:
            fd, writable = os.open(path, os.O_RDONLY | flags), False
    except FileNotFoundError:
        raise NotFoundError(f"region '{name}': no shared memory object with key '{key}'") from None
    except OSError as error:
        raise InvalidInputError(f"region '{name}': cannot open key '{key}': {error.strerror}") from None
    file = _File(fd, writable)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise InvalidInputError(f"region '{name}': key '{key}' is not a shared memory object")
    if info.st_size < end:
        raise InvalidInputError(f"region '{name}': offset + byte_size is {end} bytes, but the object with key "
                                f"'{key}' has {info.st_size}")
    return file


NO_SHARED_MEMORY = SharedMemoryRegistry(enabled=False, max_request_bytes=0)  # what a decoder sees by default
