"""Built-in configs by name: ``demo`` (synthetic data, the README's main job) and ``real``."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from mtl_jax.config import Config, DataConfig, ModelConfig, TaskConfig, TrainConfig, default_tasks
from mtl_jax.errors import UserError

DATA_DIR_ENV = "MTL_JAX_DATA"
# The real preset's padded lengths: fine where its short phrases are (docs/model_quality.md).
FINE_BUCKETS = (8, 12, 16, 24, 32, 48, 64, 96, 128)


def demo() -> Config:
    """Both tasks on built-in synthetic sentences, frozen MiniLM: a couple of minutes on CPU.

    Synthetic rows replace every task file, so ``--preset demo --set
    tasks.genre.train_file=...`` is refused by :meth:`Config.validate` rather than silently
    ignored; to train the demo's settings on files, also set ``data.synthetic_train_rows=0``
    and ``data.synthetic_dev_rows=0``.
    """
    return Config(
        model=ModelConfig(backbone="minilm", max_length=64, backbone_dropout=False),
        tasks=default_tasks(),
        data=DataConfig(synthetic_train_rows=2000, synthetic_dev_rows=500),
        train=TrainConfig(
            freeze="backbone",
            epochs=3,
            batch_size=32,
            head_learning_rate=2e-3,
            eval_every=1000,
            checkpoint_every=1000,
            log_every=20,
        ),
    )


def real(data_dir: str | Path | None = None) -> Config:
    """The best multi-task recipe measured (docs/model_quality.md), on ``../shared/data``.

    Brown fiction genres + sentiment trained on GLUE's 67k SST-2 phrases (scored on the
    SST-2 sentence dev set), from ``../shared/data`` or ``$MTL_JAX_DATA``. One dataset per
    task: each batch mixes both sources and each task's loss averages over the rows that
    carry its label. Full fine-tuning for 3 epochs at a backbone rate of 1e-4 with
    class-balanced genre weights, the levers that helped (pooling layer -1 and temperature
    mixing did not), and an EMA of the weights (decay 0.999), which the run evaluates, keeps
    as ``best/`` and exports: the same end scores, steadier evaluations, a better ``best/``;
    ``model.remat`` off: at batch 32 memory is no concern and the 64- and
    128-token batches would pay 10-15 % for it (the runs that measured it had it off).
    Nine length buckets instead of the default four: most batches are short phrases, and
    padding them to 8, 12 or 24 tokens rather than 16 or 32 cuts the padded share of the
    tokens from 42 % to 22 % and the run from about 75 to 58 minutes on a 2-core CPU (the
    same batches; five more compiles). Genre reads each sentence with up to two sentences
    before and two after it from the same Brown text (``context = 2`` by ``source_id``;
    round 12 with one, round 14 with two): one sentence often carries no genre, its passage
    does. Three epochs, not four (round 14): genre peaks in its first, and the fourth would
    take the run past 90 minutes; it takes about 70 on that CPU.
    """
    directory = Path(data_dir or os.environ.get(DATA_DIR_ENV) or "../shared/data")
    genre, sentiment = data_folder_tasks(directory, sentiment_train="sst2_phrases")
    genre = dataclasses.replace(
        genre, class_weighting="balanced", context=2, source_column="source_id"
    )
    tasks = (genre, sentiment)
    return Config(
        model=ModelConfig(backbone="minilm", max_length=128, remat=False),
        tasks=tasks,
        data=DataConfig(length_buckets=FINE_BUCKETS),
        train=TrainConfig(
            freeze="none",
            epochs=3,
            batch_size=32,
            learning_rate=1e-4,
            warmup_steps=200,
            ema_decay=0.999,
            eval_every=1000,
            checkpoint_every=1000,
        ),
    )


def data_folder_tasks(
    directory: str | Path, sentiment_train: str = "sst2"
) -> tuple[TaskConfig, TaskConfig]:
    """The default genre and sentiment tasks on a data folder laid out as ``../shared/data``:
    Brown genres from ``brown_genre/``, sentiment trained on ``SENTIMENT_TRAIN/train.tsv``
    (``sst2``: the 6,920 sentences; ``sst2_phrases``: GLUE's 67k phrases) and scored on
    ``sst2/dev.tsv``."""
    directory = Path(directory)
    genre, sentiment = default_tasks()
    return (
        dataclasses.replace(
            genre,
            train_file=str(directory / "brown_genre" / "train.tsv"),
            dev_file=str(directory / "brown_genre" / "dev.tsv"),
        ),
        dataclasses.replace(
            sentiment,
            train_file=str(directory / sentiment_train / "train.tsv"),
            dev_file=str(directory / "sst2" / "dev.tsv"),
        ),
    )


PRESETS = {"demo": demo, "real": real}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise UserError(f"--preset: unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[name]()
