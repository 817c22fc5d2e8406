"""The fit loop: step then hooks, with no hidden host<->device traffic."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from mtl_jax.config_io import apply_overrides
from mtl_jax.hooks import Hook, default_hooks
from mtl_jax.loop import train_loop
from mtl_jax.metrics_log import read_metrics
from mtl_jax.presets import preset
from mtl_jax.run_setup import run_keys, setup_run

from probes import traced_steps

SETS = [
    'model.backbone="tiny"',
    "model.max_length=16",
    'train.freeze="none"',
    "data.synthetic_train_rows=64",
    "data.synthetic_dev_rows=16",
    "train.epochs=2",
    "train.batch_size=16",
    "train.eval_every=4",
    "train.checkpoint_every=4",
    "train.log_every=2",
]


def _config(*extra: str):
    return apply_overrides(preset("demo"), [*SETS, *extra])


class _Recorder(Hook):
    """Records the steps it saw and stops the run at ``stop_at``."""

    def __init__(self, stop_at: int = 0):
        self.steps: list[int] = []
        self.finished: list[int] = []
        self.closed = False
        self.stop_at = stop_at

    def __call__(self, info):
        self.steps.append(info.step)
        return "recorder" if info.step == self.stop_at else None

    def finish(self, info):
        self.finished.append(info.step)

    def close(self):
        self.closed = True


def test_loop_makes_no_implicit_transfer(tmp_path):
    """Every host<->device copy in the loop and its hooks is an explicit one."""
    run = setup_run(_config(), tmp_path / "run")
    hooks = default_hooks(run, progress=False)
    with jax.transfer_guard("disallow"):
        result = train_loop(run, hooks, handle_signals=False)
    assert result.steps == run.n_steps == 8 and result.stopped == "done"
    events = read_metrics(tmp_path / "run")
    assert [e["step"] for e in events if e["split"] == "dev"] == [4, 8]
    assert [e["step"] for e in events if e["split"] == "train"] == [2, 4, 6, 8]


def test_a_hook_sees_every_step_and_can_stop_the_run(tmp_path):
    run = setup_run(_config(), tmp_path / "run")
    recorder = _Recorder(stop_at=3)
    result = train_loop(run, [*default_hooks(run, progress=False), recorder])
    assert recorder.steps == [1, 2, 3] and recorder.finished == [3] and recorder.closed
    assert result.stopped == "recorder" and result.steps == 3
    # The checkpoint hook's finish saved the step the run stopped at.
    assert run.checkpointer.latest_step() == 3
    # Hooks only read the state: the loop's final state is the last step's.
    assert int(result.state.step) == 3
    assert np.isfinite(
        float(jax.device_get(result.state.params["heads"]["genre"]["out"]["kernel"]).sum())
    )


def test_train_profile_traces_the_named_steps(tmp_path, capsys):
    """``mtl-jax train --profile 3:5`` leaves one trace of steps 3..5 in <workdir>/profile."""
    from mtl_jax import cli

    argv = ["train", "--preset", "demo", "--workdir", str(tmp_path / "run"), "--no-progress"]
    argv += [arg for s in SETS for arg in ("--set", s)] + ["--profile", "3:5"]
    assert cli.main(argv) == 0
    assert traced_steps(tmp_path / "run" / "profile") == [3, 4, 5]
    assert cli.main([*argv[:-1], "5:3"]) == 2
    assert "--profile '5:3'" in capsys.readouterr().err


def test_data_skip_empty_drops_empty_training_rows(tmp_path, tiny_backbone):
    """``data.skip_empty = true`` is the train-side fix the empty-text error names."""
    import pytest

    from mtl_jax.errors import UserError
    from mtl_jax.run_setup import load_run_data

    train = tmp_path / "train.tsv"
    train.write_text("text\tsentiment\ngood film\tpositive\n\tnegative\nbad film\tnegative\n")
    base = [
        'model.backbone="tiny"',
        "data.synthetic_train_rows=0",
        "data.synthetic_dev_rows=0",
        f'tasks.sentiment.train_file="{train}"',
    ]
    config = apply_overrides(preset("demo"), base)
    config = dataclasses.replace(config, tasks=(config.task("sentiment"),))
    with pytest.raises(UserError, match="data.skip_empty = true"):
        load_run_data(config, tiny_backbone.tokenizer)
    config = apply_overrides(config, ["data.skip_empty=true"])
    run_data = load_run_data(config, tiny_backbone.tokenizer)
    assert len(run_data.train) == 2
    assert run_data.config.task("sentiment").labels == ("negative", "positive")


def test_init_seed_shares_the_initial_weights_and_nothing_else(tmp_path):
    """Runs to average (model soups) start from one set of weights: ``train.init_seed``
    fixes it while ``train.seed`` still moves the data order and the dropout stream."""

    def first_batch(run):
        stream = run.batches()
        return next(iter(stream))["input_ids"]

    # The default (init_seed -1) keeps the keys every earlier run was made with.
    init_key, train_key = jax.random.split(jax.random.key(0))
    for got, want in zip(run_keys(_config()), (init_key, train_key), strict=True):
        np.testing.assert_array_equal(jax.random.key_data(got), jax.random.key_data(want))
    base = setup_run(_config(), tmp_path / "a")
    other = setup_run(_config("train.seed=1"), tmp_path / "b")
    shared = setup_run(_config("train.seed=1", "train.init_seed=0"), tmp_path / "c")
    same = jax.tree.map(np.array_equal, base.state.params, shared.state.params)
    assert all(jax.tree.leaves(same))
    differ = jax.tree.map(np.array_equal, base.state.params, other.state.params)
    assert not all(jax.tree.leaves(differ))
    np.testing.assert_array_equal(
        jax.random.key_data(shared.train_key), jax.random.key_data(other.train_key)
    )
    assert not np.array_equal(
        jax.random.key_data(shared.train_key), jax.random.key_data(base.train_key)
    )
    np.testing.assert_array_equal(first_batch(shared), first_batch(other))
    assert not np.array_equal(first_batch(shared), first_batch(base))
