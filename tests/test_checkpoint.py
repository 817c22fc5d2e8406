"""Checkpointer details that the end-to-end resume tests do not reach."""

from __future__ import annotations

import numpy as np
import pytest

from mtl_jax.checkpoint import Checkpointer, check_params_fit, restore_params
from mtl_jax.errors import UserError

FITTING = {"backbone": {"w": np.zeros(2)}, "heads": {"genre": {"w": np.zeros(3)}}}


def test_resume_forgets_best_checkpoints_newer_than_the_resumed_step(tmp_path):
    """A kill after best/20 but before checkpoints/20: the rerun evaluates step 20 again."""
    params = {"w": np.arange(3, dtype=np.float32)}
    first = Checkpointer(tmp_path, keep=2)
    first.save(10, params, {"count": np.zeros(())}, {"step": 10})
    first.save_best(20, params, {"step": 20}, score=0.5)
    first.close()

    rerun = Checkpointer(tmp_path, keep=2)
    assert rerun.latest_step() == 10
    rerun.forget_best_after(10)
    rerun.save_best(20, {"w": params["w"] + 1}, {"step": 20}, score=0.7)  # no collision
    rerun.close()
    assert sorted(p.name for p in (tmp_path / "best").iterdir() if p.name.isdigit()) == ["20"]


@pytest.mark.parametrize(
    "params, detail",
    [
        ({"heads": {"genre": {"w": np.zeros(3)}}}, "missing ['backbone']['w']"),
        ({**FITTING, "extra": np.zeros(1)}, "unexpected ['extra']"),
        ({**FITTING, "heads": {"genre": {"w": np.zeros(4)}}}, "shape of ['heads']['genre']['w']"),
    ],
)
def test_check_params_fit_names_the_first_misfit_path(params, detail):
    with pytest.raises(UserError) as info:
        check_params_fit(params, FITTING, "runs/x")
    assert str(info.value) == (
        f"runs/x: checkpoint params do not fit the config saved with it ({detail}); "
        "was the run directory mixed with another run?"
    )
    check_params_fit(FITTING, FITTING, "runs/x")  # a fitting tree passes


def test_average_is_the_mean_of_the_kept_checkpoints(tmp_path):
    """``--which average``: the element-wise mean over checkpoints/ (only the kept ones),
    with the newest checkpoint's meta and the steps it averaged."""
    checkpointer = Checkpointer(tmp_path, keep=3)
    saved = {}
    for step in (10, 20, 30, 40):  # keep=3: step 10 is deleted
        saved[step] = {
            "backbone": {"w": np.full(3, step / 7, np.float32)},
            "heads": {"genre": {"b": np.arange(2, dtype=np.float32) * step}},
        }
        checkpointer.save(step, saved[step], {"count": np.zeros(())}, {"step": step})
    checkpointer.close()

    params, meta = restore_params(tmp_path, "average")
    kept = [saved[s] for s in (20, 30, 40)]
    assert meta == {"step": 40, "averaged_steps": [20, 30, 40]}
    w = np.mean([p["backbone"]["w"].astype(np.float64) for p in kept], axis=0)
    np.testing.assert_allclose(params["backbone"]["w"], w, rtol=1e-7)
    np.testing.assert_allclose(params["heads"]["genre"]["b"], [0.0, 30.0], rtol=1e-7)
    assert params["backbone"]["w"].dtype == np.float32

    latest, meta = restore_params(tmp_path, "latest")
    assert meta == {"step": 40}
    np.testing.assert_array_equal(latest["backbone"]["w"], saved[40]["backbone"]["w"])


def test_average_refuses_checkpoints_of_different_shapes(tmp_path):
    checkpointer = Checkpointer(tmp_path, keep=3)
    for step, n in ((10, 3), (20, 4)):
        params = {"backbone": {"w": np.zeros(n, np.float32)}}
        checkpointer.save(step, params, {"count": np.zeros(())}, {"step": step})
    checkpointer.close()
    with pytest.raises(UserError, match=r"checkpoints/20: .*shape of \['backbone'\]\['w'\]"):
        restore_params(tmp_path, "average")
