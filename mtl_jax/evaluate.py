"""Evaluation and batched inference over datasets, shared by the fit loop and the CLI.

Both run a jitted function over length-sorted (inference) or stream-ordered (evaluation)
batches padded to a few bucket lengths, which bounds the number of XLA compilations; the
inference outputs come back in input order (row ``i`` is input ``i``). The module sits below
the loop and :mod:`mtl_jax.inference`, so neither imports the other.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.config import Config
from mtl_jax.data import (
    Dataset,
    eval_batches,
    inference_batches,
    inference_buckets,
    restore_order,
)
from mtl_jax.encoder import Tokenized
from mtl_jax.errors import UserError
from mtl_jax.forward import MODEL_INPUTS, batch_token_budget
from mtl_jax.metrics import summarize
from mtl_jax.model import MultiTaskModel
from mtl_jax.train import make_predict_fn

Scores = dict[str, dict[str, Any]]  # {task: {"accuracy", "macro_f1", "loss", "n", ...}}


def evaluate_dataset(
    eval_step: Callable,
    params: Any,
    dataset: Dataset,
    config: Config,
    transform: Callable[[dict], dict] | None = None,
) -> Scores:
    """Accuracy, macro-F1, mean loss, count and confusion per task over a labelled dataset.

    ``transform`` turns each batch into what ``eval_step`` reads (the fit loop swaps in
    cached embeddings and splits the batch over its devices); tasks without a labelled row
    are left out.
    """
    totals: dict[str, Any] = {}
    for batch in eval_batches(dataset, config):
        if transform is not None:
            batch = transform(batch)
        for task, counts in eval_step(params, batch).items():
            totals[task] = (
                counts if task not in totals else jax.tree.map(jnp.add, totals[task], counts)
            )
    scores = summarize(totals)
    return {t: s for t, s in scores.items() if s["n"] > 0}


def weighted_loss(scores: Scores, config: Config) -> float | None:
    """The dev counterpart of the train loss: ``sum_t w_t * CE_t`` over the scored tasks.

    Fixed weights only (learned uncertainty weights are a training device, not a measure);
    None when no task was scored.
    """
    weights = {t.name: t.loss_weight for t in config.tasks}
    terms = [weights[t] * s["loss"] for t, s in scores.items() if "loss" in s]
    return float(sum(terms)) if terms else None


def score_of(scores: Scores, metric: str) -> float:
    """The model-selection score: ``task/metric``, or the mean macro-F1 over tasks."""
    if metric:
        task, _, name = metric.partition("/")
        if task not in scores or name not in scores[task]:
            raise UserError(
                f"config key 'train.best_metric': {metric!r} is not an evaluation metric "
                "(use <task>/accuracy or <task>/macro_f1 of a task with dev data)"
            )
        return float(scores[task][name])
    return float(np.mean([s["macro_f1"] for s in scores.values()])) if scores else 0.0


# -- batched inference ------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _embed_batch(model: MultiTaskModel, params: Any, batch: dict) -> jax.Array:
    embedding, _ = model.apply(
        {"params": params},
        batch["input_ids"],
        batch["attention_mask"],
        batch["token_type_ids"],
        method=MultiTaskModel.embed,
    )
    return embedding


def map_batches(fn, tokenized: Tokenized, batch_size: int, buckets, max_length: int):
    """``fn`` over length-sorted, bucketed batches; outputs back in input order.

    ``buckets=None`` pads to :func:`mtl_jax.data.inference_buckets`. On CPU, batches of long
    rows hold fewer of them (:func:`mtl_jax.data.inference_max_tokens`); accelerators,
    where bigger batches pay and memory is the device's, take ``batch_size`` rows always.
    """
    if len(tokenized) == 0:
        raise ValueError("no sentences to run the model on")
    if buckets is None:
        buckets = inference_buckets(max_length)
    max_tokens = batch_token_budget(batch_size)
    chunks, indices = [], []
    for rows, batch in inference_batches(tokenized, batch_size, buckets, max_length, max_tokens):
        chunks.append(jax.device_get(fn({k: batch[k] for k in MODEL_INPUTS})))
        indices.append(rows)
    return restore_order(chunks, indices, len(tokenized))


def embed_tokenized(
    model: MultiTaskModel,
    params: Any,
    tokenized: Tokenized,
    *,
    batch_size: int = 64,
    buckets: Sequence[int] | None = None,
    max_length: int = 128,
) -> np.ndarray:
    """Pooled embeddings ``[N, hidden]`` (float32), row ``i`` for sentence ``i``."""
    # On the device once: host (numpy) params would be copied again for every batch, and
    # every batch in flight would hold its own copy (hundreds of MB for MiniLM).
    embed = functools.partial(_embed_batch, model, jax.device_put(params))
    return map_batches(embed, tokenized, batch_size, buckets, max_length)


def predict_tokenized(
    model: MultiTaskModel,
    params: Any,
    tokenized: Tokenized,
    *,
    batch_size: int = 64,
    buckets: Sequence[int] | None = None,
    max_length: int = 128,
) -> dict[str, np.ndarray]:
    """Class probabilities per task ``{task: [N, num_labels]}``, in input order."""
    predict = make_predict_fn(model)
    params = jax.device_put(params)  # once, as in embed_tokenized

    def probs(batch):
        return predict(params, batch)[0]

    return map_batches(probs, tokenized, batch_size, buckets, max_length)
