"""Embedding and prediction over many sentences: length-sorted, bucketed, order restored.

Sorting by length and padding each batch to one of a few bucket lengths keeps padding low
and bounds the number of XLA compilations; row ``i`` of every output is input ``i``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.data import inference_batches
from mtl_jax.encoder import Tokenized, tokenize
from mtl_jax.model import MultiTaskModel

Params = dict[str, Any]
DEFAULT_BUCKETS = (16, 32, 64, 128)


@functools.partial(jax.jit, static_argnums=0)
def _embed_batch(model: MultiTaskModel, params: Params, batch: dict) -> jax.Array:
    embedding, _ = model.apply(
        {"params": params},
        batch["input_ids"],
        batch["attention_mask"],
        batch["token_type_ids"],
        method=MultiTaskModel.embed,
    )
    return embedding


@functools.partial(jax.jit, static_argnums=0)
def _predict_batch(model: MultiTaskModel, params: Params, batch: dict):
    logits, aux = model.apply(
        {"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    )
    return {t: jax.nn.softmax(v, axis=-1) for t, v in logits.items()}, aux["embedding"]


def _model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


def embed_tokenized(
    model: MultiTaskModel,
    params: Params,
    tokenized: Tokenized,
    *,
    batch_size: int = 64,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    max_length: int = 128,
) -> np.ndarray:
    """Pooled embeddings ``[N, hidden]`` (float32), row ``i`` for sentence ``i``."""
    out = None
    for indices, batch in inference_batches(tokenized, batch_size, buckets, max_length):
        emb = np.asarray(_embed_batch(model, params, _model_inputs(batch)))
        if out is None:
            out = np.zeros((len(tokenized), emb.shape[-1]), np.float32)
        out[indices] = emb[: len(indices)]
    if out is None:
        raise ValueError("nothing to embed: no sentences")
    return out


def predict_tokenized(
    model: MultiTaskModel,
    params: Params,
    tokenized: Tokenized,
    *,
    batch_size: int = 64,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    max_length: int = 128,
) -> dict[str, np.ndarray]:
    """Class probabilities per task ``{task: [N, num_labels]}``, in input order."""
    out: dict[str, np.ndarray] = {}
    for indices, batch in inference_batches(tokenized, batch_size, buckets, max_length):
        probs, _ = _predict_batch(model, params, _model_inputs(batch))
        for task, p in probs.items():
            p = np.asarray(p)
            if task not in out:
                out[task] = np.zeros((len(tokenized), p.shape[-1]), np.float32)
            out[task][indices] = p[: len(indices)]
    return out


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
    buckets: tuple[int, ...] = DEFAULT_BUCKETS

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
        from mtl_jax.config import Config, ModelConfig
        from mtl_jax.encoder import load_backbone
        from mtl_jax.model import build_model, init_params

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
        params = init_params(model, jax.random.key(seed), loaded)
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
