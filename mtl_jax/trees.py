"""The one parameter-tree type, the one way to compare two trees, the one way to average
them, and the one way to find a state node (the unfreezing gate's, the EMA's) inside an
optimiser state.

Params are nested dicts of arrays (what ``flax`` ``init`` returns, unboxed). Loading
pretrained weights and restoring a checkpoint both have to say which leaves of one tree
the other lacks, adds or holds in another shape; :func:`tree_diff` is that comparison,
on ``flax.traverse_util.flatten_dict`` paths, so every caller reports the same thing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import jax
import numpy as np
from flax.traverse_util import flatten_dict

Params = dict[str, Any]
ParamPath = tuple[str, ...]  # a leaf's key path, as flatten_dict gives it
Node = TypeVar("Node")


def tree_diff(expected: Any, got: Any) -> tuple[list[ParamPath], list[ParamPath], list[ParamPath]]:
    """Leaf paths on which ``got`` does not fit ``expected``.

    Args:
        expected: the tree the caller needs (e.g. freshly initialised params).
        got: the tree it was given (pretrained weights, restored checkpoint params).

    Returns:
        ``(missing, unexpected, resized)``: sorted key paths (tuples) of leaves only in
        ``expected``, only in ``got``, and in both with different ``np.shape``.
    """
    want, have = flatten_dict(expected), flatten_dict(got)
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    resized = sorted(k for k in set(want) & set(have) if np.shape(want[k]) != np.shape(have[k]))
    return missing, unexpected, resized


def first_difference(expected: Any, got: Any) -> str | None:
    """How ``got`` first departs from ``expected`` (``"missing ['heads']['genre']"``,
    ``"unexpected ..."``, ``"shape of ..."``; :func:`tree_diff`'s order), or None if it fits."""
    missing, unexpected, resized = tree_diff(expected, got)
    for kind, paths in (("missing", missing), ("unexpected", unexpected), ("shape of", resized)):
        if paths:
            return f"{kind} {''.join(f'[{key!r}]' for key in paths[0])}"
    return None


def find_node(tree: Any, kind: type[Node]) -> Node | None:
    """The one node of type ``kind`` in ``tree`` (e.g. an optimiser state, however chained
    or wrapped), else None; ValueError if there are several."""
    found = [
        x
        for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, kind))
        if isinstance(x, kind)
    ]
    if len(found) > 1:
        raise ValueError(f"expected at most one {kind.__name__} in the tree, found {len(found)}")
    return found[0] if found else None


def weighted_mean(
    trees: Iterable[Any],
    weights: Iterable[float] | None = None,
    check: Callable[[Any, Any, int], None] | None = None,
) -> Any:
    """``sum_i w_i * tree_i / sum_i w_i`` leaf by leaf (weights 1 when None).

    Summed in float64 in place, one tree at a time, so an iterator of trees (checkpoints
    read one by one) holds the running sum and about one tree; each leaf keeps the first
    tree's dtype. Every later tree must have the first one's structure and shapes:
    ``check(tree, first)`` (``first``: the first tree's ``jax.ShapeDtypeStruct`` leaves)
    may say so in the caller's words (e.g. naming the checkpoint); without it a mismatch is
    a ValueError. ValueError also when there are no trees, when the weights and trees
    differ in number, or when the weights sum to 0.
    """
    weights = None if weights is None else [float(w) for w in weights]
    total = first = None
    count = 0
    for tree in trees:
        if weights is not None and count >= len(weights):
            raise ValueError(f"more trees than the {len(weights)} weights")
        weight = 1.0 if weights is None else weights[count]
        if first is None:
            first = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), _dtype(x)), tree)
            total = jax.tree.map(lambda x, w=weight: _scaled(x, w), tree)
        else:
            if check is None:
                _check_fits(tree, first)
            else:
                check(tree, first, count)
            jax.tree.map(lambda t, x, w=weight: np.add(t, _scaled(x, w), out=t), total, tree)
        del tree  # before the iterator reads the next one
        count += 1
    if first is None:
        raise ValueError("no trees to average")
    if weights is not None and count != len(weights):
        raise ValueError(f"{len(weights)} weights for {count} trees")
    norm = float(sum(weights)) if weights is not None else float(count)
    if norm == 0:
        raise ValueError("the weights sum to 0")
    return jax.tree.map(lambda t, x: (t / norm).astype(x.dtype), total, first)


def _scaled(leaf: Any, weight: float) -> np.ndarray:
    wide = np.array(leaf, np.float64)  # a fresh, writable array, even for a 0-d leaf
    wide *= weight
    return wide


def _check_fits(tree: Any, first: Any) -> None:
    detail = first_difference(first, tree)
    if detail:
        raise ValueError(f"the trees differ in structure or shape: {detail}")


def _dtype(leaf: Any) -> np.dtype:
    return leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
