"""The feature-cache suite: heads trained from cached embeddings against the full step."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import jax
import numpy as np

from mtl_jax import data as data_lib
from mtl_jax import features
from mtl_jax.train import create_train_state, make_train_step

from .measure import peak_rss_mb
from .suite import Suite, train_parts
from .workloads import bucket_batches, load_real_train, subset


class FeatureCache(Suite):
    """Frozen deterministic backbone: heads trained from cached embeddings vs the full step.

    Both runs start from the same state and see the same batches for ``cache_epochs``
    epochs of ``cache_rows`` real rows; the cached run's first epoch includes building
    the cache. Reports per-epoch times and how far the two runs' results differ.
    """

    name = "cache"

    def __init__(self, *args):
        super().__init__(*args)
        o = self.opts
        config = o.config(freeze="backbone", backbone_eval=True)
        config, dataset = load_real_train(config, self.backbone.tokenizer)
        self.dataset = subset(dataset, min(o.cache_rows, len(dataset)), o.seed)
        self.config = dataclasses.replace(
            config, train=dataclasses.replace(config.train, epochs=o.cache_epochs)
        )

    def _run(self, cached: bool) -> dict[str, Any]:
        o, config = self.opts, self.config
        model, params, optimizer, state = train_parts(config, self.backbone, o.seed)
        key = jax.random.key(o.seed)
        forward = features.cached_forward(model, config) if cached else None
        train_step = self.profiled(make_train_step(model, optimizer, config, forward))
        # Compile on a throwaway state, so both runs start from the same params.
        warm = bucket_batches(self.dataset, config)[: 1 if cached else None]
        with self.log.count() as c:
            scratch = create_train_state(params, optimizer)
            for batch in warm:
                if cached:
                    hidden = int(self.backbone.hidden_size)
                    batch = {**batch, "embedding": np.zeros((o.batch_size, hidden), np.float32)}
                scratch, m = train_step(scratch, batch, key)
            jax.block_until_ready(m)
        epochs, losses, cache_s, cache_compile = [], [], 0.0, {}
        stream = data_lib.BatchStream(self.dataset, config)
        spe = data_lib.steps_per_epoch(self.dataset, config)
        cache = None
        for _ in range(o.cache_epochs):
            t0 = time.perf_counter()
            if cached and cache is None:
                with self.log.count() as cache_compile:
                    cache = features.cache_embeddings(model, state.params, self.dataset, config)
                cache_s = time.perf_counter() - t0
            metrics = []
            for _ in range(spe):
                batch = next(stream)
                if cached:
                    batch = features.cached_batch(batch, cache)
                state, m = train_step(state, batch, key)
                metrics.append(m["loss"])
            losses += [float(x) for x in jax.device_get(metrics)]
            epochs.append(time.perf_counter() - t0)
        return {
            "epoch_s": epochs,
            "cache_s": cache_s,
            "cache_compiles": cache_compile.get("compiles", 0),
            "cache_compile_s": cache_compile.get("compile_s", 0.0),
            "compiles": c["compiles"],
            "compile_s": c["compile_s"],
            "losses": losses,
            "heads": jax.tree.map(np.asarray, state.params["heads"]),
            "steps_per_epoch": spe,
        }

    def measure(self) -> list[dict[str, Any]]:
        full, cached = self._run(cached=False), self._run(cached=True)
        rows = len(self.dataset)
        diff = max(
            float(np.abs(a - b).max())
            for a, b in zip(
                jax.tree.leaves(full["heads"]), jax.tree.leaves(cached["heads"]), strict=True
            )
        )
        later = cached["epoch_s"][1:]
        later_s = statistics.median(later) if later else float("nan")
        full_s = statistics.median(full["epoch_s"])
        return [
            {
                "suite": self.name,
                "freeze": "backbone",
                "rows": rows,
                "epochs": self.opts.cache_epochs,
                "steps_per_epoch": full["steps_per_epoch"],
                "examples_per_s": rows / later_s,
                "examples_per_s_first_epoch": rows / cached["epoch_s"][0],
                "examples_per_s_uncached": rows / full_s,
                "epoch_s_cached": cached["epoch_s"],
                "epoch_s_uncached": full["epoch_s"],
                "cache_build_s": cached["cache_s"],
                "cache_compiles": cached["cache_compiles"],
                "cache_compile_s": cached["cache_compile_s"],
                # Compiles are done before the timed epochs, except the cache's own (inside
                # epoch 1): leave them out so both first epochs are compile-free.
                "speedup_first_epoch": full_s / (cached["epoch_s"][0] - cached["cache_compile_s"]),
                "speedup_later_epochs": full_s / later_s,
                "step_s": {
                    "cached_median": later_s / full["steps_per_epoch"],
                    "uncached_median": full_s / full["steps_per_epoch"],
                },
                "compiles": {"cached": cached["compiles"], "uncached": full["compiles"]},
                "compile_s": {"cached": cached["compile_s"], "uncached": full["compile_s"]},
                "max_abs_diff_heads": diff,
                "max_abs_diff_loss": float(
                    np.max(np.abs(np.subtract(full["losses"], cached["losses"])))
                ),
                "real_tokens_per_s": None,
                "mfu": None,
                "peak_rss_mb": peak_rss_mb(),
                **self._common(self.config),
            }
        ]
