"""The train state and one family of pure steps (train, eval, predict), given a forward.

``train_step(state, batch, key) -> (state, metrics)`` is one compiled program for the whole
run: freezing and gradual unfreezing live in the optimiser (see :mod:`mtl_jax.freezing`),
the dropout key is ``fold_in(key, state.step)``, and nothing in a step talks to the host, so
the fit loop decides when to read metrics back.

A step never calls the model directly: it calls a *forward* function (:mod:`mtl_jax.forward`),
``forward(params, batch, train, rngs) -> (logits per task, aux)``: the full model on token
inputs, or only the heads on a cached embedding. Both paths share one train step and one
eval step.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from mtl_jax.config import Config
from mtl_jax.forward import (
    MODEL_INPUTS,
    STEP_KEYS,
    Batch,
    Forward,
    model_forward,
)
from mtl_jax.freezing import backbone_trainable, find_gate_state
from mtl_jax.losses import multitask_loss, symmetric_kl
from mtl_jax.metrics import eval_counts

Metrics = dict[str, Any]  # {"loss", "grad_norm", ..., "tasks": {task: {"loss", ...}}}


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


def step_inputs(batch: Batch, keys: tuple[str, ...] = STEP_KEYS) -> dict[str, Any]:
    """Only the keys a step reads, so extra keys (``index``, texts) neither break the jit
    nor cause a retrace when they come and go."""
    return {k: batch[k] for k in keys if k in batch}


def build_train_step(
    forward: Forward, optimizer: optax.GradientTransformation, config: Config
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
    """The pure, unjitted train step over ``forward`` (see :func:`make_train_step`)."""
    weights = {t.name: float(t.loss_weight) for t in config.tasks}
    class_weights = {
        t.name: jnp.asarray(t.class_weights, jnp.float32) for t in config.tasks if t.class_weights
    }
    label_smoothing = {t.name: t.label_smoothing for t in config.tasks if t.label_smoothing}
    skip_nonfinite = config.train.skip_nonfinite
    rdrop_alpha = config.train.rdrop_alpha
    adversarial_epsilon = config.train.adversarial_epsilon

    def loss_fn(params, batch, key):
        if rdrop_alpha:  # each row twice, side by side (one device's shard holds both), in
            batch = rdrop_pairs(batch)  # one forward: each copy draws its own dropout
        logits, _ = forward(params, batch, True, {"dropout": key})
        total, per_task = multitask_loss(
            logits,
            batch["labels"],
            weights,
            params.get("log_vars"),
            class_weights,
            label_smoothing,
        )
        if rdrop_alpha:  # R-Drop's objective over 2 (its alpha as published)
            for task, both in logits.items():
                kl = symmetric_kl(both[0::2], both[1::2], batch["labels"][task][0::2])
                total = total + 0.5 * rdrop_alpha * weights[task] * kl
            logits = {task: both[0::2] for task, both in logits.items()}
        return total, (logits, per_task)

    def train_step(state: TrainState, batch: Batch, key: jax.Array):
        key = jax.random.fold_in(key, state.step)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (logits, per_task)), grads = grad_fn(state.params, batch, key)
        if adversarial_epsilon:  # the mean of the clean and the adversarial gradient
            perturbed = fgm_perturbed(state.params, grads, adversarial_epsilon)
            (adversarial_loss, _), adversarial_grads = grad_fn(perturbed, batch, key)
            grads = jax.tree.map(lambda a, b: 0.5 * (a + b), grads, adversarial_grads)
            loss = jnp.where(jnp.isfinite(adversarial_loss), loss, adversarial_loss)
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
            "tasks": _task_metrics(logits, batch["labels"], per_task, state.params),
        }
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


WORD_EMBEDDINGS = ("backbone", "embeddings", "word_embeddings", "embedding")


def fgm_perturbed(params: Any, grads: Any, epsilon: float) -> Any:
    """``params`` with the word-embedding table moved ``epsilon`` along its loss gradient.

    The fast gradient method on embeddings (Miyato et al. 2017, in the form common for BERT
    fine-tuning): the step is ``epsilon * g / ||g||`` with ``g`` the table's gradient, so
    only the rows of the batch's tokens move, and by ``epsilon`` in all (L2). The table
    is perturbed wherever it lives: a frozen table is perturbed too, it just never updates.
    """
    *outer, leaf = WORD_EMBEDDINGS
    table_grad = functools.reduce(lambda tree, key: tree[key], WORD_EMBEDDINGS, grads)
    table_grad = table_grad.astype(jnp.float32)
    step = epsilon * table_grad / (jnp.linalg.norm(table_grad) + 1e-12)
    moved = dict(params)
    node = moved
    for key in outer:  # copy the path down to the table; every other subtree is shared
        node[key] = dict(node[key])
        node = node[key]
    node[leaf] = (node[leaf] + step).astype(node[leaf].dtype)
    return moved


def rdrop_pairs(batch: Batch) -> dict[str, Any]:
    """Every array of ``batch`` with each row repeated in place: ``[a, a, b, b, ...]``."""
    return jax.tree.map(lambda x: jnp.repeat(x, 2, axis=0), dict(batch))


def _task_metrics(logits, labels, per_task, params) -> dict[str, dict[str, jax.Array]]:
    """Per task: its loss, correct and labelled rows, and the learned log-variance."""
    tasks = {}
    for task, task_logits in logits.items():
        task_labels = labels[task]
        labelled = task_labels >= 0
        tasks[task] = {
            "loss": per_task[task],
            "correct": ((task_logits.argmax(-1) == task_labels) & labelled).sum(),
            "count": labelled.sum(),
        }
        if "log_vars" in params:
            tasks[task]["log_var"] = params["log_vars"][task]
    return tasks


def _trainable_grad_norm(opt_state: Any, grads: Any) -> jax.Array:
    """The norm the clip saw (trainable groups only) when the optimiser has a gate."""
    gate = find_gate_state(opt_state)
    return gate.grad_norm if gate is not None else optax.global_norm(grads)


def make_train_step(
    model: Any,
    optimizer: optax.GradientTransformation,
    config: Config,
    forward: Forward | None = None,
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
    """``train_step(state, batch, key) -> (state, metrics)``, jitted with the state donated.

    The step computes the weighted multi-task loss over ``forward`` (default
    :func:`mtl_jax.forward.model_forward`; the feature cache passes
    :func:`mtl_jax.features.cached_forward`), its gradient, and the optimiser update.
    ``key`` is the run's train key; each step folds in its counter.

    Metrics (device arrays; read them when logging): ``loss`` (weighted total),
    ``grad_norm`` (trainable gradient, before clipping), ``update_norm``, ``finite``
    (loss, gradient and update all finite), ``skipped`` (1 when ``train.skip_nonfinite``
    threw this step away: params and optimiser state unchanged, step counter advanced),
    and ``tasks[task]`` with ``loss``, ``correct``, ``count`` (labelled rows) and, with
    uncertainty weighting, ``log_var``. With ``train.rdrop_alpha`` (R-Drop, Liang et al.
    2021) the step runs each row twice with independent dropout (and token cutoff), at
    about twice a step's time and activation memory; a task's ``loss`` is its mean over
    both passes, the total adds ``alpha / 2`` times their symmetric KL weighted by the
    task's ``loss_weight`` (the published objective, halved; not by learned uncertainty
    weights, which scale the cross-entropy only), and ``correct`` reads the first pass.
    Without ``skip_nonfinite`` a non-finite step is applied and only flagged: the fit loop
    raises on ``finite == False``.

    Batch keys other than the forward's inputs, ``labels`` and ``valid`` are dropped
    before the jitted call. With ``model.remat`` and a backbone that trains, the step is a
    :class:`LengthSplitStep`: only long batches pay for the recomputation.
    """
    if forward is None and step_remats(config):
        plain = plain_config(config)
        return LengthSplitStep(
            min_length=config.model.remat_min_length,
            short=_jit_over(model_forward(model.clone(remat=False), plain), optimizer, plain),
            long=_jit_over(model_forward(model, config), optimizer, config),
        )
    return _jit_over(forward or model_forward(model, config), optimizer, config)


def _jit_over(forward: Forward, optimizer: optax.GradientTransformation, config: Config):
    """The jitted train step over one forward, with the config's XLA options."""
    step = build_train_step(forward, optimizer, config)
    return jit_train_step(step, forward.step_keys, step_compiler_options(config))


def step_remats(config: Config, length: int | None = None) -> bool:
    """Whether the train step rematerialises the backbone (for batches ``length`` long).

    Only batches padded to ``model.remat_min_length`` tokens or more are: the peak is set by
    the longest batches, and below 64 tokens a plain step's activations are already smaller
    than a rematerialised step's at 128, while recomputing costs up to 40 % of a short step.
    """
    at_length = length is None or length >= config.model.remat_min_length
    return config.model.remat and backbone_trainable(config.train) and at_length


def plain_config(config: Config) -> Config:
    """``config`` with ``model.remat`` off: the step short batches take."""
    return dataclasses.replace(config, model=dataclasses.replace(config.model, remat=False))


@dataclasses.dataclass(frozen=True)
class LengthSplitStep:
    """A train step that sends batches padded to ``min_length`` tokens or more to ``long``
    (rematerialised, memory-optimised schedule) and shorter ones to ``short`` (plain).

    Same calling convention, state and numbers as either step alone; each bucket length
    compiles once, in the one it takes.
    """

    min_length: int
    short: JittedStep
    long: JittedStep

    def pick(self, batch: Batch) -> JittedStep:
        return self.long if batch["input_ids"].shape[1] >= self.min_length else self.short

    def __call__(self, state: TrainState, batch: Batch, key: jax.Array):
        return self.pick(batch)(state, batch, key)

    def trace(self, state: TrainState, batch: Batch, key: jax.Array):
        return self.pick(batch).trace(state, batch, key)


def train_compiler_options(remat: bool) -> dict[str, Any] | None:
    """XLA options for the train step: with ``model.remat`` on CPU, the memory-optimised
    schedule, without which XLA:CPU recomputes checkpointed layers too early to save memory
    (see :mod:`mtl_jax.remat`)."""
    if remat and jax.default_backend() == "cpu":
        return {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
    return None


LEAN_COMPILE_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


def step_compiler_options(config: Config) -> dict[str, Any] | None:
    """The train step's XLA options for a config.

    The memory schedule only pays where a backbone backward pass is rematerialised. Where
    none is ever computed (a frozen backbone) on CPU, the step compiles with XLA's older
    fusion emitters (:data:`LEAN_COMPILE_OPTIONS`): MiniLM's frozen step then compiles
    with 41-57 MB of transient memory instead of 122-210, keeps 24-46 MB instead of 29-79
    per batch length, compiles faster (2.5-3.3 s vs 3.1-4.7 s) and steps as fast (128
    tokens: 279-294 vs 264-280 ms; shorter equal). A full fine-tuning step compiled that
    way took 2.4x as long to compile (87 vs 36 s), so it keeps the default.
    """
    options = dict(train_compiler_options(step_remats(config)) or {})
    if jax.default_backend() == "cpu" and not backbone_trainable(config.train):
        options.update(LEAN_COMPILE_OPTIONS)
    return options or None


def jit_train_step(
    train_step: Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]],
    keys: tuple[str, ...] = STEP_KEYS,
    compiler_options: dict[str, Any] | None = None,
) -> JittedStep:
    """Jit a pure train step with the state donated, behind a filter of the batch's keys.

    Split from :func:`make_train_step` so a test can wrap the pure step (e.g. in
    ``chex.assert_max_traces``) and still run the exact public calling convention.
    ``compiler_options`` go to XLA (e.g. :func:`train_compiler_options`).
    """
    jitted = jax.jit(train_step, donate_argnums=0, compiler_options=compiler_options)
    return JittedStep(jitted, keys)


@dataclasses.dataclass(frozen=True)
class JittedStep:
    """A jitted train step behind a filter of the batch's keys; ``trace`` gives its program
    (``.jaxpr``, ``.lower().compile()``) for a batch without running it."""

    jitted: Any  # jax.jit(pure step, donate_argnums=0, compiler_options=...)
    keys: tuple[str, ...] = STEP_KEYS

    def __call__(self, state: TrainState, batch: Batch, key: jax.Array):
        return self.jitted(state, step_inputs(batch, self.keys), key)

    def trace(self, state: TrainState, batch: Batch, key: jax.Array):
        return self.jitted.trace(state, step_inputs(batch, self.keys), key)


def build_eval_step(forward: Forward) -> Callable[[Any, Batch], dict[str, jax.Array]]:
    """The pure, unjitted eval step over ``forward`` (see :func:`make_eval_step`)."""

    def eval_step(params, batch):
        logits, _ = forward(params, batch, False, None)
        valid = batch.get("valid")
        return {
            task: eval_counts(batch["labels"][task], task_logits, valid)
            for task, task_logits in logits.items()
        }

    return eval_step


def make_eval_step(
    model: Any, config: Config, forward: Forward | None = None
) -> Callable[[Any, Batch], dict[str, jax.Array]]:
    """``eval_step(params, batch) -> {task: counts}``, deterministic, jitted.

    ``counts`` is :func:`mtl_jax.metrics.eval_counts`: ``{"confusion": [K, K] int32,
    "loss_sum": float32}``. Sum them over batches (``jax.tree.map(jnp.add, ...)``) and score
    the totals with :func:`mtl_jax.metrics.summarize`.
    Rows labelled ``-1`` for a task, and rows with ``batch["valid"] == False`` (padding of a
    last, short batch) if that key is present, are not counted. ``forward`` as in
    :func:`make_train_step`.
    """
    forward = forward or model_forward(model, config)
    jitted = jax.jit(build_eval_step(forward))

    def eval_step(params, batch):
        return jitted(params, step_inputs(batch, forward.step_keys))

    return eval_step


@functools.partial(jax.jit, static_argnums=0)
def _predict(model: Any, params: Any, batch: Batch):
    logits, aux = model_forward(model)(params, batch, False, None)
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
