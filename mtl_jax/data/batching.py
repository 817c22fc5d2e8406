"""Rows to fixed-shape batches: length buckets, padding, and inference order and back.

Its one job is the batch format (``input_ids``/``attention_mask``/``token_type_ids``
``int32 [B, T]``, ``labels`` per task, ``index``) at a few padded lengths, since every new
input shape is an XLA recompile. Dummy rows keep ``B`` fixed: ``index == -1``, an all-zero
attention mask and labels ``-1``, which losses and metrics must mask.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from mtl_jax.config import Config
from mtl_jax.data.dataset import Dataset
from mtl_jax.encoder import Tokenized


def bucket_lengths(buckets: Sequence[int], max_length: int) -> tuple[int, ...]:
    """The padded lengths in use: ``buckets`` below ``max_length``, plus ``max_length``.

    A batch is padded to the smallest of these that holds its longest row, so XLA compiles
    at most ``len(result)`` sequence shapes (every new shape is a recompile).
    """
    return tuple(sorted({int(b) for b in buckets if 0 < b < max_length} | {int(max_length)}))


def inference_buckets(max_length: int) -> tuple[int, ...]:
    """Fine padded lengths for length-sorted inference: every 8 tokens up to 64, every 16 up
    to 128, every 32 up to 256, every 64 beyond, and ``max_length``.

    Sorted batches hold rows of nearly one length, so fine buckets cut the padding a coarse
    training set (16/32/64/128) leaves to a few tokens per row; each length compiles once
    per process (and is kept by the persistent compilation cache).
    """
    steps = ((64, 8), (128, 16), (256, 32))
    lengths, n = [], 8
    while n < max_length:
        lengths.append(n)
        n += next((step for limit, step in steps if n < limit), 64)
    return bucket_lengths(lengths, max_length)


def buckets_for(config: Config) -> tuple[int, ...]:
    """:func:`bucket_lengths` of a config's ``data.length_buckets`` and ``model.max_length``."""
    return bucket_lengths(config.data.length_buckets, config.model.max_length)


def make_batch(
    data: Dataset | Tokenized,
    indices: np.ndarray,
    batch_size: int,
    buckets: Sequence[int],
    task_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The library batch format for rows ``indices`` of ``data``, padded to a fixed shape.

    Rows beyond ``len(indices)`` are dummies (ids 0, attention mask 0, labels -1, index -1)
    so every batch has exactly ``batch_size`` rows; the length is the smallest bucket that
    holds the longest row.

    Args:
      data: a :class:`Dataset` (labels included) or a :class:`Tokenized` (labels -1).
      indices: at most ``batch_size`` row indices.
      batch_size: rows per batch.
      buckets: allowed padded lengths, ascending (see :func:`bucket_lengths`).
      task_names: the label keys of the batch, matched to the dataset by name (a task the
        data has no labels for is all -1); default the dataset's tasks.

    Returns:
      ``{"input_ids", "attention_mask", "token_type_ids"}`` int32 ``[B, T]``,
      ``"labels"`` ``{task: int32 [B]}`` and ``"index"`` int32 ``[B]``.
    """
    indices = np.asarray(indices, np.int64)
    if len(indices) > batch_size:
        raise ValueError(f"{len(indices)} rows do not fit a batch of {batch_size}")
    rows = [data.input_ids[i] for i in indices]
    longest = max((len(r) for r in rows), default=1)
    length = next((b for b in buckets if b >= longest), None)
    if length is None:
        raise ValueError(f"a row of {longest} tokens exceeds the largest bucket {buckets[-1]}")
    ids = np.zeros((batch_size, length), np.int32)
    types = np.zeros((batch_size, length), np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    for k, i in enumerate(indices):
        n = len(rows[k])
        ids[k, :n] = rows[k]
        types[k, :n] = data.token_type_ids[i]
        mask[k, :n] = 1
    index = np.full(batch_size, -1, np.int32)
    index[: len(indices)] = indices
    own = tuple(getattr(data, "task_names", ()))
    names = own if task_names is None else tuple(task_names)
    labels = {}
    for name in names:
        y = np.full(batch_size, -1, np.int32)
        if name in own:  # a Tokenized, or a task this dataset has no column for: all -1
            y[: len(indices)] = data.labels[indices, own.index(name)]
        labels[name] = y
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": types,
        "labels": labels,
        "index": index,
    }


def inference_batches(
    tokenized: Dataset | Tokenized,
    batch_size: int,
    buckets: Sequence[int],
    max_length: int,
    max_tokens: int | None = None,
) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """Fixed-shape batches in order of decreasing length, with the rows they hold.

    Sorting by length packs rows of similar length together (little padding); the
    longest batch comes first so an out-of-memory shows at once. Pass the outputs and the
    yielded indices to :func:`restore_order` to get them back in input order. A
    :class:`Dataset` keeps its labels in the batch (evaluation).

    ``max_tokens`` caps a batch's padded tokens: a bucket of length ``T`` holds
    :func:`rows_within` rows, so the long buckets, whose activations set the peak memory,
    take fewer rows. Each bucket still has one shape (one compile).

    Yields:
      ``(indices, batch)``: the original row indices (``int64 [k]``, ``k <= rows``) and a
      batch of ``rows`` rows (``batch_size`` without ``max_tokens``) whose first ``k`` are
      those rows.
    """
    allowed = bucket_lengths(buckets, max_length)
    lengths = np.array([len(x) for x in tokenized.input_ids], np.int64)
    order = np.argsort(-lengths, kind="stable")
    start = 0
    while start < len(order):
        length = next((b for b in allowed if b >= lengths[order[start]]), allowed[-1])
        rows = rows_within(batch_size, length, max_tokens)
        indices = order[start : start + rows]
        yield indices, make_batch(tokenized, indices, rows, allowed)
        start += rows


FULL_BATCH_TOKENS = 16  # rows up to this length fill an inference batch; longer take fewer


def inference_max_tokens(batch_size: int) -> int:
    """The padded tokens a CPU inference batch may hold: ``batch_size`` rows of
    :data:`FULL_BATCH_TOKENS`. Batches of longer rows take fewer of them (64 rows of 16
    tokens, 32 of 32, 16 of 64, 8 of 128), so the longest bucket's activations no longer
    set the peak memory, and on CPU the smaller working set is faster too (MiniLM, 2,000
    sentences, idle 2-core CPU, float32 against no budget: 448 vs 389 sentences/s, peak RSS
    651 vs 738 MB; bfloat16: 681 vs 599, 742 vs 848 MB; 2 rounds; budgets of 32 and 8
    tokens per row were slower)."""
    return batch_size * FULL_BATCH_TOKENS


def rows_within(batch_size: int, length: int, max_tokens: int | None) -> int:
    """Rows of a ``length``-token batch: ``batch_size``, halved until ``rows * length <=
    max_tokens`` (at least 1). Halving keeps a power-of-two batch divisible as before."""
    rows = batch_size
    while max_tokens is not None and rows > 1 and rows * length > max_tokens:
        rows //= 2
    return rows


def eval_batches(dataset: Dataset, config: Config) -> Iterator[dict[str, Any]]:
    """Dev-set batches of ``data.eval_batch_size`` (labels in the batch, sorted by length)."""
    for _, batch in inference_batches(
        dataset, config.data.eval_batch_size, config.data.length_buckets, config.model.max_length
    ):
        yield batch


def restore_order(chunks: Sequence[Any], indices: Sequence[np.ndarray], n: int) -> Any:
    """Put per-batch outputs back in input order.

    Args:
      chunks: per batch, an array ``[B, ...]`` (or a dict of them, e.g. logits per task);
        rows beyond ``len(indices[k])`` are padding and dropped.
      indices: per batch, the original row indices from :func:`inference_batches`.
      n: the number of input rows.

    Returns:
      An array ``[n, ...]`` (or a dict of them) with row ``i`` the output for input ``i``.

    Raises:
      ValueError: if the indices do not cover each of the ``n`` rows exactly once.
    """
    flat = np.concatenate([np.asarray(i, np.int64) for i in indices]) if indices else []
    if len(flat) != n or not np.array_equal(np.sort(flat), np.arange(n)):
        raise ValueError(f"indices do not cover rows 0..{n - 1} exactly once")
    if chunks and isinstance(chunks[0], Mapping):
        return {k: restore_order([c[k] for c in chunks], indices, n) for k in chunks[0]}
    parts = [np.asarray(c)[: len(i)] for c, i in zip(chunks, indices, strict=True)]
    if not parts:
        return np.zeros((0,))
    out = np.empty((n, *parts[0].shape[1:]), parts[0].dtype)
    out[flat] = np.concatenate(parts)
    return out
