"""The forward functions a step calls: ``forward(params, batch, train, rngs) -> (logits
per task, aux)``.

:func:`model_forward` is the full model on token inputs; where no backward pass goes
through the backbone, long batches run it in chunks (:func:`pooled_in_chunks`) on CPU.
:func:`mtl_jax.features.cached_forward` runs only the heads on a cached embedding
(:func:`heads_forward`). The steps of :mod:`mtl_jax.train` take either.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from mtl_jax.config import Config
from mtl_jax.data.batching import inference_max_tokens, rows_within
from mtl_jax.freezing import backbone_trainable

Batch = Mapping[str, Any]

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
TARGET_KEYS = ("labels", "valid")
STEP_KEYS = (*MODEL_INPUTS, *TARGET_KEYS)


@dataclasses.dataclass(frozen=True)
class Forward:
    """``apply(params, batch, train, rngs) -> (logits per task, aux)`` and what it reads.

    ``inputs`` are the batch keys ``apply`` reads; the jitted steps pass only those (and
    the targets), so other keys neither reach the device nor cause a retrace.
    """

    apply: Callable[[Any, Batch, bool, Mapping[str, jax.Array] | None], tuple[dict, dict]]
    inputs: tuple[str, ...] = MODEL_INPUTS

    def __call__(self, params, batch, train, rngs):
        return self.apply(params, batch, train, rngs)

    @property
    def step_keys(self) -> tuple[str, ...]:
        return (*self.inputs, *TARGET_KEYS)


def model_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The part of the params the Flax model knows (no ``log_vars``)."""
    return {"backbone": params["backbone"], "heads": params["heads"]}


def model_inputs(batch: Batch) -> dict[str, Any]:
    """The token arrays the model reads (``token_type_ids`` zeros when absent)."""
    types = batch.get("token_type_ids")
    if types is None:
        types = jnp.zeros_like(batch["input_ids"])
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "token_type_ids": types,
    }


CUTOFF_STREAM = 0x0C07  # folded into a step's dropout key: the cutoff's own random stream


def cut_off_tokens(inputs: Mapping[str, jax.Array], rate: float, key: jax.Array) -> dict:
    """``inputs`` with about ``rate`` of each row's word pieces hidden from the encoder.

    Token cutoff (Shen et al. 2020, "A Simple but Tough-to-Beat Data Augmentation
    Approach"): a hidden token leaves the attention mask, so no other token attends to it
    and mean pooling skips it; the model must read a sentence's label from the rest of it.
    ``[CLS]``, ``[SEP]`` (the last unpadded position; rows are right-padded) and padding are
    never touched, so every row keeps at least two tokens. Training only.
    """
    mask = inputs["attention_mask"]
    position = jnp.arange(mask.shape[1])
    last = mask.sum(axis=1, keepdims=True) - 1
    content = (position > 0) & (position < last)
    hidden = jax.random.bernoulli(key, rate, mask.shape) & content
    return {**inputs, "attention_mask": jnp.where(hidden, 0, mask).astype(mask.dtype)}


def batch_token_budget(batch_size: int) -> int | None:
    """The padded-token cap of this backend's inference batches (None: no cap).

    CPU only (:func:`mtl_jax.data.inference_max_tokens`); accelerators, where bigger
    batches pay and memory is the device's, take every row."""
    return inference_max_tokens(batch_size) if jax.default_backend() == "cpu" else None


def forward_chunk_rows(rows: int, length: int) -> int:
    """Rows per pass of a backbone forward that no backward pass follows.

    What an inference batch may hold (:func:`batch_token_budget`: on CPU 4 rows of 128
    tokens out of 32, all 32 rows of 16), down to a divisor of ``rows``: the activations of
    a long batch no longer set the peak, and the smaller working set is no slower.
    """
    chunk = rows_within(rows, length, batch_token_budget(rows))
    while rows % chunk:  # equal chunks: the largest divisor of rows within the budget
        chunk -= 1
    return chunk


def pooled_in_chunks(
    model: Any,
    backbone_params: Any,
    inputs: Mapping[str, jax.Array],
    chunk_rows: int,
    deterministic: bool,
    key: jax.Array | None,
) -> tuple[jax.Array, dict[int, jax.Array]]:
    """What the heads read from ``inputs``, ``chunk_rows`` rows at a time: the pooled
    embedding ``[B, hidden]`` and the token states a task's own top layers read (empty
    without; :meth:`mtl_jax.model.MultiTaskModel.encode`).

    One ``lax.map`` iteration per chunk, so XLA keeps one chunk's activations at a time. No
    gradient reaches the backbone (it is stopped at the params, so no loop is
    differentiated). Chunk ``k`` holds rows ``k, k + n, k + 2n, ...``: a batch split over
    devices stays split the same way inside every chunk. With dropout (``deterministic``
    false) chunk ``k`` draws from ``fold_in(key, k)``.
    """
    rows, length = inputs["input_ids"].shape
    n = rows // chunk_rows
    backbone_params = jax.lax.stop_gradient(backbone_params)
    stacked = {k: v.reshape(chunk_rows, n, length).swapaxes(0, 1) for k, v in inputs.items()}

    def embed_chunk(index_and_chunk):
        index, chunk = index_and_chunk
        rngs = None if deterministic else {"dropout": jax.random.fold_in(key, index)}
        return model.apply(
            {"params": {"backbone": backbone_params}},
            chunk["input_ids"],
            chunk["attention_mask"],
            chunk["token_type_ids"],
            deterministic=deterministic,
            method=_heads_inputs,
            rngs=rngs,
        )

    chunked = jax.lax.map(embed_chunk, (jnp.arange(n), stacked))  # [n, chunk_rows, ...]
    return jax.tree_util.tree_map(lambda x: x.swapaxes(0, 1).reshape(rows, *x.shape[2:]), chunked)


def _heads_inputs(module: Any, *inputs, deterministic: bool):
    """What the heads read (no last-layer token states, which a chunk need not return)."""
    embedding, _, below = module.encode(*inputs, deterministic=deterministic)
    return embedding, below


def _run_heads(module: Any, embedding, below, mask, deterministic, layers_deterministic):
    return module.heads(
        embedding,
        deterministic=deterministic,
        below=below,
        mask=mask,
        layers_deterministic=layers_deterministic,
    )


def heads_forward(
    model: Any,
    params: Any,
    embedding: jax.Array,
    train: bool,
    rngs,
    below: Mapping[int, jax.Array] | None = None,
    mask: jax.Array | None = None,
    layers_deterministic: bool | None = None,
):
    """The heads alone on what they read: ``(logits per task, {"embedding"})``.

    They run at their own path inside the full model, so their dropout draws the same masks
    as in a full forward with the same ``rngs``. A task with its own top layers reads
    ``below`` (:meth:`mtl_jax.model.MultiTaskModel.encode`) under ``mask``, all rows in one
    pass (its layers' activations are one layer's of the whole batch, not one chunk's).
    """
    logits = model.apply(
        {"params": {"heads": params["heads"]}},
        embedding,
        below,
        mask,
        not train,
        layers_deterministic,
        method=_run_heads,
        rngs=rngs,
    )
    return logits, {"embedding": embedding}


def model_forward(model: Any, config: Config | None = None) -> Forward:
    """The full model on a batch's token inputs: the forward of every uncached step.

    In training (``train=True``) the heads' dropout is on, BERT's only with
    ``model.backbone_dropout``; when no backbone group can ever train, the model stops
    gradients at the pooled embedding so XLA drops the backbone's backward pass.
    ``config=None`` (inference) needs ``train=False``.

    Where no backward pass goes through the backbone (evaluation, or a backbone frozen for
    the whole run), a long batch runs it :func:`forward_chunk_rows` rows at a time
    (:func:`pooled_in_chunks`) and the heads on the result: the same embedding up to float
    rounding, the heads' dropout masks unchanged; BERT's own dropout masks, if on, differ
    from a one-pass forward's (one key per chunk). With ``train.token_cutoff`` a training
    forward first hides that share of each row's tokens (:func:`cut_off_tokens`).
    """
    backbone_deterministic = not (config is not None and config.model.backbone_dropout)
    train_backbone = config is None or backbone_trainable(config.train)
    cutoff = 0.0 if config is None else config.train.token_cutoff

    def forward(params, batch, train, rngs):
        inputs = model_inputs(batch)
        if train and cutoff:
            key = jax.random.fold_in(rngs["dropout"], CUTOFF_STREAM)
            inputs = cut_off_tokens(inputs, cutoff, key)
        rows, length = inputs["input_ids"].shape
        chunk_rows = forward_chunk_rows(rows, length)
        if chunk_rows < rows and not (train and train_backbone):
            deterministic = backbone_deterministic if train else True
            key = None if rngs is None else rngs.get("dropout")
            embedding, below = pooled_in_chunks(
                model, params["backbone"], inputs, chunk_rows, deterministic, key
            )
            mask = inputs["attention_mask"]
            return heads_forward(model, params, embedding, train, rngs, below, mask, deterministic)
        return model.apply(
            {"params": model_params(params)},
            inputs["input_ids"],
            inputs["attention_mask"],
            inputs["token_type_ids"],
            deterministic=not train,
            backbone_deterministic=backbone_deterministic if train else None,
            train_backbone=train_backbone,
            rngs=rngs,
        )

    return Forward(forward, MODEL_INPUTS)
