"""Data-layer helpers only the tests need: unlabelled datasets and padding counts."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from mtl_jax.config import Config
from mtl_jax.data.dataset import Dataset, build_dataset
from mtl_jax.data.labels import labels_from_files
from mtl_jax.run_setup import with_class_weights


def dataset_from_texts(
    texts: Sequence[str], tokenizer: Any, max_length: int, task_names: Sequence[str] = ()
) -> Dataset:
    """An unlabelled :class:`Dataset` (every label ``-1``), as inference batches see one."""
    n = len(texts)
    return build_dataset(
        tokenizer,
        max_length,
        list(texts),
        np.full((n, len(task_names)), -1, np.int32),
        np.arange(1, n + 1),
        np.zeros(n),
        ("texts",),
        task_names,
    )


def padding_stats(batches: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Real and padded token counts over batches, and the share of padding.

    Dummy rows that fill the last batch count as padding: they cost the same compute.
    """
    real = total = 0
    for batch in batches:
        mask = np.asarray(batch["attention_mask"])
        real += int(mask.sum())
        total += mask.size
    padded = total - real
    return {
        "real_tokens": real,
        "padded_tokens": padded,
        "padding_share": padded / total if total else 0.0,
    }


def resolve_labels(config: Config, skip_empty: bool = False) -> Config:
    """``config`` with each task's empty ``labels`` filled in from its train file."""
    return config.with_labels(labels_from_files(config, skip_empty))


def resolve_class_weights(config: Config, train: Dataset) -> Config:
    """``config`` recording each task's class weights, as a run resolves them."""
    return with_class_weights(config, train)
