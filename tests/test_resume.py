"""Kill-and-resume: an interrupted run, rerun with the same command, ends bit-identical.

Every interrupted run is compared with one uninterrupted in-process run: (a) in-process
crashes (an exception from ``fit(on_step=...)``), which need no new process; (b, c) real
processes killed with SIGKILL during a step, an evaluation and a checkpoint write, and
stopped with SIGTERM and SIGINT, one after another on one run directory, by
``tests/signal_cli.py``; (d) non-finite losses from a poisoned batch or a huge learning rate.

Each run is the same tiny config of 16 steps (2 epochs of 8): checkpoints and evaluations
every 4 steps, logs every 2, so an uninterrupted run writes exactly the same
``metrics.jsonl`` as an interrupted one. The backbone trains with dropout on, so resuming
must restore the optimiser state and the per-step dropout keys, not only the params.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from mtl_jax import cli, run_setup
from mtl_jax.checkpoint import restore_params
from mtl_jax.config_io import apply_overrides
from mtl_jax.encoder import load_backbone
from mtl_jax.loop import fit
from mtl_jax.metrics_log import read_metrics
from mtl_jax.presets import preset
from mtl_jax.run_setup import load_run_data

from compile_cache import compile_cache, session_cache_dir

HERE = Path(__file__).resolve().parent
HELPER = HERE / "signal_cli.py"
STEPS = 16

SETS = [
    'model.backbone="tiny"',
    "model.max_length=16",
    "model.backbone_dropout=true",
    'train.freeze="none"',
    "data.synthetic_train_rows=128",
    "data.synthetic_dev_rows=32",
    "train.epochs=2",
    "train.batch_size=16",
    "train.learning_rate=1e-3",
    "train.warmup_steps=2",
    "train.eval_every=4",
    "train.checkpoint_every=4",
    "train.log_every=2",
    "train.keep_checkpoints=10",
]


def train_argv(workdir: Path, *extra: str) -> list[str]:
    sets = [arg for item in (*SETS, *extra) for arg in ("--set", item)]
    return ["train", "--preset", "demo", *sets, "--workdir", str(workdir), "--no-progress"]


def assert_trees_identical(a, b) -> None:
    flat_a, tree_a = jax.tree.flatten_with_path(a)
    flat_b, tree_b = jax.tree.flatten_with_path(b)
    assert tree_a == tree_b
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        assert np.array_equal(x, y), f"{jax.tree_util.keystr(path)} differs"


def steps_saved(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module", autouse=True)
def cache_env(tmp_path_factory):
    """The environment for subprocesses: this session's compilation cache, and as many CPU
    devices as this process has (the reference run is in-process, and the device count
    decides how a batch is split)."""
    with compile_cache(session_cache_dir(tmp_path_factory)) as env:
        forced = "xla_force_host_platform_device_count" in env.get("XLA_FLAGS", "")
        if jax.default_backend() == "cpu" and not forced:
            env["JAX_NUM_CPU_DEVICES"] = str(jax.device_count())
        yield env


# -- (a) in-process crashes ------------------------------------------------------------------


class Crash(Exception):
    pass


def crash_at(step: int):
    def on_step(current: int) -> None:
        if current == step:
            raise Crash(step)

    return on_step


@pytest.fixture(scope="module")
def setup():
    config = apply_overrides(preset("demo"), SETS).validate()
    backbone = load_backbone("tiny")
    return config, backbone, load_run_data(config, backbone.tokenizer)


def run_fit(setup, workdir, on_step=None):
    config, backbone, run_data = setup
    kwargs = dict(backbone=backbone, run_data=run_data, progress=False, handle_signals=False)
    return fit(config, workdir, on_step=on_step, **kwargs)


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """``(result, workdir)`` of the uninterrupted run every interrupted one must match."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    result = run_fit(setup, workdir)
    assert result.steps == STEPS and result.stopped == "done"
    return result, workdir


def test_a_crash_then_rerun_matches_an_uninterrupted_run(setup, reference, tmp_path):
    reference, ref_dir = reference

    run = tmp_path / "crashed"
    with pytest.raises(Crash):
        run_fit(setup, run, on_step=crash_at(11))  # steps 9-11 are lost, 8 is saved
    assert steps_saved(run) == [4, 8]
    result = run_fit(setup, run)

    assert result.steps == STEPS and result.stopped == "done"
    assert_trees_identical(result.state.params, reference.state.params)
    assert_trees_identical(result.state.opt_state, reference.state.opt_state)
    assert read_metrics(run) == read_metrics(ref_dir)
    assert result.eval == reference.eval

    # Rerunning a finished run trains no further and changes nothing.
    again = run_fit(setup, run, on_step=crash_at(STEPS + 1))
    assert again.steps == STEPS
    assert_trees_identical(again.state.params, reference.state.params)
    assert steps_saved(run) == [4, 8, 12, 16]
    assert read_metrics(run) == read_metrics(ref_dir)


# -- (b, c) real processes: SIGKILL, SIGTERM, SIGINT -------------------------------------------


def start(env, argv: list[str], point: str | None = None, step: int = 0, sig: str = "KILL"):
    """``python -m mtl_jax.cli ARGV``, or the same through the signalling helper."""
    env = {**env, "PYTHONUNBUFFERED": "1"}
    prefix = [sys.executable, "-m", "mtl_jax.cli"]
    if point is not None:
        prefix = [sys.executable, str(HELPER), point, str(step), sig, "--"]
    return subprocess.Popen(
        prefix + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


@pytest.mark.slow
def test_killed_and_signalled_runs_resume_bit_identical(cache_env, reference, tmp_path):
    reference, ref_dir = reference
    run = tmp_path / "run"

    # 1. SIGKILL while step 6 runs: the checkpoint of step 4 survives.
    code, _, err = finish(start(cache_env, train_argv(run), "step", 6))
    assert code == -signal.SIGKILL, err
    assert steps_saved(run) == [4]

    # 2. SIGKILL during the evaluation after step 8 (before step 8 is saved).
    code, _, err = finish(start(cache_env, train_argv(run), "eval", 8))
    assert code == -signal.SIGKILL, err
    assert steps_saved(run) == [4]
    assert [e["step"] for e in read_metrics(run) if e["split"] == "dev"] == [4]

    # 3. SIGKILL while the checkpoint of step 12 is being written: Orbax's temporary
    # directory is left behind, and neither inference nor a resume takes it.
    code, _, err = finish(start(cache_env, train_argv(run), "save", 12))
    assert code == -signal.SIGKILL, err
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if not p.name.isdigit()]
    assert steps_saved(run) == [4, 8]
    assert any(name.startswith("12") and "tmp" in name for name in leftovers), leftovers
    assert restore_params(run)[1]["step"] == 8

    # 4. SIGTERM during step 10 (resumed from 8): saves step 10, exits 128 + 15.
    code, out, err = finish(start(cache_env, train_argv(run), "step", 10, "TERM"))
    assert code == 128 + signal.SIGTERM, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] == 10 and summary["stopped"] == "signal"
    assert steps_saved(run) == [4, 8, 10]  # the half-written 12 was cleaned up
    assert [p.name for p in (run / "checkpoints").iterdir() if not p.name.isdigit()] == []

    # 5. SIGINT (Ctrl-C) during step 14: saves step 14, exits 128 + 2.
    code, out, err = finish(start(cache_env, train_argv(run), "step", 14, "INT"))
    assert code == 128 + signal.SIGINT, err
    assert json.loads(out.strip().splitlines()[-1])["steps"] == 14
    assert 14 in steps_saved(run)

    # 6. The same command once more finishes the run.
    code, out, err = finish(start(cache_env, train_argv(run)))
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["stopped"] == "done"

    params, meta = restore_params(run)
    ref_params, ref_meta = restore_params(ref_dir)
    assert meta["step"] == ref_meta["step"] == STEPS
    assert_trees_identical(params, ref_params)
    best, ref_best = restore_params(run, "best"), restore_params(ref_dir, "best")
    assert best[1]["step"] == ref_best[1]["step"]
    assert_trees_identical(best[0], ref_best[0])
    assert read_metrics(run) == read_metrics(ref_dir)
    final_eval = json.loads(out.strip().splitlines()[-1])["eval"]
    assert final_eval == {
        task: {k: v for k, v in scores.items() if k != "confusion"}
        for task, scores in reference.eval.items()
    }


# -- (d) non-finite losses ----------------------------------------------------------------------


def poison_step(monkeypatch, at: int) -> None:
    """Make training batch ``at`` give a NaN loss: an out-of-vocabulary token id reads a NaN
    embedding (JAX's gather fills out-of-range rows with NaN), a real non-finite forward and
    backward pass rather than a faked flag."""
    make_train_step = run_setup.make_train_step

    def patched(*args, **kwargs):
        train_step = make_train_step(*args, **kwargs)

        def step(state, batch, key):
            if int(state.step) + 1 == at:
                ids = np.array(batch["input_ids"], copy=True)
                ids[0, 1] = 10**6
                batch = {**batch, "input_ids": ids}
            return train_step(state, batch, key)

        return step

    monkeypatch.setattr(run_setup, "make_train_step", patched)


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(
    monkeypatch, capsys, tmp_path
):
    poison_step(monkeypatch, 5)
    code = cli.main(train_argv(tmp_path / "run"))
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: non-finite loss")
    assert "at step 5 " in err and "skip_nonfinite" in err
    assert steps_saved(tmp_path / "run") == [4]
    params, meta = restore_params(tmp_path / "run")
    assert meta["step"] == 4
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@pytest.fixture(scope="module", autouse=True)
def diverging_run(cache_env, tmp_path_factory):
    """A real process training with a learning rate of 1e30, started with the module so its
    compile overlaps the in-process tests (it has a program of its own)."""
    workdir = tmp_path_factory.mktemp("diverging") / "run"
    lr = ("train.learning_rate=1e30", "train.head_learning_rate=1e30")
    proc = start(cache_env, train_argv(workdir, *lr))
    yield proc, workdir
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_a_diverging_learning_rate_is_a_clean_error(diverging_run):
    proc, workdir = diverging_run
    code, out, err = finish(proc)
    assert code == 2 and out == ""
    # Warm-up: step 1 has learning rate 0; step 2's update overflows.
    assert err.startswith("error: non-finite loss or gradient at step 2 ") and err.count("\n") == 1
    assert not (workdir / "checkpoints").exists() or steps_saved(workdir) == []


def test_skip_nonfinite_goes_on_and_counts_the_skipped_batch(monkeypatch, capsys, tmp_path):
    poison_step(monkeypatch, 5)
    code = cli.main(train_argv(tmp_path / "run", "train.skip_nonfinite=true"))
    out = capsys.readouterr().out
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["steps"] == STEPS and summary["skipped"] == 1
    train = {e["step"]: e for e in read_metrics(tmp_path / "run") if e["split"] == "train"}
    assert train[6]["skipped"] == 1 and np.isfinite(train[6]["loss"])
    assert all("skipped" not in e for s, e in train.items() if s != 6)
    params, _ = restore_params(tmp_path / "run")
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
