"""Models ready to use: a pretrained :class:`SentenceEncoder`, and a trained run restored.

The batched work (length-sorted, bucketed, order restored) is :mod:`mtl_jax.evaluate`'s;
this module turns texts and run directories into its inputs and its outputs into records.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.checkpoint import check_label_stamp, check_params_fit, open_run, restore_params
from mtl_jax.config import Config, ModelConfig
from mtl_jax.data import Dataset, load_task_datasets
from mtl_jax.data.context import ContextKey, context_key, fitted_windows
from mtl_jax.encoder import Backbone, load_backbone, tokenize
from mtl_jax.evaluate import (  # noqa: F401  (embed/predict_tokenized: public here too)
    Scores,
    embed_tokenized,
    evaluate_dataset,
    predict_tokenized,
)
from mtl_jax.model import MultiTaskModel, build_model, init_params
from mtl_jax.train import make_eval_step
from mtl_jax.trees import Params


@dataclasses.dataclass(frozen=True)
class EmbedResult:
    embeddings: np.ndarray  # [N, hidden], row i = sentence i
    truncated: int  # sentences cut at max_length


@dataclasses.dataclass(frozen=True)
class SentenceEncoder:
    """Tokenizer + backbone + pooling: ``SentenceEncoder.load("minilm").embed(texts)``."""

    model: MultiTaskModel
    params: Params
    tokenizer: Any
    max_length: int = 128
    buckets: tuple[int, ...] | None = None  # None: data.inference_buckets(max_length)

    @classmethod
    def load(
        cls,
        backbone: str = "minilm",
        *,
        layer: int = -2,
        pooling: str = "mean",
        normalize: bool = False,
        max_length: int = 128,
        dtype: str = "float32",
        seed: int = 0,
    ) -> SentenceEncoder:
        """An encoder over pretrained (or, for ``"tiny"``, seeded random) BERT weights."""
        model_cfg = ModelConfig(
            backbone=backbone,
            layer=layer,
            pooling=pooling,
            normalize=normalize,
            max_length=max_length,
            dtype=dtype,
        )
        model_cfg.validate()
        loaded = load_backbone(backbone)
        model = build_model(Config(model=model_cfg), loaded)  # no tasks: no heads
        # On the device once; the host copy goes (it would double the weights' memory).
        params = jax.device_put(init_params(model, jax.random.key(seed), loaded))
        return cls(model, params, loaded.tokenizer, max_length)

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> EmbedResult:
        """Embed ``texts`` (in order); long sentences are cut at ``max_length`` and counted."""
        tokenized = tokenize(self.tokenizer, list(texts), self.max_length)
        embeddings = embed_tokenized(
            self.model,
            self.params,
            tokenized,
            batch_size=batch_size,
            buckets=self.buckets,
            max_length=self.max_length,
        )
        return EmbedResult(embeddings, tokenized.truncated)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise cosine similarity of the rows of ``a`` and ``b``."""
    a = np.asarray(jnp.asarray(a) / jnp.linalg.norm(a, axis=-1, keepdims=True))
    b = np.asarray(jnp.asarray(b) / jnp.linalg.norm(b, axis=-1, keepdims=True))
    return a @ b.T


# -- a trained run, restored for inference ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Trained:
    """A run restored for inference: config with labels, model, params, tokenizer."""

    config: Config
    model: MultiTaskModel
    params: Params
    tokenizer: Any
    step: int
    averaged_steps: tuple[int, ...] = ()  # --which average: the checkpoints meaned
    weights: str = "params"  # "ema": the run's EMA of the params (train.ema_decay)

    def with_dtype(self, dtype: str | None) -> Trained:
        """The same run computing in ``dtype`` (e.g. ``"bfloat16"`` for faster inference on
        CPU, see :mod:`mtl_jax.dots`); params stay as restored. ``None`` keeps the run's."""
        if dtype is None or dtype == self.model.dtype:
            return self
        ModelConfig(dtype=dtype).validate()
        return dataclasses.replace(self, model=dataclasses.replace(self.model, dtype=dtype))

    def encoder(self, normalize: bool = False, max_length: int | None = None) -> SentenceEncoder:
        """The fine-tuned backbone as a :class:`SentenceEncoder` (its layer, pooling, dtype)."""
        model = dataclasses.replace(self.model, head_specs=(), own_layers=(), normalize=normalize)
        max_length = max_length or self.config.model.max_length
        return SentenceEncoder(
            model, {"backbone": self.params["backbone"]}, self.tokenizer, max_length
        )


def load_trained(workdir: str, which: str = "latest") -> Trained:
    """Restore a run directory for inference: no optimiser state, no pretrained weights.

    Raises:
      UserError: not a run directory, no complete checkpoint, or params that do not fit
        the config saved with them (shapes, or the label names the checkpoint records).
    """
    run = open_run(workdir)
    model = build_model(run.config, Backbone(run.bert_config, None, run.tokenizer, workdir))
    ids = jnp.ones((1, 8), jnp.int32)
    expected = jax.eval_shape(model.init, jax.random.key(0), ids, ids)["params"]
    params, meta = restore_params(workdir, which)
    params = {k: v for k, v in params.items() if k in ("backbone", "heads")}
    check_params_fit(params, expected, str(workdir))
    check_label_stamp(meta, run.config, workdir)
    averaged = tuple(int(s) for s in meta.get("averaged_steps", ()))
    step, weights = int(meta.get("step", 0)), str(meta.get("weights", "params"))
    return Trained(run.config, model, params, run.tokenizer, step, averaged, weights)


def predict_texts(
    trained: Trained,
    texts: Sequence[str],
    batch_size: int = 64,
    stats: dict[str, int] | None = None,
    sources: Mapping[str, Sequence[str]] | None = None,
) -> list[dict]:
    """One record per sentence: ``{"text", <task>: {"label", "probs": {label: p}}}``.

    A task trained with ``context`` reads each sentence joined with its neighbours, as in
    training: ``sources`` maps its ``source_column`` to each sentence's source text
    (``[""] * len(texts)``: the texts in order are one passage). Tasks that read the same
    input share one forward pass. With ``stats``, ``stats["truncated"]`` is set to the
    number of inputs cut at ``model.max_length`` tokens (the most over those passes).

    Raises:
      ValueError: ``sources`` lacks the source column of a task with context.
    """
    config = trained.config
    groups: dict[ContextKey, list[str]] = {}
    for task in config.tasks:
        groups.setdefault(context_key(task), []).append(task.name)
    probs: dict[str, np.ndarray] = {}
    truncated = 0
    max_length = config.model.max_length
    for (context, column), names in groups.items():
        passages = [""] * len(texts)
        if column:
            if column not in (sources or {}):
                raise ValueError(
                    f"tasks {names} read each sentence with its neighbours by {column!r}: "
                    f"pass sources={{{column!r}: [...]}} (one value per text)"
                )
            passages = list(sources[column])
        inputs = fitted_windows(trained.tokenizer, max_length, texts, passages, context)
        tokenized = tokenize(trained.tokenizer, inputs, max_length)
        truncated = max(truncated, tokenized.truncated)
        group_probs = predict_tokenized(
            trained.model,
            trained.params,
            tokenized,
            batch_size=batch_size,
            max_length=max_length,
        )
        probs.update({name: group_probs[name] for name in names})
    if stats is not None:
        stats["truncated"] = truncated
    records = []
    for i, text in enumerate(texts):
        record: dict[str, Any] = {"text": text}
        for task in config.tasks:
            p = probs[task.name][i]
            record[task.name] = {
                "label": task.labels[int(p.argmax())],
                "probs": {
                    label: round(float(q), 6) for label, q in zip(task.labels, p, strict=True)
                },
            }
        records.append(record)
    return records


def dev_dataset(
    trained: Trained, files: dict[str, str], batch_size: int = 64, skip_empty: bool = False
) -> tuple[Config, Dataset]:
    """The run's config pointed at labelled files ``{task: path}`` (evaluated in batches of
    ``batch_size``) and their dataset, read as in training: the checkpoint's label maps,
    each task's context. Tasks without a file are unlabelled; ``skip_empty`` drops rows
    with an empty text instead of refusing the file."""
    config = trained.config
    tasks = tuple(dataclasses.replace(t, dev_file=files.get(t.name, "")) for t in config.tasks)
    config = dataclasses.replace(
        config,
        tasks=tasks,
        data=dataclasses.replace(config.data, eval_batch_size=batch_size),
    )
    return config, load_task_datasets(config, trained.tokenizer, "dev", skip_empty)


def evaluate_files(
    trained: Trained, files: dict[str, str], batch_size: int = 64, skip_empty: bool = False
) -> Scores:
    """Scores per task on labelled files ``{task: path}``, with the checkpoint's label maps.

    ``skip_empty`` drops rows with an empty text instead of refusing the file.
    """
    config, dataset = dev_dataset(trained, files, batch_size, skip_empty)
    scores = evaluate_dataset(
        make_eval_step(trained.model, config), trained.params, dataset, config
    )
    return {task: scores[task] for task in files if task in scores}
