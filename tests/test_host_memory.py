"""glibc malloc settings of the mtl-jax command (lower peak RSS)."""

from __future__ import annotations

import platform

import pytest

from mtl_jax.host_memory import lean_malloc


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


def test_the_command_sets_it_before_any_work(monkeypatch):
    from mtl_jax import cli, host_memory

    calls = []
    monkeypatch.setattr(host_memory, "lean_malloc", lambda: calls.append(1))
    assert cli.main(["train", "--preset", "demo", "--print-config"]) == 0
    assert calls == [1]
