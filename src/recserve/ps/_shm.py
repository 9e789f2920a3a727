"""Shared-memory files mapped on 2 MiB pages, where the kernel allows it, without root or a special mount.

A lookup into a table of gigabytes reads rows at random: with 4 KiB pages nearly every read also misses the TLB
and walks the page tables, which on this project's machines makes lookups up to 1.7x slower. Private memory gets
transparent huge pages on request (MADV_HUGEPAGE); files in /dev/shm follow
/sys/kernel/mm/transparent_hugepage/shmem_enabled, `never` on many machines. Linux 6.1 added MADV_COLLAPSE,
which rebuilds a mapped range of a tmpfs file from 2 MiB pages whatever that setting says (unless it is `deny`).
The pages stay huge in the file, so every process that maps the file later gets them, provided its mapping
starts at a 2 MiB-aligned address. Python's `mmap` cannot choose its address, so `map_file` reserves a larger
anonymous map and lays the file over an aligned stretch of it with MAP_FIXED (libc's mmap, through ctypes).
The Python map owns the whole stretch: closing it unmaps the file too, and numpy views of it keep it open.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os

import numpy as np

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
_MAP_FIXED = 0x10  # Linux; Python's mmap module does not export it
_MADV_COLLAPSE = 25  # Linux 6.1+

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]


def whole_huge_pages(n: int) -> int:
    """n rounded up to a multiple of HUGE_PAGE (bytes or an address)."""
    return -(-n // HUGE_PAGE) * HUGE_PAGE


def map_file(fd: int, nbytes: int) -> tuple[mmap.mmap, int]:
    """Map nbytes of the file at fd, shared, read-write, from a 2 MiB-aligned address.

    Returns the map and the offset in it where the file starts.
    """
    reserve = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        start = ctypes.addressof(ctypes.c_char.from_buffer(reserve))  # the ctypes object goes at once
        aligned = whole_huge_pages(start)
        placed = _libc.mmap(aligned, nbytes, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | _MAP_FIXED, fd, 0)
        if placed != aligned:
            err = ctypes.get_errno()
            raise OSError(err, f"mapping a shared-memory file of {nbytes} bytes: {os.strerror(err)}")
    except BaseException:
        reserve.close()
        raise
    return reserve, aligned - start


def collapse_to_huge_pages(mapped: mmap.mmap, offset: int, nbytes: int) -> bool:
    """Back the file's whole 2 MiB stretches with huge pages; whether the kernel did (best effort).

    The pages must exist to be collapsed (a range with none is refused), so one byte of each stretch is written
    first; the kernel fills the rest with zeros, which a new file holds anyway. Costs about 2 s a GiB, once.
    """
    span = nbytes // HUGE_PAGE * HUGE_PAGE
    if span == 0:
        return False
    np.frombuffer(mapped, dtype=np.uint8, count=span, offset=offset)[::HUGE_PAGE] = 0
    try:
        mapped.madvise(_MADV_COLLAPSE, offset, span)
    except OSError as err:  # an older kernel, shmem_enabled `deny`, or no free 2 MiB blocks
        log.info("dram: the kernel gave a shared table no huge pages (%s); lookups run faster from a tmpfs "
                 "mounted with huge=always (README: huge pages)", err)
        return False
    return True
