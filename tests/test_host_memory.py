"""glibc malloc settings of the mtl-jax command (lower peak RSS)."""

from __future__ import annotations

import platform

import jax
import jax.numpy as jnp
import pytest

from mtl_jax import host_memory
from mtl_jax.host_memory import lean_malloc, trim_after_compiles, trim_listener


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_lean_malloc_applies_on_glibc_once(monkeypatch):
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.delenv("MTL_JAX_MALLOC", raising=False)
    lean_malloc.cache_clear()
    assert lean_malloc() is True
    assert lean_malloc() is True  # cached: a second call changes nothing


@pytest.mark.parametrize("env", [{"MALLOC_ARENA_MAX": "4"}, {"MTL_JAX_MALLOC": "default"}])
def test_the_environment_decides_first(monkeypatch, env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    lean_malloc.cache_clear()
    try:
        assert lean_malloc() is False
    finally:
        lean_malloc.cache_clear()


class _FakeLibc:
    def __init__(self):
        self.trims = []

    def malloc_trim(self, pad):
        self.trims.append(pad)


def test_the_heap_is_trimmed_after_each_compile_and_only_then():
    libc = _FakeLibc()
    listener = trim_listener(libc)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        jax.jit(lambda x: x * 3 + 1)(jnp.ones(5)).block_until_ready()  # a fresh compile
        compiled = len(libc.trims)
        assert compiled >= 1 and set(libc.trims) == {0}
        listener("/jax/core/compile/jaxpr_trace_duration", 0.1)  # other events: nothing
        assert len(libc.trims) == compiled
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim")
def test_trim_after_compiles_registers_once(monkeypatch):
    monkeypatch.delenv("MTL_JAX_MALLOC", raising=False)
    registered = []
    monkeypatch.setattr(jax.monitoring, "register_event_duration_secs_listener", registered.append)
    trim_after_compiles.cache_clear()
    try:
        assert trim_after_compiles() is True and trim_after_compiles() is True
        assert len(registered) == 1
        monkeypatch.setenv("MTL_JAX_MALLOC", "default")
        trim_after_compiles.cache_clear()
        assert trim_after_compiles() is False and len(registered) == 1
    finally:
        trim_after_compiles.cache_clear()


def test_the_command_sets_it_before_any_work(monkeypatch):
    from mtl_jax import cli

    calls = []
    monkeypatch.setattr(host_memory, "lean_malloc", lambda: calls.append("arena"))
    monkeypatch.setattr(host_memory, "trim_after_compiles", lambda: calls.append("trim"))
    assert cli.main(["train", "--preset", "demo", "--print-config"]) == 0
    assert calls == ["arena", "trim"]
