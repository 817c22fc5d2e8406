"""Task heads: MLPs with LayerNorm over the pooled sentence embedding."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLPHead(nn.Module):
    """``[Dense -> LayerNorm -> GELU -> Dropout] * len(hidden) -> Dense(num_labels)``.

    LayerNorm eps and exact GELU follow PyTorch's defaults (flax's are 1e-6 and tanh GELU),
    so a head ported from the PyTorch design computes the same function.
    """

    hidden: Sequence[int]
    num_labels: int
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
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
    without running BERT again.
    """

    specs: Sequence[tuple[str, tuple[int, ...], int, float]]  # (name, hidden, labels, dropout)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, embedding: jax.Array, deterministic: bool = True) -> dict[str, jax.Array]:
        return {
            name: MLPHead(hidden, num_labels, dropout, self.dtype, name=name)(
                embedding, deterministic=deterministic
            )
            for name, hidden, num_labels, dropout in self.specs
        }
