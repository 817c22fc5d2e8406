"""The data layer of the fit loop, one module per job; this package re-exports its API.

Pipeline: :mod:`~mtl_jax.data.readers` (``read_rows``: file -> rows, every bad input a
:class:`UserError` naming file, line and column) -> :mod:`~mtl_jax.data.context`
(``windows``: a row with its neighbours, for tasks with ``context``) -> :mod:`~mtl_jax.data.labels`
(``labels_from_files`` / ``encode_labels``: names -> ids; class weights) ->
:mod:`~mtl_jax.data.dataset` (a :class:`Dataset`, tokenised once, numpy only) ->
:mod:`~mtl_jax.data.sampling` (``epoch_batches``: row indices per batch, a pure function
of seed and epoch; ``BatchStream``, a resumable iterator) ->
:mod:`~mtl_jax.data.batching` (``make_batch``: fixed-shape padded numpy dicts; inference
order and back) -> :mod:`~mtl_jax.data.prefetch` (a background thread).

Why a pure index-based design rather than ``grain``:

* The data is small and in memory. Sentence corpora of 10^4-10^6 rows are tokenised once
  (the Rust tokenizer takes about a second for 20k sentences) and a batch is built by
  copying a few dozen int32 rows into a padded array, which takes microseconds. grain's
  strengths (multi-process workers for heavy per-record transforms, sharded file sources)
  buy nothing here, and a background thread (:func:`prefetch`) hides the copy.
* The order of an epoch is a pure function of ``(train.seed, epoch)``, so resuming needs
  only a two-integer JSON dict stored beside the Orbax checkpoint, instead of grain's
  opaque iterator state (see :mod:`~mtl_jax.data.sampling`).
* The parts this library needs (length grouping in shuffled windows, buckets capped at
  ``max_length``, three task-mixing rules, dummy rows keeping the batch shape fixed) would
  be custom grain transformations anyway; as plain numpy they are easy to test.

Conventions: rows are numbered by the line they start on in their file (header = line 1).
A missing label is ``-1`` everywhere (a row from another task's file, an empty label cell,
a padding row); losses and metrics must mask it. Padding rows have ``index == -1`` and an
all-zero attention mask.
"""

from mtl_jax.data.batching import (
    bucket_lengths,
    buckets_for,
    eval_batches,
    inference_batches,
    inference_buckets,
    inference_max_tokens,
    make_batch,
    restore_order,
)
from mtl_jax.data.context import windows
from mtl_jax.data.dataset import Dataset, dataset_from_rows, load_task_datasets
from mtl_jax.data.labels import (
    class_weights_from,
    encode_labels,
    infer_labels,
    labels_from_files,
)
from mtl_jax.data.prefetch import prefetch
from mtl_jax.data.readers import FORMATS, Row, read_rows
from mtl_jax.data.sampling import BatchStream, epoch_batches, steps_per_epoch, stream_state

__all__ = [
    "FORMATS",
    "BatchStream",
    "Dataset",
    "Row",
    "bucket_lengths",
    "buckets_for",
    "class_weights_from",
    "dataset_from_rows",
    "encode_labels",
    "epoch_batches",
    "eval_batches",
    "infer_labels",
    "inference_batches",
    "inference_buckets",
    "inference_max_tokens",
    "labels_from_files",
    "load_task_datasets",
    "make_batch",
    "prefetch",
    "read_rows",
    "restore_order",
    "steps_per_epoch",
    "stream_state",
    "windows",
]
