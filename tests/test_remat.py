"""model.remat: the same step (params, loss, gradients) for less memory."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from mtl_jax import freezing
from mtl_jax import remat as remat_lib
from mtl_jax.config import TrainConfig
from mtl_jax.forward import model_forward
from mtl_jax.model import build_model, init_params
from mtl_jax.train import (
    LengthSplitStep,
    build_train_step,
    create_train_state,
    make_train_step,
    step_inputs,
    step_remats,
    train_compiler_options,
)

from conftest import make_fake_batch, replace_model


def _parts(config, backbone, params, remat: bool, grad_clip: float = 1.0):
    config = dataclasses.replace(
        replace_model(config, remat=remat),
        train=TrainConfig(freeze="none", epochs=1, batch_size=32, grad_clip=grad_clip),
    )
    model = build_model(config, backbone)
    optimizer = freezing.make_optimizer(config.train, params, total_steps=10)
    forward = model_forward(model, config)
    step = build_train_step(forward, optimizer, config)
    return config, step, create_train_state(params, optimizer), forward


def test_remat_step_equals_the_plain_step_dropout_included(tiny_config, tiny_backbone, tiny_params):
    batch = make_fake_batch(tiny_config, batch=8, seq=16)
    results = []
    for remat in (False, True):
        config, step, state, forward = _parts(tiny_config, tiny_backbone, tiny_params, remat)
        assert config.model.backbone_dropout  # the masks are drawn again in the backward pass
        jitted = jax.jit(step, compiler_options=train_compiler_options(remat))
        new_state, metrics = jitted(state, step_inputs(batch, forward.step_keys), jax.random.key(7))
        results.append((new_state.params, metrics))
    (plain, plain_metrics), (remat, remat_metrics) = results
    assert float(remat_metrics["loss"]) == pytest.approx(float(plain_metrics["loss"]), rel=1e-6)
    assert float(remat_metrics["grad_norm"]) == pytest.approx(
        float(plain_metrics["grad_norm"]), rel=1e-5
    )
    assert jax.tree.structure(plain) == jax.tree.structure(remat)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_each_encoder_layer_is_checkpointed_with_the_matmul_policy(
    tiny_config, tiny_backbone, tiny_params
):
    batch = step_inputs(make_fake_batch(tiny_config, batch=4, seq=8))
    for remat in (False, True):
        config, step, state, _ = _parts(tiny_config, tiny_backbone, tiny_params, remat)
        jaxpr = jax.make_jaxpr(step)(state, batch, jax.random.key(0))
        checkpoints = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name in CHECKPOINT]
        n_layers = build_model(config, tiny_backbone).n_layers
        assert len(checkpoints) == (n_layers if remat else 0)
        assert all(e.params["policy"] == remat_lib.POLICY for e in checkpoints)


CHECKPOINT = ("checkpoint", "remat2")  # jax.checkpoint's primitive, by JAX version


def _equations(jaxpr):
    """Every equation of a jaxpr, those of nested jaxprs (jit, checkpoint, ...) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                yield from _equations(inner)


@pytest.mark.minilm
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's scheduler")
def test_remat_halves_minilms_step_memory(minilm_backbone, tiny_config):
    """XLA's account of the compiled full fine-tuning step at 32 x 128 tokens, without a
    gradient clip (as the PyTorch baseline trains; with one XLA:CPU keeps more alive)."""
    config = replace_model(tiny_config, backbone="minilm", max_length=128)
    model = build_model(config, minilm_backbone)
    params = init_params(model, jax.random.key(0), minilm_backbone)
    batch = make_fake_batch(config, batch=32, seq=128, vocab=1000)
    temp = {}
    for remat in (False, True):
        _, step, state, forward = _parts(config, minilm_backbone, params, remat, grad_clip=0.0)
        jitted = jax.jit(step, donate_argnums=0, compiler_options=train_compiler_options(remat))
        compiled = jitted.lower(
            state, step_inputs(batch, forward.step_keys), jax.random.key(0)
        ).compile()
        temp[remat] = compiled.memory_analysis().temp_size_in_bytes
    assert temp[True] < 0.5 * temp[False]  # measured: 581 MB against 1,599 MB


def _checkpoints(step, state, batch) -> int:
    """How many ``jax.checkpoint`` regions the program ``step`` runs on ``batch`` has."""
    jaxpr = step.trace(state, batch, jax.random.key(0)).jaxpr
    return sum(e.primitive.name in CHECKPOINT for e in _equations(jaxpr.jaxpr))


def test_only_batches_from_remat_min_length_are_rematerialised(
    tiny_config, tiny_backbone, tiny_params
):
    """Short batches take the plain step (same numbers, no recomputation); long ones the
    checkpointed step; the split step's results equal a plain step's at both lengths."""
    config, _, state, _ = _parts(tiny_config, tiny_backbone, tiny_params, remat=True)
    config = replace_model(config, remat_min_length=16)
    model = build_model(config, tiny_backbone)
    optimizer = freezing.make_optimizer(config.train, tiny_params, total_steps=10)
    split = make_train_step(model, optimizer, config)
    assert isinstance(split, LengthSplitStep) and split.min_length == 16
    plain_config = replace_model(config, remat=False)
    plain = make_train_step(build_model(plain_config, tiny_backbone), optimizer, plain_config)
    n_layers = model.n_layers
    for seq, remat in ((8, False), (15, False), (16, True), (24, True)):
        batch = make_fake_batch(config, batch=4, seq=seq)
        assert step_remats(config, seq) is remat
        chosen = split.pick(batch)
        assert chosen is (split.long if remat else split.short)
        assert _checkpoints(chosen, state, batch) == (n_layers if remat else 0)
        new, metrics = split(create_train_state(tiny_params, optimizer), batch, jax.random.key(3))
        ref, ref_metrics = plain(
            create_train_state(tiny_params, optimizer), batch, jax.random.key(3)
        )
        assert float(metrics["loss"]) == pytest.approx(float(ref_metrics["loss"]), rel=1e-6)
        for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(new.params), strict=True):
            if remat:  # Adam's normalised update magnifies last-bit gradient differences
                np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=5e-6)
            else:  # the plain program itself
                np.testing.assert_array_equal(np.asarray(b), np.asarray(a))


def test_no_split_without_a_trainable_backbone_or_remat(tiny_config, tiny_backbone, tiny_params):
    config, _, _, _ = _parts(tiny_config, tiny_backbone, tiny_params, remat=True)
    optimizer = freezing.make_optimizer(config.train, tiny_params, total_steps=10)
    model = build_model(config, tiny_backbone)
    assert isinstance(make_train_step(model, optimizer, config), LengthSplitStep)
    frozen = dataclasses.replace(config, train=dataclasses.replace(config.train, freeze="backbone"))
    off = replace_model(config, remat=False)
    for other in (frozen, off):
        assert not step_remats(other, 128)
        assert not isinstance(make_train_step(model, optimizer, other), LengthSplitStep)


def test_compiler_options_only_with_remat():
    assert train_compiler_options(False) is None
    if jax.default_backend() == "cpu":
        assert train_compiler_options(True) == {
            "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"
        }
