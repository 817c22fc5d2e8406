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

Compiling is the other source: XLA's compiler frees well over 100 MB of small blocks after a
MiniLM train step compiles, and glibc keeps them in the heap, where the next large step's
buffers land on top of them. :func:`trim_after_compiles` hands them back to the OS after
every compile (frozen MiniLM training: the peak of a 128-token step 940 -> 823 MB, measured
in a probe).
"""

from __future__ import annotations

import ctypes
import functools
import os

import jax

_M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch


def _libc():
    """glibc, or None where the C library is another (or the environment turned it off)."""
    if os.environ.get("MTL_JAX_MALLOC") == "default":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@functools.cache
def lean_malloc() -> bool:
    """One malloc arena for all threads. False where the C library is not glibc, or the
    environment decides (``MALLOC_ARENA_MAX`` set, ``MTL_JAX_MALLOC=default``)."""
    libc = _libc()
    if libc is None or "MALLOC_ARENA_MAX" in os.environ:
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(libc.mallopt(_M_ARENA_MAX, 1))


@functools.cache
def trim_after_compiles() -> bool:
    """Return the heap's free pages to the OS after every XLA compile (``malloc_trim``).

    A listener on JAX's compile event, so it covers every jitted function of the process;
    it costs a few milliseconds per compile and nothing per step. False where the C library
    is not glibc or ``MTL_JAX_MALLOC=default``.
    """
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim.argtypes = (ctypes.c_size_t,)
    jax.monitoring.register_event_duration_secs_listener(trim_listener(libc))
    return True


def trim_listener(libc):
    """The compile-event listener of :func:`trim_after_compiles`, over a glibc handle."""

    def trim(event: str, duration_secs: float, **_) -> None:
        if event == _BACKEND_COMPILE_EVENT:
            libc.malloc_trim(0)

    return trim
