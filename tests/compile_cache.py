"""A persistent XLA compilation cache for the end-to-end tests of one pytest session.

Every ``fit`` builds fresh jitted steps and every subprocess starts cold, yet they compile
the same few programs. Caching the compiled executables on disk turns each later run's
compiles into file reads: on two busy cores a tiny run drops from about a minute to
seconds. A cached executable is exactly what the compiler would have produced, so
bit-identity tests are unaffected.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache

OPTIONS = {
    "jax_compilation_cache_dir": None,  # set per session
    "jax_persistent_cache_min_compile_time_secs": 0.0,
    "jax_persistent_cache_min_entry_size_bytes": 0,
}


@contextmanager
def compile_cache(directory: Path) -> Iterator[dict[str, str]]:
    """Cache compiles under ``directory`` here; yield the environment for subprocesses."""
    options = {**OPTIONS, "jax_compilation_cache_dir": str(directory)}
    previous = {name: getattr(jax.config, name) for name in options}
    for name, value in options.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()  # picks up the directory even after earlier compiles
    env = {**os.environ, **{name.upper(): str(value) for name, value in options.items()}}
    try:
        yield env
    finally:
        for name, value in previous.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


def session_cache_dir(tmp_path_factory) -> Path:
    """One cache directory for all test modules of this session (and its xdist workers)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the workers' basetemps share this parent
    directory = base / "jax_compile_cache"
    directory.mkdir(exist_ok=True)
    return directory
