"""A trained run as a directory any Hugging Face or sentence-transformers user can load.

``export_run(RUN, DIR)`` writes, from the run's ``latest`` or ``best`` checkpoint:

- a PyTorch-named BERT (``config.json``, ``model.safetensors``, tokenizer files), cut to the
  layers the run pooled: ``BertModel`` loads it with nothing missing, unexpected or resized,
  and its ``last_hidden_state`` is the run's pooled layer;
- the sentence-transformers pipeline over it (``modules.json``, ``sentence_bert_config.json``,
  ``1_Pooling/config.json``, ``2_Normalize`` when the run normalises), so that
  ``SentenceTransformer(DIR).encode`` returns the run's embeddings;
- the task heads (``heads.safetensors`` in PyTorch layout, ``heads.json`` with labels and
  layer layout), ``mtl_jax.json`` (how mtl_jax reads the directory back) and a model card.

Everything is written into a temporary directory beside the output and renamed into place,
so an interrupted or failed export never leaves a half-written directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from mtl_jax.checkpoint import check_which
from mtl_jax.data.context import context_key
from mtl_jax.encoder import (
    EXPORT_INFO_FILE,
    embedding_defaults,
    load_backbone,
    truncated_bert_config,
)
from mtl_jax.errors import UserError
from mtl_jax.heads import TaskHeads
from mtl_jax.inference import Trained, load_trained
from mtl_jax.model_card import model_card
from mtl_jax.safetensors_bert import pytorch_name
from mtl_jax.trees import Params

HEADS_WEIGHTS = "heads.safetensors"
HEADS_JSON = "heads.json"
HEAD_LAYER_NORM_EPS = 1e-5  # mtl_jax.heads.MLPHead
# sentence-transformers pooling modes per mtl_jax pooling (1_Pooling/config.json keys)
ST_POOLING = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token",
              "max": "pooling_mode_max_tokens"}  # fmt: skip
ST_POOLING_KEYS = (
    "pooling_mode_cls_token",
    "pooling_mode_mean_tokens",
    "pooling_mode_max_tokens",
    "pooling_mode_mean_sqrt_len_tokens",
)


@dataclasses.dataclass(frozen=True)
class Exported:
    """Where an export went and what it holds."""

    output: Path
    step: int
    which: str
    num_layers: int  # encoder layers in the exported BERT (the run's pooled layer)
    files: tuple[str, ...]  # relative paths, sorted


def export_run(
    workdir: str | Path, output: str | Path, which: str = "latest", force: bool = False
) -> Exported:
    """Export a run's checkpoint as a Hugging Face / sentence-transformers directory.

    Args:
      workdir: the run directory (``mtl-jax train --workdir``).
      output: the directory to create; it must not exist or be empty, unless ``force``.
      which: ``latest``, ``best`` or ``average`` checkpoint, as ``mtl-jax eval --which``.
      force: replace an existing non-empty ``output``.

    Returns:
      What was written, once it is complete under ``output``.

    Raises:
      UserError: an unknown ``which``, a directory that is not a run, an output that exists
        (and is not empty, without ``force``) or cannot be written.
    """
    check_which(which)
    workdir, output = Path(workdir), Path(output)
    _check_output(output, workdir, force)
    trained = load_trained(str(workdir), which)
    with _staged(output) as staging:
        files = write_export(trained, staging, workdir=workdir, which=which)
    n_layers = trained.model.n_layers
    return Exported(output, trained.step, which, n_layers, files)


def write_export(trained: Trained, directory: Path, workdir: Path, which: str) -> tuple[str, ...]:
    """Write every export file of ``trained`` into the (empty) ``directory``."""
    config = trained.config
    n_layers = trained.model.n_layers
    bert_config = truncated_bert_config(trained.model.bert_config, n_layers)
    bert_config.architectures = ["BertModel"]
    pooler, pooler_source = backbone_pooler(config.model.backbone, bert_config)
    bert_config.save_pretrained(str(directory))
    backbone = {**trained.params["backbone"], "pooler": pooler}
    _save_safetensors(directory / "model.safetensors", bert_state_dict(backbone))
    trained.tokenizer.save_pretrained(str(directory))
    _write_sentence_transformers(directory, config, bert_config)
    _save_safetensors(directory / HEADS_WEIGHTS, heads_state_dict(trained.params["heads"]))
    heads = heads_layout(config, int(bert_config.hidden_size), n_layers)
    _write_json(directory / HEADS_JSON, heads)
    full_layers = json.loads(trained.model.bert_config)["num_hidden_layers"]
    info = {
        "format": "mtl_jax-export",
        "version": 1,
        "embedding": {
            "layer": -1,
            "pooling": config.model.pooling,
            "normalize": config.model.normalize,
            "max_length": config.model.max_length,
        },
        "run": {
            "workdir": str(workdir.absolute()),
            "checkpoint": which,
            "step": trained.step,
            **({"averaged_steps": list(trained.averaged_steps)} if trained.averaged_steps else {}),
            "weights": trained.weights,
            "backbone": config.model.backbone,
            "layer": config.model.layer,
            "backbone_layers": full_layers,
            "exported_layers": n_layers,
        },
        "pooler": pooler_source,
    }
    _write_json(directory / EXPORT_INFO_FILE, info)
    card = model_card(config, info, heads, workdir)
    (directory / "README.md").write_text(card, encoding="utf-8")
    return tuple(sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()))


# -- tensors in PyTorch names and layouts --------------------------------------------------------


def bert_state_dict(params: Params) -> dict[str, np.ndarray]:
    """``FlaxBertModule`` params under ``BertModel``'s PyTorch names and layouts.

    The inverse of :func:`mtl_jax.safetensors_bert.flax_param_path`: Dense kernels are
    transposed to PyTorch's ``[out, in]``; LayerNorm ``scale`` and ``embedding`` tables
    become ``weight``.
    """
    return {
        pytorch_name(path): _pytorch_layout(path, value)
        for path, value in flatten_dict(params).items()
    }


def heads_state_dict(heads: Params) -> dict[str, np.ndarray]:
    """Head params as ``<task>.<layer>.weight|bias``, PyTorch ``nn.Linear`` layout."""
    return {
        pytorch_name(path): _pytorch_layout(path, value)
        for path, value in flatten_dict(heads).items()
    }


def _pytorch_layout(path: tuple[str, ...], value: Any) -> np.ndarray:
    array = np.asarray(value, dtype=np.float32)
    return np.ascontiguousarray(array.T if path[-1] == "kernel" else array)


def heads_layout(config: Any, input_dim: int, n_layers: int) -> dict[str, Any]:
    """Per task: labels in logit order and the layer sequence that computes the logits.

    A task with its own top layers (``tasks.<task>.own_layers``) reads not the sentence
    embedding but ``hidden_states[n_layers - own_layers]`` of the exported BERT (``n_layers``
    layers), through its own ``BertLayer`` copies, then the run's pooling: its ``own`` entry
    says which states, which tensors and which pooling.
    """
    tasks = {}
    for task in config.tasks:
        layers: list[dict[str, Any]] = []
        width = input_dim
        for i, hidden in enumerate(task.hidden):
            layers.append(_linear(f"{task.name}.dense_{i}", width, hidden))
            layers.append(
                {
                    "type": "layer_norm",
                    "weight": f"{task.name}.norm_{i}.weight",
                    "bias": f"{task.name}.norm_{i}.bias",
                    "eps": HEAD_LAYER_NORM_EPS,
                }
            )
            layers.append({"type": "gelu", "approximate": "none"})
            if task.dropout > 0:
                layers.append({"type": "dropout", "p": float(task.dropout)})
            width = hidden
        layers.append(_linear(f"{task.name}.out", width, task.num_labels))
        context, source_column = context_key(task)
        tasks[task.name] = {
            "labels": list(task.labels),
            "hidden": list(task.hidden),
            "dropout": float(task.dropout),
            "layers": layers,
            # >0: the head was trained on each sentence joined (by a space) with this many
            # sentences before and after it from the same source_column text
            "context": context,
            "source_column": source_column,
            "own_layers": task.own_layers,
        }
        if task.own_layers:
            tasks[task.name]["own"] = {
                "hidden_state": n_layers - task.own_layers,
                "layers": [f"{task.name}.own.layer_{i}" for i in range(task.own_layers)],
                "layer_type": "transformers BertLayer of this directory's config.json",
                "pooling": config.model.pooling,
                "normalize": config.model.normalize,
            }
    return {
        "input": "the sentence embedding (SentenceTransformer(DIR).encode(texts)); of each "
        "sentence's window for a task with context > 0; for a task with own_layers > 0, its "
        "own pooled output of hidden_states[own.hidden_state] (see own)",
        "input_dim": input_dim,
        "weights": HEADS_WEIGHTS,
        "weight_layout": "PyTorch nn.Linear: weight [out_features, in_features]",
        "tasks": tasks,
    }


def _linear(name: str, fan_in: int, fan_out: int) -> dict[str, Any]:
    return {
        "type": "linear",
        "weight": f"{name}.weight",
        "bias": f"{name}.bias",
        "in_features": fan_in,
        "out_features": fan_out,
    }


def load_heads(directory: str | Path) -> tuple[dict[str, list[str]], TaskHeads, Params]:
    """An export's heads back in mtl_jax form: labels, the ``TaskHeads`` module and its params.

    ``heads.apply({"params": params}, embeddings)`` gives the run's logits; a task with its
    own top layers also needs ``below={n: hidden_states[own.hidden_state]}`` and ``mask``
    (:meth:`mtl_jax.model.MultiTaskModel.encode`).
    """
    from safetensors.numpy import load_file

    directory = Path(directory)
    layout = json.loads((directory / HEADS_JSON).read_text(encoding="utf-8"))
    tensors = load_file(str(directory / layout["weights"]))
    flat = {}
    for name, value in tensors.items():
        *stem, leaf = name.split(".")
        is_norm = stem[-1] == "LayerNorm" or stem[-1].startswith("norm_")
        if leaf == "weight":
            leaf, value = ("scale", value) if is_norm else ("kernel", value.T)
        flat[(*stem, leaf)] = np.ascontiguousarray(value)
    tasks = layout["tasks"]
    labels = {name: list(task["labels"]) for name, task in tasks.items()}
    specs = tuple(
        (name, tuple(task["hidden"]), len(task["labels"]), float(task["dropout"]))
        for name, task in tasks.items()
    )
    own = tuple((name, t["own_layers"]) for name, t in tasks.items() if t.get("own_layers"))
    embedding = embedding_defaults(str(directory))  # the run's pooling, from mtl_jax.json
    heads = TaskHeads(
        specs,
        own_layers=own,
        bert_config=(directory / "config.json").read_text(encoding="utf-8") if own else "",
        pooling=embedding.pooling,
        normalize=embedding.normalize,
    )
    return labels, heads, unflatten_dict(flat)


# -- the pooler ----------------------------------------------------------------------------------


def backbone_pooler(backbone: str, bert_config: Any) -> tuple[Params, str]:
    """``BertModel``'s pooler: the pretrained backbone's own, or a fresh one when it has none.

    mtl_jax never runs (or trains) the pooler, so the backbone's pretrained pooler is the
    right one to ship; ``BertModel`` expects one and would otherwise report it missing. A
    random backbone (``tiny``), or one that cannot be read any more, gets the
    initialisation ``BertModel`` itself would give (normal, ``initializer_range``; zero bias).
    """
    hidden = int(bert_config.hidden_size)
    if backbone != "tiny":
        with contextlib.suppress(UserError):
            pooler = (load_backbone(backbone).params or {}).get("pooler")
            if pooler and np.shape(pooler["dense"]["kernel"]) == (hidden, hidden):
                return pooler, f"copied from the backbone {backbone!r} (never trained)"
    rng = np.random.default_rng(0)
    kernel = rng.normal(0.0, bert_config.initializer_range, (hidden, hidden))
    pooler = {"dense": {"kernel": kernel.astype(np.float32), "bias": np.zeros(hidden, np.float32)}}
    return pooler, "freshly initialised (the backbone has none); unused by sentence embeddings"


# -- sentence-transformers files -----------------------------------------------------------------


def _write_sentence_transformers(directory: Path, config: Any, bert_config: Any) -> None:
    """``modules.json`` and module configs: Transformer -> Pooling (-> Normalize)."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]  # fmt: skip
    if config.model.normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize",
             "type": "sentence_transformers.models.Normalize"}
        )  # fmt: skip
        (directory / "2_Normalize").mkdir()
    _write_json(directory / "modules.json", modules)
    _write_json(
        directory / "sentence_bert_config.json",
        {"max_seq_length": config.model.max_length, "do_lower_case": False},
    )
    pooling = {"word_embedding_dimension": int(bert_config.hidden_size)}
    pooling.update({key: key == ST_POOLING[config.model.pooling] for key in ST_POOLING_KEYS})
    (directory / "1_Pooling").mkdir()
    _write_json(directory / "1_Pooling" / "config.json", pooling)


# -- files ---------------------------------------------------------------------------------------


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _save_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """transformers loads only safetensors files whose metadata names their framework."""
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def _check_output(output: Path, workdir: Path, force: bool) -> None:
    """Refuse an output that is a file, a non-empty directory (without ``force``) or the run."""
    if output.is_symlink() or (output.exists() and not output.is_dir()):
        raise UserError(f"--output {output}: exists and is not a directory")
    run = workdir.resolve()
    target = output.resolve()
    if target == run or target in run.parents:
        raise UserError(f"--output {output}: would replace the run directory {workdir}")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise UserError(f"--output {output}: exists and is not empty (pass --force to replace it)")


@contextlib.contextmanager
def _staged(output: Path) -> Iterator[Path]:
    """A temporary directory beside ``output``, renamed onto it when the body succeeds."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.export-", dir=output.parent))
    except OSError as exc:
        raise UserError(f"--output {output}: cannot write ({exc.strerror or exc})") from None
    try:
        try:
            yield staging
            _share(staging)
            _replace_dir(staging, output)
        except OSError as exc:
            raise UserError(
                f"--output {output}: cannot write ({exc.strerror or exc}); nothing was written"
            ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _share(directory: Path) -> None:
    """The permissions plain ``mkdir``/``open`` give (mkdtemp and safetensors use 0o700/600).

    The umask is read from a probe file: ``os.umask`` would change it for every thread.
    """
    probe = directory / ".umask-probe"
    probe.touch()
    file_mode = probe.stat().st_mode & 0o666
    probe.unlink()
    dir_mode = file_mode | ((file_mode & 0o444) >> 2)  # x wherever r
    for path in [directory, *directory.rglob("*")]:
        path.chmod(dir_mode if path.is_dir() else file_mode)


def _replace_dir(staging: Path, output: Path) -> None:
    """Put ``staging`` at ``output``; an old ``output`` is moved aside first, then removed."""
    if not output.exists():
        os.replace(staging, output)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
    os.replace(output, old / output.name)
    try:
        os.replace(staging, output)
    except OSError:
        os.replace(old / output.name, output)  # put the old directory back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
