"""The training order: which rows make each batch of each epoch, and where a run resumes.

Its one job is a pure, seeded order: ``epoch_batches(dataset, config, epoch)`` depends on
``(train.seed, epoch)`` and the dataset alone, so resuming needs only
``{"epoch": e, "batch": b}`` (two integers beside the checkpoint). Every epoch has the
same number of steps, so the state is also ``divmod(global_step, steps_per_epoch)``
(:func:`stream_state`), which stays right when batches are prefetched ahead of the step
that consumes them. Task mixing (proportional, temperature, round robin) and length
grouping in shuffled windows live here too, as plain numpy.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from mtl_jax.config import Config
from mtl_jax.data.batching import buckets_for, make_batch
from mtl_jax.data.dataset import Dataset
from mtl_jax.errors import UserError

# Stream tags keep the random streams of different purposes independent for one seed.
_TAG_EPOCH = 1
_TAG_CYCLE = 2


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed % 2**63, *keys]))


def epoch_batches(dataset: Dataset, config: Config, epoch: int) -> list[np.ndarray]:
    """Row indices of every training batch of ``epoch``, in order.

    A pure function of ``(config.train.seed, epoch)`` and the dataset, which is what makes
    a run resumable mid-epoch from two integers. Task mixing across sources
    (``config.data.mixing``):

    * ``proportional``: all rows shuffled together, each row once; a source fills each
      batch in proportion to its size.
    * ``temperature``: source ``i`` gets ``N * n_i**(1/T) / sum_j n_j**(1/T)`` of the
      ``N`` rows of the epoch (``T=1`` is proportional, large ``T`` tends to uniform).
      Within an epoch a source's rows are repeated evenly (counts differ by at most one)
      and never drawn with replacement; the rows that get the extra turn rotate across
      epochs, so a down-sampled source shows every row within ``ceil(n / quota)`` epochs.
    * ``round_robin``: single-source batches, sources taking turns; a source that runs
      out drops out of the rotation, so each row appears once per epoch.

    With ``data.group_by_length``, windows of ``group_window * batch_size`` rows of the
    shuffled order are sorted by length and cut into batches, and the batches are
    shuffled (less padding, still random). Only the last batch (per source for
    ``round_robin``) can be partial.
    """
    batch_size = config.train.batch_size
    rng = _rng(config.train.seed, _TAG_EPOCH, epoch)
    sizes = dataset.source_sizes()
    members = [np.flatnonzero(dataset.source == s) for s in range(len(sizes))]
    mixing = config.data.mixing if np.count_nonzero(sizes) > 1 else "proportional"
    if mixing == "round_robin":
        per_source = [
            _cut(rng.permutation(rows), dataset.lengths, batch_size, config, rng)
            for rows in members
        ]
        batches = []
        for turn in range(max((len(b) for b in per_source), default=0)):
            batches += [b[turn] for b in per_source if turn < len(b)]
        return batches
    if mixing == "temperature":
        quotas = _temperature_quotas(sizes, config.data.mixing_temperature)
        drawn = [
            rows[_epoch_sample(len(rows), q, config.train.seed, s, epoch)]
            for s, (rows, q) in enumerate(zip(members, quotas, strict=True))
            if q
        ]
        order = np.concatenate(drawn) if drawn else np.zeros(0, np.int64)
    else:
        order = np.arange(len(dataset))
    return _cut(rng.permutation(order), dataset.lengths, batch_size, config, rng)


def _cut(
    order: np.ndarray,
    lengths: np.ndarray,
    batch_size: int,
    config: Config,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Batches from a shuffled order, length-grouped in windows when configured."""
    if not config.data.group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    window = config.data.group_window * batch_size
    batches = []
    for w in range(0, len(order), window):
        chunk = order[w : w + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def _temperature_quotas(sizes: np.ndarray, temperature: float) -> np.ndarray:
    """Rows per source summing to ``sizes.sum()``, by largest remainder of ``N * p_i``."""
    weights = np.where(sizes > 0, sizes.astype(np.float64) ** (1.0 / temperature), 0.0)
    exact = sizes.sum() * weights / weights.sum()
    quotas = np.floor(exact).astype(np.int64)
    short = int(sizes.sum() - quotas.sum())
    quotas[np.argsort(-(exact - quotas), kind="stable")[:short]] += 1
    return quotas


def _epoch_sample(n: int, quota: int, seed: int, source: int, epoch: int) -> np.ndarray:
    """``quota`` positions in ``range(n)`` for ``epoch``: each ``quota // n`` times, plus a share.

    The ``quota % n`` extra positions are distinct within the epoch and rotate through one
    permutation per cycle of ``ceil(n / extra)`` epochs, so over a cycle every row gets its
    extra turn (an up-sampled source) or is seen once (a down-sampled source).
    """
    full, extra = divmod(quota, n)
    parts = [np.arange(n)] * full
    if extra:
        cycle, turn = divmod(epoch, math.ceil(n / extra))
        perm = _rng(seed, _TAG_CYCLE, source, cycle).permutation(n)
        chunk = perm[turn * extra : (turn + 1) * extra]
        # The cycle's last turn is short: top it up from its start (disjoint from chunk).
        parts += [chunk, perm[: extra - len(chunk)]]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def steps_per_epoch(dataset: Dataset, config: Config) -> int:
    """Batches per epoch (the same for every epoch), without building the order."""
    batch_size = config.train.batch_size
    sizes = dataset.source_sizes()
    if config.data.mixing == "round_robin" and np.count_nonzero(sizes) > 1:
        return int(sum(math.ceil(n / batch_size) for n in sizes))
    return math.ceil(len(dataset) / batch_size)


def stream_state(dataset: Dataset, config: Config, step: int) -> dict[str, int]:
    """The :class:`BatchStream` state after ``step`` batches from the start of training.

    Use this (not ``stream.state()``) when batches are prefetched: the stream's own state
    runs ahead of the step the model has consumed.
    """
    epoch, batch = divmod(int(step), steps_per_epoch(dataset, config))
    return {"epoch": epoch, "batch": batch}


class BatchStream:
    """Training batches across epochs, resumable from ``state()`` (a JSON-able dict).

    ``state()`` is the position of the next batch to be returned; after the last batch of
    epoch ``e`` it is ``{"epoch": e + 1, "batch": 0}``. A stream built with that ``state``
    (from :meth:`state` or :func:`stream_state`) returns exactly the batches an
    uninterrupted stream would have returned from that point. It stops after ``epochs`` epochs (default
    ``config.train.epochs``; ``0`` = endless, for runs bounded by ``max_steps``).
    """

    def __init__(
        self,
        dataset: Dataset,
        config: Config,
        state: Mapping[str, int] | None = None,
        epochs: int | None = None,
    ):
        self.dataset = dataset
        self.config = config
        self.buckets = buckets_for(config)
        self.steps = steps_per_epoch(dataset, config)
        self.epochs = config.train.epochs if epochs is None else epochs
        if self.steps == 0:
            raise UserError("the training data has no rows; check the tasks' train files")
        state = dict(state or {"epoch": 0, "batch": 0})
        try:
            epoch, batch = int(state["epoch"]), int(state["batch"])
        except (KeyError, TypeError, ValueError):
            raise UserError(
                f"data state {state!r}: expected {{'epoch': int, 'batch': int}}"
            ) from None
        if epoch < 0 or not 0 <= batch <= self.steps:
            raise UserError(
                f"data state {state!r} does not fit this data ({self.steps} batches per "
                "epoch); was the data, batch size or mixing changed since the checkpoint?"
            )
        self._epoch, self._batch = (epoch + 1, 0) if batch == self.steps else (epoch, batch)
        self._order: list[np.ndarray] = []
        self._order_epoch = -1

    def state(self) -> dict[str, int]:
        """``{"epoch": e, "batch": b}``: where the next batch comes from."""
        return {"epoch": self._epoch, "batch": self._batch}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        if self.epochs and self._epoch >= self.epochs:
            raise StopIteration
        if self._order_epoch != self._epoch:
            self._order = epoch_batches(self.dataset, self.config, self._epoch)
            self._order_epoch = self._epoch
        indices = self._order[self._batch]
        self._batch += 1
        if self._batch == self.steps:
            self._epoch, self._batch = self._epoch + 1, 0
        return make_batch(self.dataset, indices, self.config.train.batch_size, self.buckets)
