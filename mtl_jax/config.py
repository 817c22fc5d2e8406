"""Frozen dataclass configs: one per concern, JSON/TOML round trip, validated with key names.

A run's whole behaviour is a :class:`Config`. Variants are made with
``dataclasses.replace`` (or :func:`apply_overrides` for ``--set a.b=value`` strings), and
the config is saved next to every checkpoint so a restore knows what built the params.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mtl_jax.errors import UserError

POOLINGS = ("mean", "cls", "max")
DTYPES = ("float32", "bfloat16", "float16")
MIXINGS = ("proportional", "temperature", "round_robin")
DISTRIBUTED_MODES = ("auto", "on", "off")
FREEZE_PATTERN = re.compile(r"^(none|all|backbone|gradual|head:[A-Za-z_][\w-]*|top:\d+)$")
CLASS_WEIGHTINGS = ("none", "balanced")
TASK_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


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
    remat: bool = False  # recompute encoder layers in the backward pass to save memory

    def validate(self) -> None:
        _check(self.pooling in POOLINGS, "model.pooling", f"one of {POOLINGS}", self.pooling)
        _check(self.dtype in DTYPES, "model.dtype", f"one of {DTYPES}", self.dtype)
        _check(self.max_length >= 2, "model.max_length", "an integer >= 2", self.max_length)
        _check(bool(self.backbone), "model.backbone", '"minilm", "tiny" or a directory', "")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """One classification task: its data, its labels and its head."""

    name: str
    labels: tuple[str, ...] = ()  # empty: inferred (sorted) from the training file
    train_file: str = ""
    dev_file: str = ""
    text_column: str = "text"
    label_column: str = ""  # empty: the task's name
    loss_weight: float = 1.0
    class_weighting: str = "none"  # none | balanced: n / (K * n_c) from the training labels
    class_weights: tuple[float, ...] = ()  # per label, in label order; empty: all 1
    hidden: tuple[int, ...] = (128,)  # widths of the head's hidden blocks
    dropout: float = 0.0  # dropout after each hidden block of the head

    @property
    def label_key(self) -> str:
        return self.label_column or self.name

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def validate(self) -> None:
        key = f"tasks.{self.name}"
        _check(
            bool(TASK_NAME_PATTERN.match(self.name)),
            "tasks.name",
            "a name of letters, digits, '_' or '-'",
            self.name,
        )
        _check(self.loss_weight >= 0, f"{key}.loss_weight", "a number >= 0", self.loss_weight)
        _check(
            self.class_weighting in CLASS_WEIGHTINGS,
            f"{key}.class_weighting",
            f"one of {CLASS_WEIGHTINGS}",
            self.class_weighting,
        )
        _check(
            all(w >= 0 for w in self.class_weights),
            f"{key}.class_weights",
            "numbers >= 0",
            self.class_weights,
        )
        _check(
            not self.class_weights or any(w > 0 for w in self.class_weights),
            f"{key}.class_weights",
            "at least one weight > 0",
            self.class_weights,
        )
        _check(
            not (self.class_weights and self.labels) or len(self.class_weights) == len(self.labels),
            f"{key}.class_weights",
            f"one weight per label ({len(self.labels)}: {list(self.labels)})",
            self.class_weights,
        )
        _check(0 <= self.dropout < 1, f"{key}.dropout", "a number in [0, 1)", self.dropout)
        _check(all(h > 0 for h in self.hidden), f"{key}.hidden", "positive widths", self.hidden)
        _check(
            len(set(self.labels)) == len(self.labels),
            f"{key}.labels",
            "distinct names",
            self.labels,
        )
        _check(
            len(self.labels) != 1,
            f"{key}.labels",
            "at least two labels (or none, to infer them)",
            self.labels,
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

    def validate(self) -> None:
        _check(
            self.synthetic_train_rows >= 0,
            "data.synthetic_train_rows",
            "an integer >= 0",
            self.synthetic_train_rows,
        )
        _check(
            self.synthetic_dev_rows >= 0,
            "data.synthetic_dev_rows",
            "an integer >= 0",
            self.synthetic_dev_rows,
        )
        _check(self.mixing in MIXINGS, "data.mixing", f"one of {MIXINGS}", self.mixing)
        _check(
            len(self.length_buckets) > 0 and all(b > 0 for b in self.length_buckets),
            "data.length_buckets",
            "a non-empty list of positive lengths",
            self.length_buckets,
        )
        _check(
            list(self.length_buckets) == sorted(set(self.length_buckets)),
            "data.length_buckets",
            "strictly increasing lengths",
            self.length_buckets,
        )
        _check(self.group_window >= 1, "data.group_window", "an integer >= 1", self.group_window)
        _check(
            self.mixing_temperature > 0,
            "data.mixing_temperature",
            "a number > 0",
            self.mixing_temperature,
        )
        _check(
            self.eval_batch_size > 0, "data.eval_batch_size", "an integer > 0", self.eval_batch_size
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
    uncertainty_weighting: bool = False  # learn task weights (Kendall et al. 2018)
    eval_every: int = 500  # steps; also at the end of each epoch
    checkpoint_every: int = 500  # steps; also at the end
    keep_checkpoints: int = 3
    best_metric: str = ""  # e.g. "sentiment/accuracy"; empty: mean macro-F1 over tasks
    early_stopping_patience: int = 0  # evaluations without improvement; 0 = off
    log_every: int = 50
    skip_nonfinite: bool = False  # skip (and count) a batch with a non-finite loss or grad
    cache_features: bool = True  # frozen deterministic backbone: embed once, train heads
    seed: int = 0

    def validate(self) -> None:
        _check(
            bool(FREEZE_PATTERN.match(self.freeze)),
            "train.freeze",
            "none | all | backbone | head:<task> | top:<k> | gradual",
            self.freeze,
        )
        _check(
            self.unfreeze_unit in ("epochs", "steps"),
            "train.unfreeze_unit",
            '"epochs" or "steps"',
            self.unfreeze_unit,
        )
        _check(
            self.lr_schedule in ("constant", "linear", "cosine"),
            "train.lr_schedule",
            "constant | linear | cosine",
            self.lr_schedule,
        )
        positive = ("batch_size", "unfreeze_every", "eval_every", "checkpoint_every", "log_every")
        for name in positive:
            value = getattr(self, name)
            _check(value > 0, f"train.{name}", "an integer > 0", value)
        non_negative = ("epochs", "max_steps", "warmup_steps", "early_stopping_patience")
        for name in non_negative:
            value = getattr(self, name)
            _check(value >= 0, f"train.{name}", "an integer >= 0", value)
        _check(
            self.epochs > 0 or self.max_steps > 0,
            "train.epochs",
            "> 0 (or set train.max_steps)",
            self.epochs,
        )
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", ">= 1", self.keep_checkpoints)
        for name in ("learning_rate", "head_learning_rate", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            _check(value >= 0, f"train.{name}", "a number >= 0", value)
        _check(
            0 < self.layer_lr_decay <= 1, "train.layer_lr_decay", "in (0, 1]", self.layer_lr_decay
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
        if self.train.freeze.startswith("head:"):
            head = self.train.freeze.split(":", 1)[1]
            _check(head in names, "train.freeze", f"head:<one of {names}>", self.train.freeze)
        return self

    def with_labels(self, labels: Mapping[str, Sequence[str]]) -> Config:
        """The same config with each task's label list filled in."""
        tasks = tuple(
            dataclasses.replace(t, labels=tuple(labels[t.name])) if t.name in labels else t
            for t in self.tasks
        )
        return dataclasses.replace(self, tasks=tasks)

    # -- serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def to_toml(self) -> str:
        return _dict_to_toml(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> Config:
        return _build(cls, data, prefix="", source=source)


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


def load_config(path: str | Path) -> Config:
    """Read a ``.toml`` or ``.json`` config file; errors name the file and the key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read config file ({exc})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise UserError(f"{path}: not valid {kind}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config must be a table of sections, got {type(data).__name__}")
    return Config.from_dict(data, source=str(path))


def apply_overrides(config: Config, overrides: Sequence[str]) -> Config:
    """Apply ``--set dotted.key=value`` strings; a task is addressed by name (tasks.genre.x)."""
    data = config.to_dict()
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected dotted.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        value = _parse_value(raw.strip())
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):  # the tasks list, addressed by task name
                match = [t for t in node if t.get("name") == part]
                if not match:
                    names = [t.get("name") for t in node]
                    raise UserError(f"--set {key}: no task named '{part}' (tasks: {names})")
                node = match[0]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                raise UserError(f"--set {key}: unknown key '{'.'.join(parts[: i + 1])}'")
        if not isinstance(node, dict) or parts[-1] not in node:
            raise UserError(f"--set {key}: unknown key '{key}'")
        node[parts[-1]] = value
    return Config.from_dict(data, source="--set")


# -- helpers ------------------------------------------------------------------------------


def _check(ok: bool, key: str, expected: str, got: Any) -> None:
    if not ok:
        raise UserError(f"config key '{key}': expected {expected}, got {got!r}")


def _parse_value(raw: str) -> Any:
    """A --set value: JSON/TOML literal when it parses, else the bare string."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        pass
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _build(cls: type, data: Mapping[str, Any], prefix: str, source: str) -> Any:
    """Build dataclass ``cls`` from ``data``, naming the exact key on any mismatch."""
    if not isinstance(data, Mapping):
        raise UserError(f"{source}: '{prefix.rstrip('.') or 'config'}' must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(
            f"{source}: unknown config key '{prefix}{unknown[0]}' "
            f"(known keys here: {', '.join(fields)})"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if cls is Config and name == "tasks":
            if not isinstance(value, list):
                raise UserError(f"{source}: 'tasks' must be a list of [[tasks]] tables")
            tasks = []
            for i, item in enumerate(value):
                label = item.get("name", i) if isinstance(item, Mapping) else i
                tasks.append(_build(TaskConfig, item, f"tasks.{label}.", source))
            kwargs[name] = tuple(tasks)
        elif dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], value, f"{key}.", source)
        else:
            kwargs[name] = _coerce(value, hints[name], key, source)
    missing = [n for n, f in fields.items() if n not in kwargs and _is_required(f)]
    if missing:
        raise UserError(f"{source}: missing config key '{prefix}{missing[0]}'")
    return cls(**kwargs)


def _is_required(field: dataclasses.Field) -> bool:
    no_default = field.default is dataclasses.MISSING
    return no_default and field.default_factory is dataclasses.MISSING


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(hint)

    def fail() -> typing.NoReturn:
        raise UserError(f"{source}: config key '{key}' expects {_type_name(hint)}, got {value!r}")

    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            fail()
        (item_type, _) = typing.get_args(hint)
        return tuple(_coerce(v, item_type, key, source) for v in value)
    if origin in (typing.Union, types.UnionType):
        fail()
    if hint is bool:
        if not isinstance(value, bool):
            fail()
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail()
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail()
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            fail()
        return value
    return value


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, str(hint)
    )


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _dict_to_toml(data: Mapping[str, Any]) -> str:
    """Our configs are two levels deep: [section] tables and the [[tasks]] array."""
    lines: list[str] = []
    for section, body in data.items():
        if section == "tasks":
            continue
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in body.items()]
        lines.append("")
    for task in data.get("tasks", []):
        lines.append("[[tasks]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in task.items()]
        lines.append("")
    return "\n".join(lines)
