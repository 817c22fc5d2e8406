"""Dev scores of a weighted mean of trained models' params (weight averaging across runs).

Fine-tuned runs that start from the same pretrained weights and the same head
initialisation usually lie in one basin: the element-wise mean of their params (a
"model soup", Wortsman et al. 2022) can score better than any one of them. Runs of
different ``train.seed`` start from different heads unless they share
``train.init_seed``. This script
scores such means on dev files, for the model-quality study (docs/model_quality.md):

    .venv/bin/python scripts/weight_average.py runs/experiments/real \\
        runs/experiments/real-llrd0.8 runs/experiments/real-5ep

Each model is ``RUN_DIR[:which]`` (``latest``, ``best`` or ``average``, as ``mtl-jax eval
--which``; the EMA when the run kept one). ``--weights`` weighs them (default equal);
``--pretrained-weight a`` also mixes the packaged pretrained backbone in at weight ``a``
against the runs' mean backbone (WiSE-FT, Wortsman et al. 2022), the heads staying the
runs' mean. ``--ensemble`` instead scores the weighted mean of the models' class
probabilities (each model reading the dev rows as it was trained to): an ensemble,
roughly the ceiling for distilling these models into one. Prints one JSON line: the
models, weights and every task's dev scores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from mtl_jax.checkpoint import WHICH
from mtl_jax.encoder import Tokenized, load_backbone
from mtl_jax.errors import UserError
from mtl_jax.inference import Trained, dev_dataset, evaluate_files, load_trained, predict_tokenized
from mtl_jax.metrics import eval_counts, summarize
from mtl_jax.model import init_params
from mtl_jax.presets import DATA_DIR_ENV, data_folder_tasks
from mtl_jax.trees import first_difference, weighted_mean


def checked_weights(weights: Sequence[float], count: int) -> list[float]:
    """``weights`` when there is one per model, each >= 0 and not all 0; else UserError."""
    if len(weights) != count:
        raise UserError(f"--weights: {len(weights)} weights for {count} models")
    if min(weights) < 0 or sum(weights) <= 0:
        raise UserError(f"--weights: expected numbers >= 0, not all 0, got {list(weights)}")
    return list(weights)


def parse_spec(spec: str) -> tuple[str, str]:
    """``RUN_DIR[:which]`` as ``(directory, which)``; UserError for an unknown ``which``."""
    directory, sep, which = spec.rpartition(":")
    if not sep:
        return spec, "latest"
    if which not in WHICH:
        raise UserError(f"{spec}: expected RUN_DIR[:which] with which one of {WHICH}")
    return directory, which


def mean_of_models(specs: Sequence[str], weights: Sequence[float]) -> Trained:
    """The first model with its params replaced by the weighted mean of all ``specs``'.

    Models are restored one at a time, so memory holds the running sum and about one model
    whatever their number. Each must share the first one's tasks, labels and param shapes
    (else their mean is meaningless), or UserError names the odd one.
    """
    targets = [parse_spec(spec) for spec in specs]  # every spec checked before any restore
    first: list[Trained] = []  # the first model, without its params: its config and model

    def params_in_turn():
        for spec, (directory, which) in zip(specs, targets, strict=True):
            trained = load_trained(directory, which)
            if not first:
                first.append(dataclasses.replace(trained, params=None))
            elif [t.labels for t in trained.config.tasks] != [
                t.labels for t in first[0].config.tasks
            ]:
                raise UserError(f"{spec}: its tasks or labels differ from {specs[0]}'s")
            yield trained.params
            del trained

    def fits(params, shapes, index):
        detail = first_difference(shapes, params)
        if detail:
            raise UserError(f"{specs[index]}: its params differ from {specs[0]}'s ({detail})")

    params = weighted_mean(params_in_turn(), weights, check=fits)
    return dataclasses.replace(first[0], params=params)


def pretrained_backbone(trained: Trained) -> Any:
    """The backbone ``trained`` was fine-tuned from, as its params were first built."""
    source = trained.config.model.backbone
    params = init_params(trained.model, jax.random.key(0), load_backbone(source))
    return params["backbone"]


def average_scores(
    specs: Sequence[str],
    files: dict[str, str],
    weights: Sequence[float] | None = None,
    pretrained_weight: float = 0.0,
) -> dict[str, Any]:
    """The dev scores of the weighted mean of ``specs``' params on ``files`` ``{task: path}``."""
    if not 0 <= pretrained_weight < 1:
        raise UserError(
            f"--pretrained-weight: expected a number in [0, 1), got {pretrained_weight}"
        )
    weights = checked_weights(weights, len(specs)) if weights else [1.0] * len(specs)
    mean = mean_of_models(specs, weights)
    if pretrained_weight:
        backbone = weighted_mean(
            [mean.params["backbone"], pretrained_backbone(mean)],
            [1 - pretrained_weight, pretrained_weight],
        )
        mean = dataclasses.replace(mean, params={**mean.params, "backbone": backbone})
    scores = evaluate_files(mean, files)
    return {
        "models": list(specs),
        "weights": weights,
        "pretrained_weight": pretrained_weight,
        "scores": scores,
    }


class TaskProbs(NamedTuple):
    """One model's view of one task's dev rows."""

    labels: tuple[str, ...]  # the model's label order: the probabilities' columns
    lines: np.ndarray  # int [N], the rows' lines in the dev file
    gold: np.ndarray  # int [N], label ids
    probs: np.ndarray  # float [N, num_labels]


def dev_probabilities(spec: str, files: dict[str, str]) -> dict[str, TaskProbs]:
    """One model's class probabilities on ``files`` ``{task: path}``, for each of those
    tasks that it has (``{}`` when none)."""
    trained = load_trained(*parse_spec(spec))
    config, dataset = dev_dataset(trained, files)
    if not len(dataset):
        return {}
    tokenized = Tokenized(dataset.input_ids, dataset.token_type_ids, dataset.truncated)
    max_length = config.model.max_length
    probs = predict_tokenized(trained.model, trained.params, tokenized, max_length=max_length)
    out = {}
    for k, task in enumerate(config.tasks):
        rows = dataset.labels[:, k] >= 0
        if task.name in files and rows.any():
            gold = dataset.labels[rows, k]
            out[task.name] = TaskProbs(
                task.labels, dataset.lines[rows], gold, probs[task.name][rows]
            )
    return out


def _check_same_rows(spec: str, task: str, seen: TaskProbs, origin: str, got: TaskProbs) -> None:
    """UserError unless ``got`` scores the rows ``seen`` did with the same label order."""
    if got.labels != seen.labels:
        raise UserError(
            f"{spec}: its {task} labels {list(got.labels)} differ from {origin}'s "
            f"{list(seen.labels)}; an ensemble needs one label order"
        )
    if not (np.array_equal(got.lines, seen.lines) and np.array_equal(got.gold, seen.gold)):
        raise UserError(
            f"{spec}: its {task} dev rows differ from {origin}'s ({len(got.lines)} against "
            f"{len(seen.lines)} rows); score the models on the same file"
        )


def ensemble_scores(
    specs: Sequence[str], files: dict[str, str], weights: Sequence[float] | None = None
) -> dict[str, Any]:
    """Dev scores (accuracy, macro-F1, loss) of the weighted mean of ``specs``' class
    probabilities on ``files``.

    Each task is scored over the models that have it (a sentiment-only run joins the
    sentiment vote); they must agree on its labels and dev rows, or UserError names the
    odd one. A model of weight 0 is not restored. Models are restored one at a time.
    """
    weights = checked_weights(weights, len(specs)) if weights else [1.0] * len(specs)
    for spec in specs:  # every spec checked before any restore
        parse_spec(spec)
    first: dict[str, tuple[str, TaskProbs]] = {}  # task: (its first model, its rows)
    summed: dict[str, np.ndarray] = {}  # task: weighted sum of probabilities
    members: dict[str, list[tuple[str, float]]] = {}
    for spec, weight in zip(specs, weights, strict=True):
        if not weight:
            continue
        for task, got in dev_probabilities(spec, files).items():
            origin, seen = first.setdefault(task, (spec, got))
            _check_same_rows(spec, task, seen, origin, got)
            summed[task] = summed.get(task, 0.0) + weight * got.probs.astype(np.float64)
            members.setdefault(task, []).append((spec, weight))
    unscored = [task for task in files if task not in summed]
    if unscored:
        raise UserError(
            f"--data: no model of positive weight has task(s) {unscored}; drop them or add "
            "a model trained on them"
        )
    counts = {}
    for task, total in summed.items():
        mean = total / sum(weight for _, weight in members[task])
        # The log of the mean probabilities as logits: its softmax is the mean itself, so
        # the evaluation's own counts give the confusion and the cross-entropy.
        counts[task] = eval_counts(first[task][1].gold, np.log(np.maximum(mean, 1e-12)))
    return {
        "models": list(specs),
        "weights": weights,
        "ensemble": {task: [spec for spec, _ in pairs] for task, pairs in members.items()},
        "scores": summarize(counts),
    }


def _task_file(item: str) -> tuple[str, str]:
    task, sep, path = item.partition("=")
    if not (task and sep and path):
        raise UserError(f"--data {item!r}: expected TASK=FILE")
    return task, path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help=f"RUN_DIR[:which], which in {WHICH}")
    parser.add_argument("--weights", nargs="+", type=float, help="one per model (default equal)")
    parser.add_argument("--pretrained-weight", type=float, default=0.0)
    parser.add_argument(
        "--ensemble",
        action="store_true",
        help="score the mean of the models' class probabilities, not of their params",
    )
    parser.add_argument(
        "--data",
        action="append",
        help="TASK=FILE (default: the real data's dev files, ../shared/data or $MTL_JAX_DATA)",
    )
    args = parser.parse_args(argv)
    try:
        files = dict(_task_file(item) for item in args.data) if args.data else None
        if files is None:
            folder = Path(os.environ.get(DATA_DIR_ENV) or "../shared/data")
            files = {t.name: t.dev_file for t in data_folder_tasks(folder)}
        if args.ensemble and args.pretrained_weight:
            raise UserError("--pretrained-weight mixes params: it does not apply with --ensemble")
        if args.ensemble:
            result = ensemble_scores(args.models, files, args.weights)
        else:
            result = average_scores(args.models, files, args.weights, args.pretrained_weight)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
