"""The one parameter-tree type, the one way to compare two trees, and the one way to find a
state node (the unfreezing gate's, the EMA's) inside an optimiser state.

Params are nested dicts of arrays (what ``flax`` ``init`` returns, unboxed). Loading
pretrained weights and restoring a checkpoint both have to say which leaves of one tree
the other lacks, adds or holds in another shape; :func:`tree_diff` is that comparison,
on ``flax.traverse_util.flatten_dict`` paths, so every caller reports the same thing.
"""

from __future__ import annotations

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
