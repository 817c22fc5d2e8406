"""One training run per workdir: the lock, in-process and with real processes.

The unit tests hold the lock twice in one process (``flock`` locks are per open file, so
a second open conflicts as another process would). The process tests start a real
``mtl-jax train`` that hangs after saving step 2, start a second one on the same workdir while the
first trains, kill the first with SIGKILL and rerun: the second is refused at once, the
rerun is not blocked by the dead one's lock and the log has each step once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtl_jax.errors import UserError
from mtl_jax.metrics_log import read_metrics
from mtl_jax.workdir_lock import LOCK_FILE, check_held, hold_workdir, read_holder

from compile_cache import compile_cache, session_cache_dir

SETS = [
    'model.backbone="tiny"',
    "model.max_length=16",
    "data.synthetic_train_rows=128",
    "data.synthetic_dev_rows=32",
    "train.epochs=2",
    "train.batch_size=16",
    "train.eval_every=4",
    "train.checkpoint_every=2",
    "train.log_every=2",
]
# ``mtl-jax train`` that hangs before step N + 1 (after saving step N), until killed.
HANGING_CLI = """
import sys, time
from mtl_jax import cli, run_setup
make = run_setup.make_train_step
def hanging(*args, **kwargs):
    step = make(*args, **kwargs)
    def run(state, batch, key):
        while int(state.step) >= int(sys.argv[1]):
            time.sleep(1)
        return step(state, batch, key)
    return run
run_setup.make_train_step = hanging
sys.exit(cli.main(sys.argv[2:]))
"""


def train_argv(workdir: Path) -> list[str]:
    sets = [arg for item in SETS for arg in ("--set", item)]
    return ["train", "--preset", "demo", *sets, "--workdir", str(workdir), "--no-progress"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with compile_cache(session_cache_dir(tmp_path_factory)) as env:
        yield {**env, "PYTHONUNBUFFERED": "1"}


def test_a_second_holder_is_refused_with_the_first_named(tmp_path):
    with hold_workdir(tmp_path / "run", command="train") as holder:
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert read_holder(tmp_path / "run") == holder
        with pytest.raises(UserError) as caught, hold_workdir(tmp_path / "run"):
            pass
        message = str(caught.value)
        assert message.startswith(f"{tmp_path / 'run'}: another 'train' is using this run")
        assert f"pid {os.getpid()} on host {socket.gethostname()}, since {holder['since']}" in (
            message
        )
        assert "wait for it to end or stop it" in message and "--workdir" in message
        assert "\n" not in message
        assert read_holder(tmp_path / "run") == holder  # the refused one changed nothing
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # released and removed
    with hold_workdir(tmp_path / "run"):  # free again
        pass


def test_a_replaced_run_directory_is_noticed_and_its_new_lock_kept(tmp_path):
    """Deleting a live run's directory and starting another run there gives two locks on
    two files: the first holder's check_held says so, and its release leaves the second
    holder's lock file alone."""
    run = tmp_path / "run"
    with hold_workdir(run) as first:
        check_held(run, first)  # still ours: nothing raised
        shutil.rmtree(run)
        with pytest.raises(UserError, match="deleted or replaced") as caught:
            check_held(run, first)
        assert str(caught.value).startswith(f"{run}: ") and "\n" not in str(caught.value)
        with hold_workdir(run) as second:  # a new run in the recreated directory
            with pytest.raises(UserError, match=f"not the one pid {os.getpid()} locked"):
                check_held(run, first)
            check_held(run, second)
        assert not (run / LOCK_FILE).exists()
        with hold_workdir(run) as third:
            pass
    assert third["file"] != first["file"]
    check_held(run, {})  # a disabled lock checks nothing


def test_train_stops_cleanly_when_its_run_directory_is_replaced(tmp_path, monkeypatch, capsys):
    """``mtl-jax train`` checks its lock after every step: a deleted and recreated workdir
    stops it with exit 2 and one line, before it writes into the new directory."""
    from mtl_jax import cli, loop

    run = tmp_path / "run"
    real_fit = loop.fit

    def fit(config, workdir, **kwargs):
        check = kwargs["on_step"]

        def on_step(step):
            if step == 1:  # before the first checkpoint (step 2): no save in flight
                shutil.rmtree(workdir)
                Path(workdir).mkdir()
            check(step)

        return real_fit(config, workdir, **{**kwargs, "on_step": on_step})

    monkeypatch.setattr(loop, "fit", fit)
    assert cli.main(train_argv(run)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the run directory was deleted or replaced" in err[0]
    assert list(run.iterdir()) == []  # nothing of the old run written into the new one


def test_disabled_holds_nothing(tmp_path):
    with hold_workdir(tmp_path, enabled=False) as holder, hold_workdir(tmp_path):
        assert holder == {}


def test_an_unwritable_workdir_is_one_clean_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x", encoding="utf-8")
    with pytest.raises(UserError, match="run directory is not writable"), hold_workdir(blocker):
        pass


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    code = (
        "import sys, time\nfrom mtl_jax.workdir_lock import hold_workdir\n"
        "with hold_workdir(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline() == "held\n"
        with pytest.raises(UserError, match=f"pid {proc.pid} "), hold_workdir(tmp_path):
            pass
    finally:
        proc.kill()
        proc.wait()
    assert read_holder(tmp_path)["pid"] == proc.pid  # the dead process's file is still there
    with hold_workdir(tmp_path) as holder:  # but the kernel released its lock
        assert read_holder(tmp_path) == holder


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.2)


def _cli(argv: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """``mtl-jax ARGV`` in a fresh process, its output captured."""
    command = [sys.executable, "-m", "mtl_jax.cli", *argv]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


def _steps(workdir: Path) -> list[int]:
    directory = workdir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def test_a_concurrent_train_is_refused_and_a_killed_one_resumes(env, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-c", HANGING_CLI, "2", *train_argv(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        _wait_for(lambda: (run / "checkpoints").is_dir() and _steps(run) == [2], first)
        started = time.monotonic()
        second = _cli(train_argv(run), env, timeout=120)
        refused_in = time.monotonic() - started
        assert second.returncode == 2, second.stderr
        assert second.stderr.startswith(f"error: {run}: another 'train' is using this run")
        assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
        assert f"pid {first.pid} on host {socket.gethostname()}" in second.stderr
        assert refused_in < 60  # before any data, model or compile work
        assert first.poll() is None  # the running one goes on
        assert read_holder(run)["pid"] == first.pid
        # Reading commands take no lock: they use the newest complete checkpoint meanwhile.
        texts = tmp_path / "texts.txt"
        texts.write_text("a quiet night in town\nthe rocket left orbit\n", encoding="utf-8")
        predicted = _cli(
            ["predict", "--checkpoint", str(run), "--input", str(texts)], env, timeout=120
        )
        assert predicted.returncode == 0, predicted.stderr
        records = [json.loads(line) for line in predicted.stdout.splitlines()]
        assert [r["text"] for r in records] == ["a quiet night in town", "the rocket left orbit"]
        assert first.poll() is None and read_holder(run)["pid"] == first.pid
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        first.kill()
        first.communicate()
    assert first.returncode == -signal.SIGKILL
    assert read_holder(run)["pid"] == first.pid  # a stale file, but no lock

    rerun = _cli(train_argv(run), env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout.strip().splitlines()[-1])["steps"] == 16
    assert not (run / LOCK_FILE).exists()
    for split in ("train", "dev"):
        steps = [e["step"] for e in read_metrics(run) if e["split"] == split]
        assert steps == sorted(set(steps)), f"{split} steps logged twice: {steps}"
    assert [e["step"] for e in read_metrics(run) if e["split"] == "train"] == list(range(2, 17, 2))
