"""Host memory: glibc malloc settings that keep a JAX process's peak RSS down.

XLA:CPU allocates and frees many buffers of several MB per step from its worker threads.
With glibc's defaults each thread gets its own arena and freed blocks stay in them, so the
peak RSS creeps up pass after pass (MiniLM encoding the benchmark corpus twice: 841 MB
peak). One arena holds it at 717 MB. (``mmap`` for every block over 64 KiB got it to 692 MB
but cost 15 % of encode speed in page faults, so it is not used.) The ``mtl-jax`` command
calls :func:`lean_malloc` before JAX starts its threads; library users can call it first
thing, or set ``MALLOC_ARENA_MAX=1`` in the environment. A ``MALLOC_ARENA_MAX`` already set
is left as it is, and ``MTL_JAX_MALLOC=default`` turns the setting off (many-core hosts,
where one arena's lock may cost more than it saves; measured only on 2 cores).
"""

from __future__ import annotations

import ctypes
import functools
import os

_M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)


@functools.cache
def lean_malloc() -> bool:
    """One malloc arena for all threads. False where the C library is not glibc, or the
    environment decides (``MALLOC_ARENA_MAX`` set, ``MTL_JAX_MALLOC=default``)."""
    if "MALLOC_ARENA_MAX" in os.environ or os.environ.get("MTL_JAX_MALLOC") == "default":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_ARENA_MAX, 1))
