"""Task heads: MLPs with LayerNorm over the pooled sentence embedding, or over a task's own
copy of the encoder's top layers (``tasks.<task>.own_layers``)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from transformers.models.bert.modeling_flax_bert import FlaxBertLayer

from mtl_jax import dots
from mtl_jax.encoder import pooled, truncated_bert_config


class OwnLayers(nn.Module):
    """A task's own copy of the encoder's top layers, then the model's pooling.

    Token states ``[B, T, hidden]`` entering the top ``n`` layers -> those layers (BERT's,
    named ``layer_<i>``; :func:`mtl_jax.model.init_params` copies the pretrained ones in) ->
    one pooled vector per row. Only its task trains them: the other tasks' gradients never
    move the features this task reads last. bfloat16 on CPU computes as the backbone does
    (float32 activations, bf16 dense operands: :mod:`mtl_jax.dots`).
    """

    n: int
    bert_config: str  # frozen_bert_config() JSON: the layers' shapes and dropout
    pooling: str = "mean"
    normalize: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, states: jax.Array, mask: jax.Array, deterministic: bool = True):
        config = truncated_bert_config(self.bert_config, self.n)
        cpu_bf16 = dots.wanted(self.dtype)
        dtype = jnp.float32 if cpu_bf16 else self.dtype
        with dots.bf16_operand_dense() if cpu_bf16 else contextlib.nullcontext():
            for i in range(self.n):
                layer = FlaxBertLayer(config, dtype=dtype, name=f"layer_{i}")
                states = layer(states, mask, None, deterministic=deterministic)[0]
        return pooled(states, mask, self.pooling, self.normalize)


class MLPHead(nn.Module):
    """``[Dense -> LayerNorm -> GELU -> Dropout] * len(hidden) -> Dense(num_labels)``.

    LayerNorm eps and exact GELU follow PyTorch's defaults (flax's are 1e-6 and tanh GELU),
    so a head ported from the PyTorch design computes the same function. With
    ``own_layers`` the head first reads token states through its task's own copy of the
    encoder's top layers (:class:`OwnLayers`, params ``own/layer_<i>``); ``x`` is then
    ``(states, mask)``.
    """

    hidden: Sequence[int]
    num_labels: int
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    own_layers: int = 0
    bert_config: str = ""  # frozen_bert_config() JSON; needed with own_layers
    pooling: str = "mean"
    normalize: bool = False

    @nn.compact
    def __call__(self, x, deterministic: bool = True, layers_deterministic: bool | None = None):
        if self.own_layers:
            states, mask = x
            if layers_deterministic is None:
                layers_deterministic = deterministic
            own = OwnLayers(
                self.own_layers,
                self.bert_config,
                self.pooling,
                self.normalize,
                self.dtype,
                name="own",
            )
            x = own(states, mask, deterministic=layers_deterministic)
        for i, width in enumerate(self.hidden):
            x = nn.Dense(width, dtype=self.dtype, name=f"dense_{i}")(x)
            x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=f"norm_{i}")(x)
            x = nn.gelu(x, approximate=False)
            if self.dropout > 0:
                x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        logits = nn.Dense(self.num_labels, dtype=self.dtype, name="out")(x)
        return logits.astype(jnp.float32)


class TaskHeads(nn.Module):
    """One :class:`MLPHead` per task, named by the task: params ``{task: {...}}``.

    Applied on its own to cached embeddings, it trains the heads of a frozen backbone
    without running BERT again. A task in ``own_layers`` (``(task, n)`` pairs) reads
    ``below[n]``, the token states entering the encoder's top ``n`` layers, through its own
    copy of them (``mask`` is the batch's attention mask); the others read ``embedding``.
    """

    specs: Sequence[tuple[str, tuple[int, ...], int, float]]  # (name, hidden, labels, dropout)
    dtype: jnp.dtype = jnp.float32
    own_layers: tuple[tuple[str, int], ...] = ()
    bert_config: str = ""  # frozen_bert_config() JSON; needed with own_layers
    pooling: str = "mean"
    normalize: bool = False

    @nn.compact
    def __call__(
        self,
        embedding: jax.Array,
        deterministic: bool = True,
        below: dict[int, jax.Array] | None = None,
        mask: jax.Array | None = None,
        layers_deterministic: bool | None = None,
    ) -> dict[str, jax.Array]:
        own = dict(self.own_layers)
        logits = {}
        for name, hidden, num_labels, dropout in self.specs:
            n = own.get(name, 0)
            head = MLPHead(
                hidden,
                num_labels,
                dropout,
                self.dtype,
                n,
                self.bert_config,
                self.pooling,
                self.normalize,
                name=name,
            )
            x = (below[n], mask) if n else embedding
            logits[name] = head(x, deterministic, layers_deterministic)
        return logits
