"""mtl_jax.trees.weighted_mean: the one mean of param trees (run soups, checkpoint averaging)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from mtl_jax.trees import first_difference, weighted_mean


def tree(w, b, dtype=np.float32):
    return {"w": np.array(w, dtype), "n": {"b": np.array(b, np.float16)}}


def test_weighted_mean_is_exact_and_keeps_each_leafs_dtype():
    mean = weighted_mean([tree([1.0, 2.0], 4.0), tree([5.0, 6.0], 0.0)], [1.0, 3.0])
    np.testing.assert_array_equal(mean["w"], [4.0, 5.0])
    assert mean["n"]["b"] == 1.0
    assert mean["w"].dtype == np.float32 and mean["n"]["b"].dtype == np.float16
    # Without weights: the plain mean; jax arrays in, numpy out.
    plain = weighted_mean([{"x": jnp.ones(3)}, {"x": jnp.zeros(3)}, {"x": jnp.full(3, 2.0)}])
    np.testing.assert_array_equal(plain["x"], [1.0, 1.0, 1.0])


def test_the_sum_is_float64_then_cast():
    # 2**24 + 1 is not a float32: summed in float32 the two ones would vanish (mean
    # 5592405.5); in float64 the mean is exactly (2**24 + 2) / 3 = 5592406.
    trees = [{"x": np.array([v], np.float32)} for v in (2.0**24, 1.0, 1.0)]
    assert np.float32(np.float32(2.0**24) + np.float32(1.0)) == np.float32(2.0**24)
    assert weighted_mean(trees)["x"][0] == 5592406.0


def test_reads_an_iterator_one_tree_at_a_time_and_checks_each_later_tree():
    checked = []

    def each():
        for i in range(3):
            # Tree i is asked for only after tree i - 1 was checked and added.
            assert checked == [float(k) for k in range(1, i)]
            yield tree([float(i)], float(i))

    def check(later, first, index):
        assert later["w"][0] == float(index)  # the later tree's position in the sequence
        checked.append(later["w"][0])
        assert first["w"].shape == (1,) and first["w"].dtype == np.float32
        assert not isinstance(first["w"], np.ndarray)  # shapes only: no second copy held

    mean = weighted_mean(each(), check=check)
    assert mean["w"][0] == 1.0 and checked == [1.0, 2.0]


def test_trees_that_do_not_fit_the_first_are_refused_not_broadcast():
    with pytest.raises(ValueError, match="differ in structure or shape.*'w'"):
        weighted_mean([tree([1.0], 0.0), tree([1.0, 2.0, 3.0], 0.0)])
    with pytest.raises(ValueError, match="differ in structure or shape"):
        weighted_mean([tree([1.0], 0.0), {"w": np.ones(1, np.float32)}])


def test_bad_weights_and_no_trees_raise():
    trees = [tree([1.0], 0.0), tree([2.0], 0.0)]
    with pytest.raises(ValueError, match="1 weights for 2 trees|more trees than the 1 weights"):
        weighted_mean(trees, [1.0])
    with pytest.raises(ValueError, match="3 weights for 2 trees"):
        weighted_mean(trees, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="sum to 0"):
        weighted_mean(trees, [1.0, -1.0])
    with pytest.raises(ValueError, match="no trees"):
        weighted_mean([])


def test_first_difference_names_the_first_leaf_that_does_not_fit():
    expected = {"heads": {"genre": np.zeros(3), "sentiment": np.zeros(2)}}
    assert first_difference(expected, expected) is None
    assert first_difference(expected, {"heads": {"genre": np.zeros(3)}}) == (
        "missing ['heads']['sentiment']"
    )
    extra = {"heads": {**expected["heads"], "topic": np.zeros(1)}}
    assert first_difference(expected, extra) == "unexpected ['heads']['topic']"
    resized = {"heads": {"genre": np.zeros(4), "sentiment": np.zeros(2)}}
    assert first_difference(expected, resized) == "shape of ['heads']['genre']"
