"""Memory-lean training (``model.remat``): each BERT layer rematerialised, matmuls kept.

Two things have to hold together for rematerialisation to lower the peak on XLA:CPU:

* **What is kept.** :class:`CheckpointedBertModule` is transformers' ``FlaxBertModule``
  with every encoder layer under ``jax.checkpoint`` and the
  ``dots_with_no_batch_dims_saveable`` policy: the outputs of a layer's dense matmuls are
  saved for the backward pass; attention scores, softmax, GELU, LayerNorm and the dropout
  masks (drawn inside the layer) are recomputed. transformers' own
  ``gradient_checkpointing`` recomputes the matmuls too (slower) and takes no policy.
* **When the recomputation runs.** XLA:CPU's default scheduler is free to run a layer's
  recomputed forward early, next to the original one, which keeps it all alive anyway:
  with the default schedule remat saved 60 MB of a 1.6 GB step. The memory-optimised
  scheduler (:func:`mtl_jax.train.train_compiler_options`) delays it to the backward pass.

Measured on MiniLM, full fine-tuning, 32 x 128 tokens, 2-core CPU, XLA's temporaries:
1,599 MB by default, 1,155 MB with the memory-optimised schedule alone, 581 MB with both
(step time +10-15 %). A global-norm gradient clip (``train.grad_clip > 0``) makes every
update wait for every gradient, and XLA:CPU then keeps more alive: 1,364 MB with both.
Short batches gain nothing (a plain step at 32 x 32 holds 331 MB) and pay up to 40 % at
16 tokens, so only batches from ``model.remat_min_length`` tokens take this module
(:class:`mtl_jax.train.LengthSplitStep`).
"""

from __future__ import annotations

import jax
from flax.linen import partitioning as nn_partitioning
from transformers.models.bert import modeling_flax_bert as hf_bert

# Saved for the backward pass: the dense layers' matmul outputs (no batch dimensions); the
# attention einsums (batched) and the elementwise work between them are recomputed.
POLICY = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
# FlaxBertLayer.__call__'s static arguments (init_cache, deterministic, output_attentions),
# counted as transformers' own gradient_checkpointing counts them.
_STATIC_ARGNUMS = (5, 6, 7)


class _CheckpointedLayers(hf_bert.FlaxBertLayerCollection):
    def setup(self):
        layer = nn_partitioning.remat(
            hf_bert.FlaxBertLayer, static_argnums=_STATIC_ARGNUMS, policy=POLICY
        )
        self.layers = [
            layer(self.config, name=str(i), dtype=self.dtype)
            for i in range(self.config.num_hidden_layers)
        ]


class _CheckpointedEncoder(hf_bert.FlaxBertEncoder):
    def setup(self):
        self.layer = _CheckpointedLayers(self.config, dtype=self.dtype)


class CheckpointedBertModule(hf_bert.FlaxBertModule):
    """``FlaxBertModule`` (same params, same outputs) with each layer checkpointed."""

    def setup(self):
        self.embeddings = hf_bert.FlaxBertEmbeddings(self.config, dtype=self.dtype)
        self.encoder = _CheckpointedEncoder(self.config, dtype=self.dtype)
        if self.add_pooling_layer:
            self.pooler = hf_bert.FlaxBertPooler(self.config, dtype=self.dtype)
