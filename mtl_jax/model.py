"""MultiTaskModel: a shared BERT backbone, pooling, and one head per task.

``params = {"backbone": <FlaxBertModule params>, "heads": {task: <MLPHead params>}}``.
``apply`` returns ``(logits_per_task, aux)``; ``aux`` carries the pooled embedding and the
token states so evaluators and probes reuse them instead of running BERT again.
"""

from __future__ import annotations

import contextlib
import functools
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from mtl_jax import dots
from mtl_jax.config import Config
from mtl_jax.encoder import (
    Backbone,
    bert_module,
    frozen_bert_config,
    layers_to_run,
    pooled,
    truncate_params,
)
from mtl_jax.errors import UserError
from mtl_jax.heads import TaskHeads
from mtl_jax.trees import ParamPath, Params, tree_diff


class MultiTaskModel(nn.Module):
    """Shared backbone -> pooled sentence embedding -> per-task logits."""

    bert_config: str  # frozen_bert_config() (JSON) of the full model
    n_layers: int  # encoder layers actually run (from the pooled layer)
    head_specs: tuple[tuple[str, tuple[int, ...], int, float], ...]
    pooling: str = "mean"
    normalize: bool = False
    dtype: str = "float32"
    remat: bool = False
    own_layers: tuple[tuple[str, int], ...] = ()  # (task, n): tasks with their own top n layers

    def setup(self):
        # bfloat16 on CPU: float32 activations, bf16 dense operands (mtl_jax.dots).
        backbone_dtype = "float32" if dots.wanted(self.dtype) else self.dtype
        self.backbone = bert_module(self.bert_config, self.n_layers, backbone_dtype, self.remat)
        self.heads = TaskHeads(
            self.head_specs,
            dtype=jnp.dtype(self.dtype),
            own_layers=self.own_layers,
            bert_config=self.bert_config,
            pooling=self.pooling,
            normalize=self.normalize,
        )

    def embed(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
        deterministic: bool = True,
    ) -> tuple[jax.Array, jax.Array]:
        """Pooled sentence embedding ``[batch, hidden]`` (float32) and token states."""
        embedding, hidden, _ = self.encode(input_ids, attention_mask, token_type_ids, deterministic)
        return embedding, hidden

    def encode(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
        deterministic: bool = True,
    ) -> tuple[jax.Array, jax.Array, dict[int, jax.Array]]:
        """:meth:`embed`'s outputs and what the heads read besides: ``{n: token states
        entering the top n layers}`` for each ``n`` of ``own_layers`` (empty without)."""
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        depths = sorted({n for _, n in self.own_layers})
        with dots.bf16_operand_dense() if dots.wanted(self.dtype) else contextlib.nullcontext():
            out = self.backbone(
                input_ids,
                attention_mask,
                token_type_ids,
                deterministic=deterministic,
                output_hidden_states=bool(depths),
            )
        hidden = out.last_hidden_state
        embedding = pooled(hidden, attention_mask, self.pooling, self.normalize)
        below = {n: out.hidden_states[self.n_layers - n] for n in depths}
        return embedding, hidden, below

    def init_heads(
        self, embedding: jax.Array, below: dict[int, jax.Array], mask: jax.Array
    ) -> dict[str, jax.Array]:
        """The heads alone on what they read (what :func:`init_params` initialises)."""
        return self.heads(embedding, deterministic=True, below=below, mask=mask)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
        deterministic: bool = True,
        backbone_deterministic: bool | None = None,
        train_backbone: bool = True,
    ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """Logits per task and ``aux = {"embedding", "hidden"}``.

        ``train_backbone=False`` stops gradients at the pooled embedding (and the token
        states a task's own layers read) so XLA drops the
        backbone's backward pass when no backbone parameter can change.
        """
        if backbone_deterministic is None:
            backbone_deterministic = deterministic
        embedding, hidden, below = self.encode(
            input_ids, attention_mask, token_type_ids, deterministic=backbone_deterministic
        )
        if not train_backbone:
            embedding, below = jax.lax.stop_gradient((embedding, below))
        logits = self.heads(
            embedding,
            deterministic=deterministic,
            below=below,
            mask=attention_mask,
            layers_deterministic=backbone_deterministic,
        )
        return logits, {"embedding": embedding, "hidden": hidden}


def head_specs(config: Config) -> tuple[tuple[str, tuple[int, ...], int, float], ...]:
    """``(name, hidden, num_labels, dropout)`` per task; every task needs its labels by now."""
    specs = []
    for task in config.tasks:
        if task.num_labels < 2:
            raise UserError(
                f"config key 'tasks.{task.name}.labels': unknown; give the labels or a "
                "train_file to infer them from"
            )
        specs.append((task.name, tuple(task.hidden), task.num_labels, float(task.dropout)))
    return tuple(specs)


def build_model(config: Config, backbone: Backbone) -> MultiTaskModel:
    """The model a config describes, running only the layers its pooled layer needs."""
    n_layers = layers_to_run(backbone.num_layers, config.model.layer)
    return MultiTaskModel(
        bert_config=frozen_bert_config(backbone.bert_config),
        n_layers=n_layers,
        head_specs=head_specs(config),
        pooling=config.model.pooling,
        normalize=config.model.normalize,
        dtype=config.model.dtype,
        remat=config.model.remat,
        own_layers=own_layer_pairs(config, n_layers),
    )


def own_layer_pairs(config: Config, n_layers: int) -> tuple[tuple[str, int], ...]:
    """``(task, n)`` for each task reading its own copy of the top ``n`` of the ``n_layers``
    layers the model runs (up to its pooled layer)."""
    pairs = tuple((t.name, t.own_layers) for t in config.tasks if t.own_layers)
    for name, n in pairs:
        if n > n_layers:
            raise UserError(
                f"config key 'tasks.{name}.own_layers': {n}, but the model runs {n_layers} "
                f"layers up to model.layer = {config.model.layer}; give at most {n_layers}"
            )
    return pairs


def init_params(model: MultiTaskModel, key: jax.Array, backbone: Backbone) -> Params:
    """Fresh params with the pretrained backbone merged in (random when it has none).

    With pretrained weights only the heads are initialised; the backbone's shapes come from
    ``jax.eval_shape``. No compile of BERT's initialiser and no random copy of its weights:
    that was ~330 MB of a MiniLM process's peak memory. The heads get the values a full
    ``model.init`` gives them (Flax derives a submodule's key from its name, not its order).
    """
    ids = jnp.ones((1, 8), jnp.int32)
    inputs = (ids, jnp.ones_like(ids), jnp.zeros_like(ids))
    if backbone.params is None:
        params = jax.jit(model.init)(key, *inputs)["params"]
        params = jax.tree_util.tree_map(np.asarray, nn.meta.unbox(params))
        return copy_own_layers(model, params)
    shapes = nn.meta.unbox(jax.eval_shape(model.init, key, *inputs)["params"])
    pretrained = truncate_params(backbone.params, model.n_layers)
    params = {"backbone": merge_pretrained(shapes["backbone"], pretrained)}
    if "heads" in shapes:
        hidden = json.loads(model.bert_config)["hidden_size"]
        below = {n: jnp.zeros((1, 8, hidden), jnp.float32) for _, n in model.own_layers}
        heads = jax.jit(functools.partial(model.init, method=MultiTaskModel.init_heads))(
            key, jnp.zeros((1, hidden), jnp.float32), below, inputs[1]
        )["params"]["heads"]
        params["heads"] = jax.tree_util.tree_map(np.asarray, nn.meta.unbox(heads))
    return copy_own_layers(model, params)


def copy_own_layers(model: MultiTaskModel, params: Params) -> Params:
    """``params`` with each task's own top layers set to copies of the backbone's.

    A task's own layers start as the layers they replace, so at step 0 every task reads the
    same features it would read from the shared encoder.
    """
    if not model.own_layers:
        return params
    layers = params["backbone"]["encoder"]["layer"]
    heads = dict(params["heads"])
    for task, n in model.own_layers:
        own = {
            f"layer_{i}": jax.tree_util.tree_map(np.array, layers[str(model.n_layers - n + i)])
            for i in range(n)
        }
        merged = merge_pretrained(heads[task]["own"], own, prefix=f"heads/{task}/own")
        heads[task] = {**heads[task], "own": merged}
    return {**params, "heads": heads}


def merge_pretrained(fresh: Params, pretrained: Params, prefix: str = "backbone") -> Params:
    """``pretrained`` in the structure of ``fresh``; raise on any missing, extra or resized leaf."""
    missing, extra, resized = tree_diff(fresh, pretrained)
    fresh_flat, pre_flat = flatten_dict(fresh), flatten_dict(pretrained)

    def name(path: ParamPath) -> str:
        return "/".join((prefix, *path))

    problems = []
    if missing:
        problems.append(f"missing {len(missing)} (first: {name(missing[0])})")
    if extra:
        problems.append(f"unexpected {len(extra)} (first: {name(extra[0])})")
    if resized:
        k = resized[0]
        problems.append(
            f"shape mismatch at {name(k)}: {np.shape(pre_flat[k])} vs {np.shape(fresh_flat[k])}"
        )
    if problems:
        raise UserError("pretrained weights do not fit the model: " + "; ".join(problems))
    merged = {k: np.asarray(pre_flat[k], dtype=fresh_flat[k].dtype) for k in fresh_flat}
    return unflatten_dict(merged)


def param_counts(params: Params) -> dict[str, int]:
    """Parameter count per top-level group and per head (``backbone``, ``heads/<task>``)."""
    counts = {"backbone": _count(params["backbone"])}
    for name, head in params.get("heads", {}).items():
        counts[f"heads/{name}"] = _count(head)
    counts["total"] = _count(params)
    return counts


def _count(tree: Any) -> int:
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))
