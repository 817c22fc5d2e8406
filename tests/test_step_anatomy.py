"""scripts/step_anatomy.py reads XLA's optimised HLO correctly."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from step_anatomy import anatomy  # noqa: E402


def test_counts_dots_scatters_and_aliased_donations():
    def step(state, ids):
        w = state["w"]
        grad = jnp.zeros_like(w).at[ids].add(1.0)  # an embedding-style scatter
        return {"w": w @ w.T + grad, "b": state["b"] + 1}

    state = {"w": jnp.ones((8, 8)), "b": jnp.zeros(3)}
    hlo = jax.jit(step, donate_argnums=0).lower(state, jnp.arange(4)).compile().as_text()
    report = anatomy(hlo)
    assert report["dots_by_dtype"] == {"f32": 1}
    assert report["scatters"] == 1
    assert report["aliased_outputs"] == 2  # both donated buffers reused for the outputs
    assert report["instructions"] >= report["fusions"] >= 1
