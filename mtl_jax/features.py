"""The feature cache: a frozen, deterministic backbone is run once per dataset, not per step.

When no backbone parameter can train (``train.freeze`` is ``backbone``, ``all`` or
``top:0``) and BERT's dropout is off (``model.backbone_dropout = false``), the pooled
embedding of a row is the same at every step of every epoch. Computing it once, in
length-sorted inference batches, and training the heads from the cache turns each later
step from a BERT forward pass into a few small matmuls.

The cached step is :func:`mtl_jax.train.build_train_step` itself, with the model swapped
for a heads-only stand-in whose input is the cached embedding. It therefore optimises the
same :class:`~mtl_jax.train.TrainState` (full params tree, backbone included, with the
optimiser of :func:`~mtl_jax.freezing.make_optimizer`), so checkpoints are interchangeable
with the full step; the backbone's gradient is an exact zero, as under the full step's
``stop_gradient``; it returns exactly the same metrics; and the heads draw the same dropout
masks (they run at the same module path with the same per-step key), so a cached run
matches a full run up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from mtl_jax.config import Config
from mtl_jax.data import Dataset
from mtl_jax.errors import UserError
from mtl_jax.freezing import backbone_trainable
from mtl_jax.inference import embed_tokenized
from mtl_jax.metrics import eval_counts
from mtl_jax.model import MultiTaskModel
from mtl_jax.train import Batch, Metrics, TrainState, build_train_step

CACHED_STEP_KEYS = ("embedding", "labels")


def cache_blockers(config: Config) -> list[str]:
    """Why a config's training cannot run from cached embeddings (empty when it can)."""
    reasons = []
    if backbone_trainable(config.train):
        reasons.append(
            f"train.freeze = {config.train.freeze!r} can train backbone layers "
            "(caching needs backbone, all or top:0)"
        )
    if config.model.backbone_dropout:
        reasons.append("model.backbone_dropout = true makes every forward pass different")
    return reasons


def can_cache(config: Config) -> bool:
    """True when the fit loop should train the heads from cached embeddings.

    Needs ``train.cache_features`` and a backbone that is frozen for the whole run and
    deterministic (see :func:`cache_blockers`).
    """
    return bool(config.train.cache_features) and not cache_blockers(config)


def cache_embeddings(
    model: MultiTaskModel, params: Mapping[str, Any], dataset: Dataset, config: Config
) -> np.ndarray:
    """Pooled embeddings of every row of ``dataset``, computed once.

    Length-sorted batches of ``data.eval_batch_size`` padded to the config's buckets keep
    padding low; the forward pass is deterministic (no dropout), exactly what the train
    step computes under a frozen deterministic backbone.

    Args:
      model: the run's model (its pooling layer, pooling and normalisation are used).
      params: the run's params; only ``params["backbone"]`` is read, so pass the params of
        the state being trained (after any restore) to keep the cache in step with them.
      dataset: the rows to embed.
      config: ``model.max_length``, ``data.length_buckets`` and ``data.eval_batch_size``.

    Returns:
      float32 ``[len(dataset), hidden]``; row ``i`` is dataset row ``i``.
    """
    return embed_tokenized(
        model,
        {"backbone": params["backbone"]},
        dataset,
        batch_size=config.data.eval_batch_size,
        buckets=config.data.length_buckets,
        max_length=config.model.max_length,
    )


def cached_batch(
    batch: Mapping[str, Any], cache: np.ndarray, keep: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """``batch`` plus ``"embedding"`` ``[B, hidden]``: the cache rows of ``batch["index"]``.

    Padding rows (``index == -1``, labels ``-1``) get zeros; they carry no loss. With
    ``keep``, only those keys of ``batch`` stay (the token arrays need not reach a device).
    """
    index = np.asarray(batch["index"])
    embedding = np.asarray(cache)[np.maximum(index, 0)]
    embedding[index < 0] = 0.0
    kept = batch if keep is None else {k: batch[k] for k in keep if k in batch}
    return {**kept, "embedding": embedding}


def _run_heads(module: MultiTaskModel, embedding: jax.Array, deterministic: bool):
    # The heads at their own path inside the full model, so dropout draws the same masks.
    return module.heads(embedding, deterministic=deterministic)


class _CachedModel:
    """Stands in for the :class:`MultiTaskModel` inside ``build_train_step``.

    That step passes ``batch["input_ids"]`` as the model's first input; here it is the
    cached embedding, and ``apply`` runs only the heads on it.
    """

    def __init__(self, model: MultiTaskModel):
        self.model = model

    def apply(
        self,
        variables: Mapping[str, Any],
        embedding: jax.Array,
        *unused_inputs: Any,
        deterministic: bool = True,
        backbone_deterministic: bool | None = None,
        train_backbone: bool = True,
        rngs: Mapping[str, jax.Array] | None = None,
    ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        if backbone_deterministic is False or train_backbone:
            raise ValueError("cached embeddings need a frozen, deterministic backbone")
        params = {"heads": variables["params"]["heads"]}
        logits = self.model.apply(
            {"params": params}, embedding, deterministic, method=_run_heads, rngs=rngs
        )
        return logits, {"embedding": embedding}


def build_cached_train_step(
    model: MultiTaskModel, optimizer: Any, config: Config
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
    """The pure, unjitted cached step (see :func:`make_cached_train_step`), for tests.

    Its batch is ``{"embedding": [B, hidden], "labels": {task: [B]}}``.
    """
    blockers = cache_blockers(config)
    if blockers:
        raise UserError("cannot train from cached embeddings: " + "; ".join(blockers))
    step = build_train_step(_CachedModel(model), optimizer, config)

    def cached_train_step(state: TrainState, batch: Batch, key: jax.Array):
        inputs = {"input_ids": batch["embedding"], "attention_mask": None}
        return step(state, {**inputs, "labels": batch["labels"]}, key)

    return cached_train_step


def make_cached_train_step(
    model: MultiTaskModel, optimizer: Any, config: Config
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
    """``train_step(state, batch, key) -> (state, metrics)`` on cached embeddings, jitted.

    A drop-in for :func:`mtl_jax.train.make_train_step` under a frozen deterministic
    backbone: same state (donated), same key handling, same metrics, same numbers. The
    batch needs ``"embedding"`` (see :func:`cached_batch`) and ``"labels"``; other keys
    are dropped before the jitted call. Every batch has the shape ``[B, hidden]`` whatever
    its token length, so the step compiles once.

    Raises:
      UserError: the config can train the backbone or has backbone dropout on.
    """
    jitted = jax.jit(build_cached_train_step(model, optimizer, config), donate_argnums=0)

    def train_step(state: TrainState, batch: Batch, key: jax.Array):
        return jitted(state, {k: batch[k] for k in CACHED_STEP_KEYS}, key)

    return train_step


def make_cached_eval_step(
    model: MultiTaskModel, config: Config
) -> Callable[[Any, Batch], dict[str, jax.Array]]:
    """``eval_step(params, batch) -> {task: counts}`` on cached embeddings.

    The counterpart of :func:`mtl_jax.train.make_eval_step` for a dev set whose
    embeddings were cached (:func:`cache_embeddings`, :func:`cached_batch`); rows with
    label ``-1`` or ``valid == False`` are not counted.
    """

    def eval_step(params, batch):
        logits = model.apply(
            {"params": {"heads": params["heads"]}}, batch["embedding"], True, method=_run_heads
        )
        valid = batch.get("valid")
        return {task: eval_counts(batch["labels"][task], x, valid) for task, x in logits.items()}

    jitted = jax.jit(eval_step)

    def cached_eval_step(params, batch):
        inputs = {k: batch[k] for k in (*CACHED_STEP_KEYS, "valid") if k in batch}
        return jitted({"heads": params["heads"]}, inputs)

    return cached_eval_step
