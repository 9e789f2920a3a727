"""Freed memory kept: large allocations made and freed again stop faulting in fresh pages."""

from __future__ import annotations

import subprocess
import sys

import pytest

# In a process of its own: threads (each allocates from a heap of its own, as a server's handler threads do)
# make and free buffers of 1-4 MiB and 3 MiB, writing every page; prints the page faults that took.
ALLOCATE_AND_FREE = """
import resource, sys, threading
from recserve.allocator import retain_freed_memory
retained = retain_freed_memory() if sys.argv[1] == "retain" else None

def requests():
    for i in range(40):
        body = b"x" * ((1 << 20) + (i % 4) * (1 << 20))
        decoded = b"y" * (3 << 20)
        del body, decoded

before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    thread = threading.Thread(target=requests)
    thread.start()
    thread.join()
print(retained, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PEAK_PAGES = (7 << 20) // 4096  # the most one thread holds at once


def page_faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", ALLOCATE_AND_FREE, mode], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_buffers_are_reused_without_new_page_faults() -> None:
    retained, faults_retained = page_faults("retain")
    _, faults_default = page_faults("default")
    assert retained == "True"
    assert faults_default > 10 * PEAK_PAGES  # glibc's defaults: most buffers faulted in anew
    assert faults_retained < 4 * PEAK_PAGES  # each thread's first buffers at most (3 threads), then reused
