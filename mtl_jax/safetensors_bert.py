"""PyTorch-named BERT ``model.safetensors`` read straight into ``FlaxBertModule`` params.

transformers' ``FlaxBertModel.from_pretrained`` with ``from_pt=True`` randomly initialises the
whole Flax model and copies every tensor through jax arrays before keeping it. This reads
each needed tensor once, with numpy, and renames it exactly as transformers' PyTorch->Flax
conversion does, so the params are bit-identical for a fraction of the memory and time.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from mtl_jax.errors import UserError
from mtl_jax.trees import ParamPath, Params

BASE_MODEL_PREFIX = "bert"  # BertForPreTraining & co. save the encoder under "bert."
# mtl_jax never runs the pooler (truncate_params drops it), and some exports leave it out.
OPTIONAL_SUBTREES = ("pooler",)


def load_bert_safetensors(path: Path, bert_config: Any) -> Params:
    """``FlaxBertModule`` params from a ``model.safetensors`` holding PyTorch BERT names.

    Tensors the module has no parameter for (``cls.*`` heads, ``embeddings.position_ids``)
    are never read. Half-precision weights are upcast to the module's float32.

    Args:
      path: the safetensors file; names may carry a leading ``bert.``.
      bert_config: the ``BertConfig`` of the same directory; it fixes every shape.

    Returns:
      The nested numpy params ``FlaxBertModel.from_pretrained`` (``from_pt=True``) gives,
      without the pooler when the file has none.

    Raises:
      UserError: the file is unreadable, or a parameter is missing or has the wrong shape.
    """
    from safetensors import SafetensorError, safe_open

    expected = bert_param_shapes(bert_config)
    loaded: dict[ParamPath, np.ndarray] = {}
    try:
        with safe_open(str(path), framework="numpy") as tensors:
            for name in tensors.keys():  # noqa: SIM118 (safe_open is not iterable)
                found = flax_param_path(name, expected)
                if found is None:
                    continue
                param, transpose = found
                want = expected[param]
                _check_shape(
                    path, name, param, tensors.get_slice(name).get_shape(), want, transpose
                )
                tensor = tensors.get_tensor(name)
                loaded[param] = np.ascontiguousarray(tensor.T if transpose else tensor, want.dtype)
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path}: not a readable safetensors file ({exc})") from None
    _check_complete(path, expected, loaded)
    return unflatten_dict(loaded)


def bert_param_shapes(bert_config: Any) -> dict[ParamPath, jax.ShapeDtypeStruct]:
    """Path, shape and dtype of every ``FlaxBertModel`` parameter, traced, not initialised."""
    from transformers.models.bert.modeling_flax_bert import FlaxBertModule

    module = FlaxBertModule(config=bert_config)  # with the pooler, as FlaxBertModel builds it
    ids = jnp.zeros((1, 1), jnp.int32)
    variables = jax.eval_shape(module.init, jax.random.key(0), ids, jnp.ones_like(ids))
    return flatten_dict(variables["params"])


def flax_param_path(name: str, params: Collection[ParamPath]) -> tuple[ParamPath, bool] | None:
    """Where transformers' PyTorch->Flax conversion puts tensor ``name``, and if it transposes.

    ``None`` for a tensor the model has no parameter for. Mirrors
    ``transformers.modeling_flax_pytorch_utils.rename_key_and_reshape_tensor`` for BERT.
    """
    key = tuple(name.split("."))
    if key[0] == BASE_MODEL_PREFIX:
        key = key[1:]
    stem, leaf = key[:-1], key[-1]
    transpose = False
    if leaf in ("weight", "gamma") and stem + ("scale",) in params:  # LayerNorm
        key = stem + ("scale",)
    elif leaf == "weight" and stem + ("embedding",) in params:
        key = stem + ("embedding",)
    elif leaf == "weight" and key not in params:  # Linear: PyTorch stores [out, in]
        key, transpose = stem + ("kernel",), True
    elif leaf == "beta":  # legacy LayerNorm bias
        key = stem + ("bias",)
    return (key, transpose) if key in params else None


def pytorch_name(param: ParamPath) -> str:
    """The usual PyTorch tensor name of a Flax BERT parameter (for error messages)."""
    leaf = "weight" if param[-1] in ("kernel", "scale", "embedding") else param[-1]
    return ".".join(param[:-1] + (leaf,))


def _check_shape(
    path: Path,
    name: str,
    param: ParamPath,
    stored: list[int],
    want: jax.ShapeDtypeStruct,
    transpose: bool,
) -> None:
    """Raise unless tensor ``name`` has the shape ``param`` needs (before transposing)."""
    needed = tuple(reversed(want.shape)) if transpose else tuple(want.shape)
    if tuple(stored) != needed:
        raise UserError(
            f"{path}: tensor {name!r} has shape {tuple(stored)} but parameter "
            f"{'/'.join(param)} needs {needed} for the config.json beside it"
        )


def _check_complete(
    path: Path,
    expected: dict[ParamPath, jax.ShapeDtypeStruct],
    loaded: dict[ParamPath, np.ndarray],
) -> None:
    """Raise on a missing parameter; an optional subtree may be absent, but only entirely."""
    present = {param[0] for param in loaded}
    missing = [
        param
        for param in expected
        if param not in loaded and not (param[0] in OPTIONAL_SUBTREES and param[0] not in present)
    ]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(
            f"{path}: no tensor for parameter {'/'.join(missing[0])}{more}; expected a tensor "
            f"named {pytorch_name(missing[0])!r} (optionally prefixed 'bert.')"
        )
