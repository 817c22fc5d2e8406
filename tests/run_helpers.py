"""A tiny run directory written directly (run files, Orbax checkpoints of perturbed tiny
params, dev events), so a test reads a real run directory without training one."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from mtl_jax.checkpoint import Checkpointer, write_run_files
from mtl_jax.config import Config, ModelConfig, default_tasks
from mtl_jax.encoder import load_backbone
from mtl_jax.model import build_model, init_params

LATEST, BEST = 12, 8


def perturbed(params, seed: int):
    """Params with every leaf moved, so a dropped transpose or a swapped tensor shows."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(seed)
    moved = [np.asarray(x) + rng.normal(0, 0.05, np.shape(x)).astype(np.float32) for x in leaves]
    return jax.tree_util.tree_unflatten(treedef, moved)


def make_run(workdir: Path, tasks=None, **model) -> Path:
    """A tiny run directory: latest checkpoint at step 12, best at 8, dev events in metrics.

    ``tasks`` (default: the default tasks) and ``model`` fields change its config."""
    config = Config(
        model=ModelConfig(backbone="tiny", max_length=32, **model),
        tasks=tasks or default_tasks(),
    ).validate()
    backbone = load_backbone("tiny")
    write_run_files(workdir, config, backbone.bert_config, backbone.tokenizer)
    base = init_params(build_model(config, backbone), jax.random.key(0), backbone)
    checkpointer = Checkpointer(workdir, config=config)
    opt_state = {"count": np.zeros((), np.int32)}
    checkpointer.save(LATEST, perturbed(base, LATEST), opt_state, {"step": LATEST})
    checkpointer.save_best(BEST, perturbed(base, BEST), {"step": BEST}, score=0.5)
    checkpointer.close()
    events = [
        {"step": step, "epoch": step / 12, "split": "dev", "loss": 2.0,
         "genre/accuracy": acc, "genre/macro_f1": acc / 2, "genre/loss": 1.5,
         "sentiment/accuracy": acc + 0.1, "sentiment/macro_f1": acc, "sentiment/loss": 0.5}
        for step, acc in ((4, 0.25), (BEST, 0.5), (LATEST, 0.375))
    ]  # fmt: skip
    lines = [json.dumps(e) for e in events]
    (workdir / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return workdir
