"""The feature cache: a frozen, deterministic backbone is run once per dataset, not per step.

When no backbone parameter can train (``train.freeze`` is ``backbone``, ``all`` or
``top:0``), BERT's dropout is off (``model.backbone_dropout = false``) and no token is
cut off (``train.token_cutoff = 0``), the pooled embedding of a row is the same at every
step of every epoch. Computing it once, in length-sorted inference batches, and training
the heads from the cache turns each later step from a BERT forward pass into a few small
matmuls.

The cached step is :func:`mtl_jax.train.make_train_step` itself, given
:func:`cached_forward` (the heads on the cached embedding) as its forward. It therefore
optimises the same :class:`~mtl_jax.train.TrainState` (full params tree, backbone included, with the
optimiser of :func:`~mtl_jax.freezing.make_optimizer`), so checkpoints are interchangeable
with the full step; the backbone's gradient is an exact zero, as under the full step's
``stop_gradient``; it returns exactly the same metrics; and the heads draw the same dropout
masks (they run at the same module path with the same per-step key), so a cached run
matches a full run up to float rounding.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mtl_jax.config import Config
from mtl_jax.data import Dataset
from mtl_jax.errors import UserError
from mtl_jax.evaluate import embed_tokenized
from mtl_jax.forward import Forward, heads_forward
from mtl_jax.freezing import backbone_trainable
from mtl_jax.model import MultiTaskModel


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
    if config.train.token_cutoff:
        reasons.append("train.token_cutoff > 0 hides different tokens at every step")
    for task in config.tasks:
        if task.own_layers:
            reasons.append(
                f"tasks.{task.name}.own_layers > 0 reads token states, not a pooled embedding"
            )
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


STEP_KEYS = ("labels", "index", "valid")  # what a cached step needs of a stream batch


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


def cached_forward(model: MultiTaskModel, config: Config) -> Forward:
    """The heads on ``batch["embedding"]``: the forward of the cached train and eval steps.

    Pass it to :func:`mtl_jax.train.make_train_step` / :func:`~mtl_jax.train.make_eval_step`
    (``forward=``); their batches need ``"embedding"`` (see :func:`cached_batch`) and
    ``"labels"``. Every batch has the shape ``[B, hidden]`` whatever its token length, so
    each step compiles once.

    Raises:
      UserError: the config can train the backbone or has backbone dropout on.
    """
    blockers = cache_blockers(config)
    if blockers:
        raise UserError("cannot train from cached embeddings: " + "; ".join(blockers))

    def forward(params, batch, train, rngs):
        return heads_forward(model, params, batch["embedding"], train, rngs)

    return Forward(forward, ("embedding",))
