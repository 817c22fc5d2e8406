"""Frozen dataclass configs: one per concern, JSON/TOML round trip, validated with key names.

A run's whole behaviour is a :class:`Config`. Variants are made with
``dataclasses.replace`` (or :func:`mtl_jax.config_io.apply_overrides` for ``--set a.b=value``
strings; :mod:`mtl_jax.config_io` also reads config files), and
the config is saved next to every checkpoint so a restore knows what built the params.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from mtl_jax.errors import UserError
from mtl_jax.from_plain import build, to_plain, to_toml

POOLINGS = ("mean", "cls", "max")
DTYPES = ("float32", "bfloat16", "float16")
MIXINGS = ("proportional", "temperature", "round_robin")
DISTRIBUTED_MODES = ("auto", "on", "off")
FREEZE_FORMS = "none | all | backbone | head:<task> | top:<k> | gradual"
CLASS_WEIGHTINGS = ("none", "balanced")
LR_SCHEDULES = ("constant", "linear", "cosine")
TASK_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


@dataclasses.dataclass(frozen=True)
class FreezeSpec:
    """A parsed ``train.freeze`` string, the form every freezing decision reads.

    The config file keeps the string (``"top:2"``) because that is what a person writes;
    code reads :attr:`TrainConfig.freeze_spec` so the grammar is parsed in one place.
    ``kind`` is one of none, all, backbone, head, top, gradual; ``head`` is set for
    ``head:<task>`` and ``top_k`` for ``top:<k>``.
    """

    kind: str
    head: str | None = None
    top_k: int | None = None

    @classmethod
    def parse(cls, text: str) -> FreezeSpec:
        """The spec a ``train.freeze`` string names; UserError (naming the key) if none."""
        kind, sep, arg = text.partition(":")
        if not sep and kind in ("none", "all", "backbone", "gradual"):
            return cls(kind)
        if sep and kind == "head" and TASK_NAME_PATTERN.match(arg):
            return cls(kind, head=arg)
        if sep and kind == "top":
            if not re.fullmatch(r"[0-9]+", arg):
                wanted = "a whole number of layers >= 0, e.g. top:2"
                raise UserError(f"config key 'train.freeze': '{text}' needs {wanted}")
            return cls(kind, top_k=int(arg))
        raise UserError(f"config key 'train.freeze': expected {FREEZE_FORMS}, got {text!r}")

    @property
    def trains_backbone(self) -> bool:
        """Whether any backbone group can ever train (``top:0`` is ``backbone``)."""
        return self.kind not in ("all", "backbone") and self.top_k != 0

    def __str__(self) -> str:
        if self.kind == "head":
            return f"head:{self.head}"
        return f"top:{self.top_k}" if self.kind == "top" else self.kind


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The backbone and how a sentence vector is read from it."""

    backbone: str = "minilm"  # "minilm", "tiny", or a local Hugging Face BERT directory
    layer: int = -2  # hidden_states index: 0 = embeddings, -1 = last layer, -2 = the one below
    pooling: str = "mean"  # mean | cls | max
    normalize: bool = False  # L2-normalise the pooled embedding
    max_length: int = 128  # tokens per sentence, [CLS] and [SEP] included
    dtype: str = "float32"  # compute dtype; params and optimiser state stay float32
    backbone_dropout: bool = True  # dropout inside BERT while training (off = deterministic)
    remat: bool = True  # checkpoint encoder layers: ~30 % less training memory (mtl_jax.remat)
    remat_min_length: int = 64  # only batches padded to >= this many tokens recompute

    def validate(self) -> None:
        _check_fields(
            self,
            "model",
            [
                ("pooling", self.pooling in POOLINGS, f"one of {POOLINGS}"),
                ("dtype", self.dtype in DTYPES, f"one of {DTYPES}"),
                ("max_length", self.max_length >= 2, "an integer >= 2"),
                ("remat_min_length", self.remat_min_length >= 1, "an integer >= 1"),
                ("backbone", bool(self.backbone), '"minilm", "tiny" or a directory'),
            ],
        )


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """One classification task: its data, its labels and its head."""

    name: str
    labels: tuple[str, ...] = ()  # empty: inferred (sorted) from the training file
    train_file: str = ""
    dev_file: str = ""
    text_column: str = "text"
    label_column: str = ""  # empty: the task's name
    context: int = 0  # neighbouring rows per side read with each row (mtl_jax.data.context)
    source_column: str = ""  # the column naming each row's source text; empty: the file is one
    loss_weight: float = 1.0
    class_weighting: str = "none"  # none | balanced: n / (K * n_c) from the training labels
    class_weights: tuple[float, ...] = ()  # per label, in label order; empty: all 1
    label_smoothing: float = 0.0  # train on targets with this share spread over all labels
    hidden: tuple[int, ...] = (128,)  # widths of the head's hidden blocks
    dropout: float = 0.0  # dropout after each hidden block of the head
    own_layers: int = 0  # the encoder's top layers this task reads through its own copy

    @property
    def label_key(self) -> str:
        return self.label_column or self.name

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def validate(self) -> None:
        name_ok = bool(TASK_NAME_PATTERN.match(self.name))
        _check(name_ok, "tasks.name", "a name of letters, digits, '_' or '-'", self.name)
        weights, labels = self.class_weights, self.labels
        _check_fields(
            self,
            f"tasks.{self.name}",
            [
                ("loss_weight", self.loss_weight >= 0, "a number >= 0"),
                ("context", self.context >= 0, "a number of neighbouring rows >= 0"),
                (
                    "source_column",
                    self.source_column not in (self.text_column, self.label_key),
                    "a column other than the text's and the label's",
                ),
                (
                    "class_weighting",
                    self.class_weighting in CLASS_WEIGHTINGS,
                    f"one of {CLASS_WEIGHTINGS}",
                ),
                ("class_weights", all(w >= 0 for w in weights), "numbers >= 0"),
                ("class_weights", not weights or max(weights) > 0, "at least one weight > 0"),
                (
                    "class_weights",
                    not (weights and labels) or len(weights) == len(labels),
                    f"one weight per label ({len(labels)}: {list(labels)})",
                ),
                ("dropout", 0 <= self.dropout < 1, "a number in [0, 1)"),
                ("own_layers", self.own_layers >= 0, "a number of top layers >= 0"),
                ("label_smoothing", 0 <= self.label_smoothing < 1, "a number in [0, 1)"),
                ("hidden", all(h > 0 for h in self.hidden), "positive widths"),
                ("labels", len(set(labels)) == len(labels), "distinct names"),
                ("labels", len(labels) != 1, "at least two labels (or none, to infer them)"),
            ],
        )
        blocks = f"at least one hidden block (tasks.{self.name}.hidden = [width, ...])"
        _check_applies(
            self,
            f"tasks.{self.name}",
            [
                ("source_column", self.context > 0, "context > 0"),
                ("dropout", bool(self.hidden), blocks),  # it follows each hidden block
            ],
        )


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """How rows become batches."""

    length_buckets: tuple[int, ...] = (16, 32, 64, 128)  # padded lengths; capped at max_length
    group_by_length: bool = True  # batch rows of similar length (less padding)
    group_window: int = 64  # batches per length-sorting window when grouping
    mixing: str = "proportional"  # proportional | temperature | round_robin
    mixing_temperature: float = 2.0  # for "temperature": weights n ** (1 / T)
    eval_batch_size: int = 64
    synthetic_train_rows: int = 0  # > 0: train on built-in synthetic rows, not task files
    synthetic_dev_rows: int = 0  # dev rows of the built-in synthetic data
    skip_empty: bool = False  # training files: drop (and count) rows with empty text

    def validate(self) -> None:
        buckets = self.length_buckets
        positive = len(buckets) > 0 and all(b > 0 for b in buckets)
        increasing = list(buckets) == sorted(set(buckets))
        _check_fields(
            self,
            "data",
            [
                ("synthetic_train_rows", self.synthetic_train_rows >= 0, "an integer >= 0"),
                ("synthetic_dev_rows", self.synthetic_dev_rows >= 0, "an integer >= 0"),
                ("mixing", self.mixing in MIXINGS, f"one of {MIXINGS}"),
                ("length_buckets", positive, "a non-empty list of positive lengths"),
                ("length_buckets", increasing, "strictly increasing lengths"),
                ("group_window", self.group_window >= 1, "an integer >= 1"),
                ("mixing_temperature", self.mixing_temperature > 0, "a number > 0"),
                ("eval_batch_size", self.eval_batch_size > 0, "an integer > 0"),
            ],
        )
        synthetic = self.synthetic_train_rows > 0
        _check_applies(
            self,
            "data",
            [
                ("mixing_temperature", self.mixing == "temperature", 'data.mixing = "temperature"'),
                ("group_window", self.group_by_length, "data.group_by_length = true"),
                ("synthetic_dev_rows", synthetic, "data.synthetic_train_rows > 0"),
                ("skip_empty", not synthetic, "data.synthetic_train_rows = 0 (task files)"),
            ],
        )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation, freezing and the fit loop."""

    freeze: str = "backbone"  # none | all | backbone | head:<task> | top:<k> | gradual
    unfreeze_every: int = 1  # gradual: one more layer from the top every N units
    unfreeze_unit: str = "epochs"  # gradual: "epochs" or "steps"
    epochs: int = 3
    max_steps: int = 0  # > 0 stops after that many steps
    batch_size: int = 32
    learning_rate: float = 2e-5  # backbone
    head_learning_rate: float = 1e-3
    layer_lr_decay: float = 1.0  # backbone layer i from the top gets lr * decay**i
    weight_decay: float = 0.01
    warmup_steps: int = 0
    lr_schedule: str = "linear"  # constant | linear | cosine (decay after warm-up)
    grad_clip: float = 1.0  # global norm over trainable params; 0 = off
    token_cutoff: float = 0.0  # training rows: hide this share of their tokens (augmentation)
    ema_decay: float = 0.0  # > 0: evaluate, select and export an EMA of the params (0.999)
    rdrop_alpha: float = 0.0  # > 0: R-Drop, two dropout passes kept consistent (2x a step)
    adversarial_epsilon: float = 0.0  # > 0: adversarial word embeddings (FGM; 2x a step)
    uncertainty_weighting: bool = False  # learn task weights (Kendall et al. 2018)
    eval_every: int = 500  # steps; also at the end of each epoch
    checkpoint_every: int = 500  # steps; also at the end
    keep_checkpoints: int = 3
    best_metric: str = ""  # e.g. "sentiment/accuracy"; empty: mean macro-F1 over tasks
    early_stopping_patience: int = 0  # evaluations without improvement; 0 = off
    log_every: int = 50
    skip_nonfinite: bool = False  # skip (and count) a batch with a non-finite loss or grad
    cache_features: bool = True  # frozen deterministic backbone: embed once, train heads
    seed: int = 0  # data order, dropout and (unless init_seed) the initial weights
    init_seed: int = -1  # the initial weights; -1: train.seed (runs to average share one)

    @property
    def freeze_spec(self) -> FreezeSpec:
        """``freeze`` parsed; raises :class:`UserError` naming ``train.freeze`` if malformed."""
        return FreezeSpec.parse(self.freeze)

    def validate(self) -> None:
        spec = self.freeze_spec
        checks = [
            ("unfreeze_unit", self.unfreeze_unit in ("epochs", "steps"), '"epochs" or "steps"'),
            ("lr_schedule", self.lr_schedule in LR_SCHEDULES, " | ".join(LR_SCHEDULES)),
        ]
        positive = ("batch_size", "unfreeze_every", "eval_every", "checkpoint_every", "log_every")
        checks += [(name, getattr(self, name) > 0, "an integer > 0") for name in positive]
        non_negative = ("epochs", "max_steps", "warmup_steps", "early_stopping_patience")
        checks += [(name, getattr(self, name) >= 0, "an integer >= 0") for name in non_negative]
        checks += [
            ("epochs", self.epochs > 0 or self.max_steps > 0, "> 0 (or set train.max_steps)"),
            ("keep_checkpoints", self.keep_checkpoints >= 1, ">= 1"),
        ]
        rates = ("learning_rate", "head_learning_rate", "weight_decay", "grad_clip")
        checks += [(name, getattr(self, name) >= 0, "a number >= 0") for name in rates]
        checks += [("layer_lr_decay", 0 < self.layer_lr_decay <= 1, "in (0, 1]")]
        checks += [("ema_decay", 0 <= self.ema_decay < 1, "in [0, 1) (0 = off)")]
        checks += [("rdrop_alpha", self.rdrop_alpha >= 0, "a number >= 0 (0 = off)")]
        checks += [
            ("adversarial_epsilon", self.adversarial_epsilon >= 0, "a number >= 0 (0 = off)")
        ]
        checks += [("token_cutoff", 0 <= self.token_cutoff < 1, "in [0, 1) (0 = off)")]
        checks += [("init_seed", self.init_seed >= -1, "an integer >= 0, or -1 (train.seed)")]
        _check_fields(self, "train", checks)
        gradual = 'train.freeze = "gradual"'
        some_layer = "a train.freeze that trains backbone layers (not all, backbone or top:0)"
        _check_applies(
            self,
            "train",
            [
                ("unfreeze_every", spec.kind == "gradual", gradual),
                ("unfreeze_unit", spec.kind == "gradual", gradual),
                ("layer_lr_decay", spec.trains_backbone, some_layer),
                ("adversarial_epsilon", spec.trains_backbone, some_layer),
            ],
        )


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """How a run spreads over devices and hosts (every local device is always used)."""

    fsdp: bool = False  # shard params and optimiser state over devices (else replicate)
    distributed: str = "auto"  # auto | on | off: call jax.distributed.initialize()

    def validate(self) -> None:
        _check(
            self.distributed in DISTRIBUTED_MODES,
            "parallel.distributed",
            " | ".join(DISTRIBUTED_MODES),
            self.distributed,
        )


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run needs; saved as ``config.json`` in the run directory."""

    model: ModelConfig = ModelConfig()
    tasks: tuple[TaskConfig, ...] = ()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    parallel: ParallelConfig = ParallelConfig()

    def task(self, name: str) -> TaskConfig:
        for task in self.tasks:
            if task.name == name:
                return task
        raise UserError(f"unknown task '{name}': this config has tasks {self.task_names}")

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    def validate(self) -> Config:
        """Raise :class:`UserError` naming the first bad key; return self when all is well."""
        _check(len(self.tasks) > 0, "tasks", "at least one [[tasks]] entry", "[]")
        names = self.task_names
        _check(len(set(names)) == len(names), "tasks", "distinct task names", names)
        self.model.validate()
        self.data.validate()
        self.train.validate()
        self.parallel.validate()
        for task in self.tasks:
            task.validate()
        head = self.train.freeze_spec.head
        _check(head in (None, *names), "train.freeze", f"head:<one of {names}>", self.train.freeze)
        self._check_rdrop()
        self._check_task_files()
        return self

    def _check_rdrop(self) -> None:
        """R-Drop without any dropout would pay for two identical passes."""
        random = self.model.backbone_dropout or self.train.token_cutoff > 0
        if self.train.rdrop_alpha and not (random or any(t.dropout > 0 for t in self.tasks)):
            raise UserError(
                f"config key 'train.rdrop_alpha' = {_literal(self.train.rdrop_alpha)} would "
                "only double each step: R-Drop keeps two dropout passes consistent and this "
                "config draws no dropout; set model.backbone_dropout = true, a task's "
                "dropout > 0 or train.token_cutoff > 0, or train.rdrop_alpha back to 0.0"
            )

    def _check_task_files(self) -> None:
        """Synthetic training data reads no task file: a file given anyway is refused."""
        real = self.data.synthetic_train_rows == 0
        needs = "data.synthetic_train_rows = 0 (synthetic rows replace every task file)"
        for task in self.tasks:
            rules = [(name, real, needs) for name in ("train_file", "dev_file")]
            _check_applies(task, f"tasks.{task.name}", rules)

    def with_labels(self, labels: Mapping[str, Sequence[str]]) -> Config:
        """The same config with each task's label list filled in."""
        tasks = tuple(
            dataclasses.replace(t, labels=tuple(labels[t.name])) if t.name in labels else t
            for t in self.tasks
        )
        return dataclasses.replace(self, tasks=tasks)

    # -- serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return to_plain(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def to_toml(self) -> str:
        return to_toml(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> Config:
        return build(cls, data, source=source)


def default_tasks() -> tuple[TaskConfig, ...]:
    """The original design: a 5-way genre task with a deeper head, a binary sentiment task."""
    return (
        TaskConfig(
            name="genre",
            labels=("adventure", "humor", "mystery", "romance", "science_fiction"),
            label_column="genre",
            hidden=(256, 128),
            dropout=0.1,
        ),
        TaskConfig(
            name="sentiment",
            labels=("negative", "positive"),
            label_column="sentiment",
            hidden=(128,),
            dropout=0.0,
        ),
    )


# -- helpers ------------------------------------------------------------------------------


def _check(ok: bool, key: str, expected: str, got: Any) -> None:
    if not ok:
        raise UserError(f"config key '{key}': expected {expected}, got {got!r}")


def _check_fields(obj: Any, section: str, checks: Sequence[tuple[str, bool, str]]) -> None:
    """The first failed ``(field, ok, expected)`` raises, naming ``section.field`` and its value."""
    for name, ok, expected in checks:
        _check(ok, f"{section}.{name}", expected, getattr(obj, name))


def _check_applies(obj: Any, section: str, rules: Sequence[tuple[str, bool, str]]) -> None:
    """Refuse a non-default value that the rest of the config makes meaningless.

    Each rule is ``(field, applies, needs)``: when ``applies`` is false and the field is
    not at its default, the run would silently ignore it, so the message names the field,
    the setting it ``needs`` and the two ways out.
    """
    for name, applies, needs in rules:
        value, default = getattr(obj, name), getattr(type(obj), name)
        if not applies and value != default:
            key = f"{section}.{name}"
            raise UserError(
                f"config key '{key}' = {_literal(value)} would be ignored: it only applies "
                f"with {needs}; set {needs}, or {key} back to {_literal(default)}"
            )


def _literal(value: Any) -> str:
    """A value as written in a config file or ``--set`` (JSON and TOML agree on these)."""
    return json.dumps(to_plain(value))
