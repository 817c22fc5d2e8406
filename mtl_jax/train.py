"""The train state and the pure, jitted steps: train, eval and predict.

``train_step(state, batch, key) -> (state, metrics)`` is one compiled program for the whole
run: freezing and gradual unfreezing live in the optimiser (see :mod:`mtl_jax.freezing`),
the dropout key is ``fold_in(key, state.step)``, and nothing in a step talks to the host, so
the fit loop decides when to read metrics back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from mtl_jax.config import Config
from mtl_jax.freezing import backbone_trainable, find_gate_state
from mtl_jax.losses import multitask_loss
from mtl_jax.metrics import eval_counts

Batch = Mapping[str, Any]
Metrics = dict[str, jax.Array]

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
STEP_KEYS = (*MODEL_INPUTS, "labels", "valid")


class TrainState(flax.struct.PyTreeNode):
    """Everything a step changes: its counter, the params and the optimiser state."""

    step: jax.Array  # int32 scalar: batches consumed (skipped non-finite ones included)
    params: Any
    opt_state: Any


def create_train_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
    """A step-0 state on device; the params are copied, so donating it spares the caller's."""
    params = jax.tree.map(lambda x: jnp.array(x, copy=True), params)
    return TrainState(
        step=jnp.zeros([], jnp.int32), params=params, opt_state=optimizer.init(params)
    )


def init_train_params(params: Any, config: Config) -> Any:
    """The params training optimises: the model's, plus ``log_vars`` when they are learned.

    ``params["log_vars"][task]`` is the ``s_t = log sigma_t^2`` of uncertainty weighting, a
    float32 scalar starting at 0 (weight 1); values already present (a restored run) are
    kept. Without uncertainty weighting any ``log_vars`` are dropped, so the optimiser does
    not carry parameters nothing reads. Call this before building the optimiser, whose
    labels follow the params' structure.
    """
    params = dict(params)
    old = params.pop("log_vars", None) or {}
    if config.train.uncertainty_weighting:
        params["log_vars"] = {
            t.name: jnp.asarray(old.get(t.name, 0.0), jnp.float32) for t in config.tasks
        }
    return params


def model_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The part of the params the Flax model knows (no ``log_vars``)."""
    return {"backbone": params["backbone"], "heads": params["heads"]}


def step_inputs(batch: Batch) -> dict[str, Any]:
    """Only the keys a step reads, so extra keys (``index``, texts) neither break the jit
    nor cause a retrace when they come and go."""
    return {k: batch[k] for k in STEP_KEYS if k in batch}


def _token_types(batch: Batch) -> jax.Array:
    if "token_type_ids" in batch:
        return batch["token_type_ids"]
    return jnp.zeros_like(batch["input_ids"])


def _apply(model: Any, params: Any, batch: Batch, **kwargs: Any):
    """The model on a batch's token inputs, with the model's part of the params."""
    return model.apply(
        {"params": model_params(params)},
        batch["input_ids"],
        batch["attention_mask"],
        _token_types(batch),
        **kwargs,
    )


def build_train_step(
    model: Any, optimizer: optax.GradientTransformation, config: Config
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
    """The pure, unjitted train step (see :func:`make_train_step`), for wrapping in tests."""
    weights = {t.name: float(t.loss_weight) for t in config.tasks}
    class_weights = {
        t.name: jnp.asarray(t.class_weights, jnp.float32) for t in config.tasks if t.class_weights
    }
    train_backbone = backbone_trainable(config.train)
    backbone_deterministic = not config.model.backbone_dropout
    skip_nonfinite = config.train.skip_nonfinite

    def loss_fn(params, batch, key):
        logits, _ = _apply(
            model,
            params,
            batch,
            deterministic=False,
            backbone_deterministic=backbone_deterministic,
            train_backbone=train_backbone,
            rngs={"dropout": key},
        )
        total, per_task = multitask_loss(
            logits, batch["labels"], weights, params.get("log_vars"), class_weights
        )
        return total, (logits, per_task)

    def train_step(state: TrainState, batch: Batch, key: jax.Array):
        key = jax.random.fold_in(key, state.step)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (logits, per_task)), grads = grad_fn(state.params, batch, key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        grad_norm = _trainable_grad_norm(opt_state, grads)
        update_norm = optax.global_norm(updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
        if skip_nonfinite:  # like optax.apply_if_finite, but never gives up
            params, opt_state = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old),
                (params, opt_state),
                (state.params, state.opt_state),
            )
            skipped = (~finite).astype(jnp.int32)
        else:
            skipped = jnp.zeros([], jnp.int32)

        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "update_norm": update_norm,
            "finite": finite,
            "skipped": skipped,
        }
        for task, task_logits in logits.items():
            labels = batch["labels"][task]
            labelled = labels >= 0
            metrics[f"{task}/loss"] = per_task[task]
            metrics[f"{task}/correct"] = ((task_logits.argmax(-1) == labels) & labelled).sum()
            metrics[f"{task}/count"] = labelled.sum()
            if "log_vars" in state.params:
                metrics[f"{task}/log_var"] = state.params["log_vars"][task]
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def _trainable_grad_norm(opt_state: Any, grads: Any) -> jax.Array:
    """The norm the clip saw (trainable groups only) when the optimiser has a gate."""
    gate = find_gate_state(opt_state)
    return gate.grad_norm if gate is not None else optax.global_norm(grads)


def make_train_step(
    model: Any, optimizer: optax.GradientTransformation, config: Config
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
    """``train_step(state, batch, key) -> (state, metrics)``, jitted with the state donated.

    The step computes the weighted multi-task loss (heads' dropout on; BERT's dropout only
    with ``model.backbone_dropout``), its gradient, and the optimiser update. When no backbone
    group can ever train, the model stops gradients at the pooled embedding so XLA drops the
    backbone's backward pass. ``key`` is the run's train key; each step folds in its counter.

    Metrics (device arrays; read them when logging): ``loss`` (weighted total),
    ``grad_norm`` (trainable gradient, before clipping), ``update_norm``, ``finite``
    (loss, gradient and update all finite), ``skipped`` (1 when ``train.skip_nonfinite``
    threw this step away: params and optimiser state unchanged, step counter advanced),
    and per task ``<task>/loss``, ``<task>/correct``, ``<task>/count`` (labelled rows) and,
    with uncertainty weighting, ``<task>/log_var``. Without ``skip_nonfinite`` a non-finite
    step is applied and only flagged: the fit loop raises on ``finite == False``.

    Batch keys other than the model inputs, ``labels`` and ``valid`` are dropped before the
    jitted call.
    """
    return jit_train_step(build_train_step(model, optimizer, config))


def jit_train_step(
    train_step: Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]],
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
    """Jit a pure train step with the state donated, behind a filter of the batch's keys.

    Split from :func:`make_train_step` so a test can wrap the pure step (e.g. in
    ``chex.assert_max_traces``) and still run the exact public calling convention.
    """
    jitted = jax.jit(train_step, donate_argnums=0)

    def step(state: TrainState, batch: Batch, key: jax.Array):
        return jitted(state, step_inputs(batch), key)

    return step


def build_eval_step(model: Any, config: Config) -> Callable[[Any, Batch], dict[str, jax.Array]]:
    """The pure, unjitted eval step (see :func:`make_eval_step`)."""

    def eval_step(params, batch):
        logits, _ = _apply(model, params, batch, deterministic=True)
        valid = batch.get("valid")
        return {
            task: eval_counts(batch["labels"][task], task_logits, valid)
            for task, task_logits in logits.items()
        }

    return eval_step


def make_eval_step(model: Any, config: Config) -> Callable[[Any, Batch], dict[str, jax.Array]]:
    """``eval_step(params, batch) -> {task: counts}``, deterministic, jitted.

    ``counts`` is :func:`mtl_jax.metrics.eval_counts`: ``{"confusion": [K, K] int32,
    "loss_sum": float32}``. Sum them over batches (``jax.tree.map(jnp.add, ...)``) and score
    the totals with :func:`mtl_jax.metrics.summarize`.
    Rows labelled ``-1`` for a task, and rows with ``batch["valid"] == False`` (padding of a
    last, short batch) if that key is present, are not counted.
    """
    jitted = jax.jit(build_eval_step(model, config))

    def eval_step(params, batch):
        return jitted(params, step_inputs(batch))

    return eval_step


@functools.partial(jax.jit, static_argnums=0)
def _predict(model: Any, params: Any, batch: Batch):
    logits, aux = _apply(model, params, batch, deterministic=True)
    probs = {task: jax.nn.softmax(x, axis=-1) for task, x in logits.items()}
    return probs, aux["embedding"]


def make_predict_fn(model: Any) -> Callable[[Any, Batch], tuple[dict[str, jax.Array], jax.Array]]:
    """``predict(params, batch) -> ({task: [B, K] probabilities}, [B, hidden] embedding)``.

    Deterministic and jitted with the (hashable) model static, so every predictor of the
    same model shares its compiled programs; the embedding is the pooled one the heads read.
    """

    def predict_fn(params, batch):
        return _predict(model, params, {k: batch[k] for k in MODEL_INPUTS if k in batch})

    return predict_fn
