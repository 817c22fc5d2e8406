"""Background batch assembly: one thread produces items a few ahead of the consumer.

Its one job is overlapping host work (building numpy batches) with the device step; JAX
releases the GIL while it waits, so a thread is enough and no worker processes are needed.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

_END = object()


def prefetch(iterator: Iterable[Any], size: int = 2) -> Iterator[Any]:
    """Yield the items of ``iterator`` in order, produced up to ``size`` ahead by a thread.

    Batch assembly then overlaps the device step (JAX releases the GIL while it waits).
    An exception in the producer is re-raised here; leaving the loop early stops the
    thread.
    """
    items: queue.Queue = queue.Queue(maxsize=max(1, size))
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in iterator:
                if not put((True, item)):
                    return
            put((True, _END))
        except BaseException as exc:  # handed to the consumer, re-raised there
            put((False, exc))

    thread = threading.Thread(target=produce, name="mtl_jax-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = items.get()
            if not ok:
                raise item
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=1.0)
