"""The run record: a resume on changed data or settings is refused, unless allowed and logged.

One tiny run is trained from files (module fixture); every case then reruns ``train`` on
it as a user would. Refusals happen before any model work, so they are cheap; the cases
that go on (safe settings, ``--allow-changes``) run on copies. The record's own logic is
tested on fake run directories (a ``checkpoints/<step>`` directory is what makes a resume).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mtl_jax import cli
from mtl_jax.config_io import apply_overrides
from mtl_jax.errors import UserError
from mtl_jax.presets import preset
from mtl_jax.run_record import (
    RECORD_FILE,
    SAFE_TO_CHANGE,
    check_resume,
    make_record,
    read_record,
    record_run,
)
from mtl_jax.synthetic import make_rows, write_tsv

from compile_cache import compile_cache, session_cache_dir

SETS = [
    'model.backbone="tiny"',
    "model.max_length=32",
    "data.synthetic_train_rows=0",
    "data.synthetic_dev_rows=0",
    "train.epochs=1",
    "train.batch_size=16",
    "train.log_every=4",
]


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def file_sets(train: Path, dev: Path) -> list[str]:
    return [
        f'tasks.{task}.{key}="{path}"'
        for task in ("genre", "sentiment")
        for key, path in (("train_file", train), ("dev_file", dev))
    ]


@pytest.fixture(scope="module", autouse=True)
def cache_env(tmp_path_factory):
    with compile_cache(session_cache_dir(tmp_path_factory)) as env:
        yield env


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("record_data")
    rows = make_rows(96, seed=3)
    write_tsv(root / "train.tsv", rows[:64])
    write_tsv(root / "dev.tsv", rows[64:])
    return root / "train.tsv", root / "dev.tsv"


def train_argv(workdir: Path, data: tuple[Path, Path], *extra: str) -> list[str]:
    argv = ["train", "--preset", "demo", *sets(*SETS, *file_sets(*data), *extra)]
    return [*argv, "--workdir", str(workdir), "--no-progress"]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("record") / "run"
    assert cli.main(train_argv(workdir, data)) == 0
    return workdir


def assert_error(capsys, code: int, *fragments: str) -> str:
    """Exit status 2 and one ``error:`` line on stderr holding every fragment."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    return err


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_record_holds_each_file_and_the_config(trained, data):
    train, dev = data
    record = json.loads((trained / RECORD_FILE).read_text(encoding="utf-8"))
    assert record["files"] == [
        {
            "path": str(train),
            "keys": ["tasks.genre.train_file", "tasks.sentiment.train_file"],
            "size": train.stat().st_size,
            "sha256": sha256(train),
        },
        {
            "path": str(dev),
            "keys": ["tasks.genre.dev_file", "tasks.sentiment.dev_file"],
            "size": dev.stat().st_size,
            "sha256": sha256(dev),
        },
    ]
    config = apply_overrides(preset("demo"), [*SETS, *file_sets(*data)]).validate()
    assert record["config"] == config.to_dict()
    assert "allowed_changes" not in record


def test_synthetic_data_records_no_file():
    assert make_record(preset("demo"))["files"] == []


@pytest.fixture
def restore_data(data):
    """Let a test change the data files; put them back afterwards."""
    saved = {path: path.read_bytes() for path in data}
    yield data
    for path, content in saved.items():
        path.write_bytes(content)


def _append_row(path: Path) -> str:
    before = path.stat().st_size
    with path.open("a", encoding="utf-8") as f:
        f.write("one more line\thumor\tpositive\n")
    return f"size {before} -> {path.stat().st_size} bytes"


def _same_size_edit(path: Path) -> str:
    content = bytearray(path.read_bytes())
    index = content.index(b"\n") + 1  # the first data row's first letter
    content[index] = ord("x") if content[index] != ord("x") else ord("y")
    path.write_bytes(bytes(content))
    return "content changed, same size (sha256 "


def _delete(path: Path) -> str:
    size = path.stat().st_size
    path.unlink()
    return f"no such file or directory (it had {size} bytes)"


@pytest.mark.parametrize("which", ["train", "dev"])
@pytest.mark.parametrize("edit", [_append_row, _same_size_edit, _delete])
def test_a_changed_data_file_is_refused(trained, restore_data, capsys, which, edit):
    path = restore_data[0 if which == "train" else 1]
    record = (trained / RECORD_FILE).read_bytes()
    what = edit(path)
    code = cli.main(train_argv(trained, restore_data))
    assert_error(
        capsys,
        code,
        f"error: cannot resume: {path} (tasks.genre.{which}_file, tasks.sentiment.{which}_file)",
        what,
        f"what {trained / RECORD_FILE} recorded",
        "pass --allow-changes to resume anyway",
    )
    assert (trained / RECORD_FILE).read_bytes() == record  # a refusal changes nothing


REFUSED = {
    "train.max_steps=2": "config key 'train.max_steps': 0 -> 2: the learning-rate schedule",
    "train.epochs=2": "config key 'train.epochs': 1 -> 2: the learning-rate schedule",
    "train.learning_rate=0.001": "config key 'train.learning_rate': 2e-05 -> 0.001",
    "train.seed=7": "config key 'train.seed': 0 -> 7",
    "train.batch_size=8": "config key 'train.batch_size': 16 -> 8",
    "data.group_window=8": "config key 'data.group_window': 64 -> 8",
    'data.mixing="round_robin"': 'config key \'data.mixing\': "proportional" -> "round_robin"',
}


@pytest.mark.parametrize("change", REFUSED)
def test_a_changed_setting_is_refused(trained, data, capsys, change):
    code = cli.main(train_argv(trained, data, change))
    assert_error(capsys, code, f"error: cannot resume: {REFUSED[change]}", "--allow-changes")


def test_several_changes_are_named_in_one_line(trained, restore_data, capsys):
    what = _append_row(restore_data[0])
    code = cli.main(train_argv(trained, restore_data, "train.max_steps=2", "train.seed=7"))
    err = assert_error(capsys, code, what, "'train.max_steps': 0 -> 2", "'train.seed': 0 -> 7")
    assert err.index("train.max_steps") < err.index("train.seed")


def test_settings_documented_as_safe_may_change(trained, data, capsys, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    safe = [
        "train.eval_every=2",
        "train.log_every=2",
        "train.checkpoint_every=2",
        "train.keep_checkpoints=5",
        "train.early_stopping_patience=3",
        "train.skip_nonfinite=true",
        "data.eval_batch_size=32",
    ]
    assert {item.split("=")[0] for item in safe} <= set(SAFE_TO_CHANGE)
    code = cli.main(train_argv(run, data, *safe))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "warning" not in captured.err
    assert json.loads(captured.out)["steps"] == 4  # finished: nothing more to train
    assert "allowed_changes" not in read_record(run)


def test_allow_changes_resumes_and_the_record_logs_it(trained, data, capsys, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    code = cli.main([*train_argv(run, data, "train.epochs=2"), "--allow-changes"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    change = (
        "config key 'train.epochs': 1 -> 2: the learning-rate schedule and the data stream "
        "span the run's length"
    )
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and change in warnings[0]
    assert json.loads(captured.out)["steps"] == 8  # went on to the new length
    record = read_record(run)
    assert [entry["changes"] for entry in record["allowed_changes"]] == [[change]]
    assert record["config"]["train"]["epochs"] == 2  # the new reference
    assert record["created"] == read_record(trained)["created"]
    # The same command again resumes without the flag; the old length is refused now.
    assert cli.main(train_argv(run, data, "train.epochs=2")) == 0
    capsys.readouterr()
    code = cli.main(train_argv(run, data))
    assert_error(capsys, code, "config key 'train.epochs': 2 -> 1")


def test_debug_shows_the_traceback(trained, data, capsys):
    with pytest.raises(UserError, match="cannot resume: config key 'train.seed'"):
        cli.main(["--debug", *train_argv(trained, data, "train.seed=7")])


def test_a_changed_file_is_refused_by_a_real_process(trained, restore_data, cache_env):
    what = _append_row(restore_data[0])
    argv = [sys.executable, "-m", "mtl_jax.cli", *train_argv(trained, restore_data)]
    proc = subprocess.run(argv, capture_output=True, text=True, env=cache_env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: cannot resume: {restore_data[0]} (tasks.genre")
    assert what in proc.stderr and proc.stderr.count("\n") == 1
    proc = subprocess.run(
        argv[:3] + ["--debug"] + argv[3:], capture_output=True, text=True, env=cache_env
    )
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and what in proc.stderr


# -- the record's logic on fake run directories -------------------------------------------


def _config(*items: str):
    return apply_overrides(preset("demo"), list(items)).validate()


def test_a_fresh_start_rewrites_the_record(tmp_path):
    record_run(_config("train.seed=1"), tmp_path)
    (tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp-1").mkdir(parents=True)  # incomplete
    assert record_run(_config("train.seed=2"), tmp_path) == []  # no checkpoint: a new run
    assert read_record(tmp_path)["config"]["train"]["seed"] == 2


def test_a_resume_of_a_run_without_a_record_starts_one(tmp_path):
    (tmp_path / "checkpoints" / "8").mkdir(parents=True)
    assert record_run(_config("train.seed=1"), tmp_path) == []
    assert read_record(tmp_path)["config"]["train"]["seed"] == 1
    with pytest.raises(UserError, match="'train.seed': 1 -> 2"):
        record_run(_config("train.seed=2"), tmp_path)


def test_check_resume_returns_allowed_changes(tmp_path):
    saved = make_record(_config("train.max_steps=10"))
    assert check_resume(saved, _config("train.max_steps=10")) == []
    assert check_resume(saved, _config("train.max_steps=10", "train.log_every=1")) == []
    assert check_resume(saved, _config("train.max_steps=20"), allow_changes=True) == [
        "config key 'train.max_steps': 10 -> 20: the learning-rate schedule spans the run's length"
    ]
    with pytest.raises(UserError, match=r"^cannot resume: config key 'train.max_steps'"):
        check_resume(saved, _config("train.max_steps=20"))


def test_a_setting_newer_than_the_record_is_compared_with_its_default():
    """A record from before a key existed trained as that key's default: a resume that
    sets it otherwise is a change (e.g. switching on the EMA of a run saved without it)."""
    saved = make_record(_config("train.max_steps=10"))
    del saved["config"]["train"]["ema_decay"]  # as a record written before the key
    assert check_resume(saved, _config("train.max_steps=10")) == []
    with pytest.raises(UserError, match=r"'train.ema_decay': 0.0 -> 0.999"):
        check_resume(saved, _config("train.max_steps=10", "train.ema_decay=0.999"))
    saved["config"]["train"]["no_longer_a_key"] = 1  # a key the config lost: not compared
    assert check_resume(saved, _config("train.max_steps=10")) == []


def test_an_unreadable_record_is_one_clean_error(tmp_path):
    (tmp_path / "checkpoints" / "8").mkdir(parents=True)
    (tmp_path / RECORD_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match=f"{tmp_path / RECORD_FILE}: cannot read the run record"):
        record_run(_config(), tmp_path)
