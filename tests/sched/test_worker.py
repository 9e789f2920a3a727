"""The worker's pipe helpers (the worker process itself runs in test_executor.py)."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from multiprocessing.connection import Connection

from recserve.sched.worker import poll_before_sleep, receive, send
from recserve.serve.app import raise_open_file_limit


def test_polling_returns_when_a_message_arrives_and_leaves_it_to_be_read() -> None:
    reader, writer = multiprocessing.Pipe(duplex=False)
    sender = threading.Timer(0.05, send, args=(writer, {"task": 7}))
    sender.start()
    started = time.monotonic()
    poll_before_sleep(reader, spin_s=5.0)
    waited = time.monotonic() - started
    assert 0.04 <= waited < 2.0  # back as the message came, long before the spin ran out
    assert receive(reader) == {"task": 7}
    sender.join()


def test_polling_gives_up_after_its_spin_without_reading() -> None:
    reader, writer = multiprocessing.Pipe(duplex=False)
    started = time.monotonic()
    poll_before_sleep(reader, spin_s=0.05)
    assert time.monotonic() - started >= 0.05
    assert not reader.poll()
    send(writer, "late")
    assert receive(reader, spin_s=1.0) == "late"


def test_polling_takes_descriptors_past_the_select_limit() -> None:
    """A server holding a thousand connections starts a replacement worker's pipe on a descriptor past 1,023,
    which `select` refuses (`recserve serve` raises its descriptor limit, as here)."""
    raise_open_file_limit()
    reader, writer = multiprocessing.Pipe(duplex=False)
    high = Connection(os.dup2(reader.fileno(), 1500))
    try:
        poll_before_sleep(high, spin_s=0.01)
        send(writer, "past the limit")
        assert receive(high, spin_s=1.0) == "past the limit"
    finally:
        high.close()
