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
    """The best multi-task recipe measured, on ``../shared/data`` or ``$MTL_JAX_DATA``.

    Genre on Brown fiction, sentiment on GLUE's 67k SST-2 phrases (scored on the SST-2
    sentence dev set); one dataset per task, each batch mixing both and each task's loss
    averaging over the rows that carry its label. What each setting is for (the measurements
    and the levers that were dropped are in docs/model_quality.md):

    - full fine-tuning for 2 epochs, the backbone at 1e-4 after 200 warm-up steps (the heads
      at the default 1e-3): genre peaks in its first epoch and sentiment gains nothing
      from a third (over three draws 2 epochs end a little higher on both tasks than two
      draws of 3), and the run takes about 50 minutes on a 2-core CPU;
    - class-balanced genre weights: about 4 macro-F1 points at no cost to SST-2;
    - genre reads each sentence with up to two sentences before and after it from the same
      Brown text (``context = 2`` by ``source_id``): one sentence often carries no genre,
      its passage does;
    - genre reads its own copy of the encoder's top layer (``own_layers = 1``), which
      sentiment's loss does not move: over three draws genre ends 2.3 macro-F1 higher and
      SST-2 level, for 6-10 % more time;
    - an EMA of the weights (decay 0.999), which the run evaluates, keeps as ``best/`` and
      exports: steadier evaluations and a better ``best/``;
    - nine length buckets: most batches are short phrases, and padding them to 8, 12 or 24
      tokens rather than 16 or 32 nearly halves the padded share of the tokens;
    - ``model.remat`` off: at batch 32 memory is no concern, and recomputing would cost the
      batches of 64 tokens or more 10-15 %.
    """
    directory = Path(data_dir or os.environ.get(DATA_DIR_ENV) or "../shared/data")
    genre, sentiment = data_folder_tasks(directory, sentiment_train="sst2_phrases")
    genre = dataclasses.replace(
        genre, class_weighting="balanced", context=2, source_column="source_id", own_layers=1
    )
    tasks = (genre, sentiment)
    return Config(
        model=ModelConfig(backbone="minilm", max_length=128, remat=False),
        tasks=tasks,
        data=DataConfig(length_buckets=FINE_BUCKETS),
        train=TrainConfig(
            freeze="none",
            epochs=2,
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
