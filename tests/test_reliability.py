"""Bad input, broken run directories, full disks and hostile files, through ``cli.main``.

Every bad input must end with exit status 2 and exactly one stderr line ``error: ...`` that
names the file and line (or column), the config key or the flag at fault. Data-file cases
fail while reading, before anything is compiled, so they are cheap; the checkpoint cases
share one tiny run trained from files (with hostile-looking label names and relative
paths that climb out of the working directory, which the last test uses).
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mtl_jax import checkpoint, cli, config, metrics_log, run_setup
from mtl_jax.errors import UserError
from mtl_jax.synthetic import make_rows, write_tsv

from compile_cache import compile_cache, session_cache_dir

PACKAGE = Path(config.__file__).resolve().parent
HEADER = "text\tgenre\tsentiment\n"
GOOD = HEADER + "a nice story\thumor\tpositive\nthe ship sailed\tscience_fiction\tnegative\n"
SETS = [  # as tests/test_cli.py, so both modules compile the same programs
    'model.backbone="tiny"',
    "model.max_length=32",
    "train.epochs=1",
    "train.batch_size=16",
    "train.log_every=4",
]
# Label names that look like paths or code: they must stay plain data.
HOSTILE_GENRES = {
    "adventure": "../../adventure",
    "humor": "/etc/humor",
    "mystery": "__import__('os').system('touch PWNED')",
    "romance": "${HOME}",
    "science_fiction": "sci\\fi",
}


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def train_on(workdir: Path, train_file: Path | str, *extra: str) -> list[str]:
    """``train`` argv for the default tasks reading one file."""
    return [
        "train",
        "--preset",
        "demo",
        *sets(*SETS, "data.synthetic_train_rows=0", "data.synthetic_dev_rows=0"),
        *sets(
            f'tasks.genre.train_file="{train_file}"', f'tasks.sentiment.train_file="{train_file}"'
        ),
        *sets(*extra),
        "--workdir",
        str(workdir),
        "--no-progress",
    ]


def assert_error(capsys, code: int, *fragments: str) -> str:
    """Exit status 2 and one ``error:`` line on stderr holding every fragment."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
    with compile_cache(session_cache_dir(tmp_path_factory)):
        yield


# -- data files ------------------------------------------------------------------------------

DATA_CASES = {
    # name: (file name, content, fragments; {p} is the file's path)
    "empty file": ("t.tsv", b"", ["{p}: file is empty", "header row"]),
    "blank lines only": ("t.tsv", b"\n\n\n", ["{p}: file is empty"]),
    "header only": ("t.tsv", HEADER, ["{p}: has a header row but no data rows"]),
    "missing text column": (
        "t.tsv",
        "sentence\tgenre\tsentiment\nx\thumor\tpositive\n",
        ["{p}:1 (column 'text'): no column 'text'", "'sentence'"],
    ),
    "missing label column": (
        "t.tsv",
        "text\tgenre\nx\thumor\n",
        ["{p}:1 (column 'sentiment'): no column 'sentiment'"],
    ),
    "unknown label": (
        "t.tsv",
        GOOD + "a poem\tpoetry\tpositive\n",
        ["{p}:4 (column 'genre'): unknown label 'poetry'"],
    ),
    "empty text": ("t.tsv", GOOD + "\thumor\tpositive\n", ["{p}:4 (column 'text'): empty text"]),
    "whitespace text": (
        "t.tsv",
        GOOD + "   \thumor\tpositive\n",
        ["{p}:4 (column 'text'): empty text"],
    ),
    "too few fields": (
        "t.tsv",
        GOOD + "only text\thumor\n",
        ["{p}:4: 2 field(s) but the header has 3"],
    ),
    "too many fields": (
        "t.tsv",
        GOOD + "a\ttab\thumor\tpositive\n",
        ["{p}:4: 4 field(s) but the header has 3", "double quotes"],
    ),
    "unclosed quote": (
        "t.tsv",
        GOOD + '"an open quote\thumor\tpositive\nmore\thumor\tpositive\n',
        ["{p}:4", "quote"],
    ),
    "wrong delimiter": (
        "t.tsv",
        "text,genre,sentiment\nx,humor,positive\n",
        ["{p}:1: the header", "separated by commas"],
    ),
    "invalid UTF-8": (
        "t.tsv",
        GOOD.encode() + b"caf\xe9 noir\thumor\tpositive\n",
        ["{p}:4: invalid UTF-8 (byte 0xe9 at character 4"],
    ),
    "UTF-16": ("t.tsv", GOOD.encode("utf-16"), ["{p}: file is UTF-16 encoded"]),
    "binary file": (
        "t.tsv",
        b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(range(256)) * 4,
        ["{p}:1: NUL byte found", "binary file"],
    ),
    "broken JSONL line": (
        "t.jsonl",
        '{"text": "a", "genre": "humor", "sentiment": "positive"}\n{"text": "b", "genre": \n',
        ["{p}:2: not valid JSON"],
    ),
    "JSONL list line": (
        "t.jsonl",
        '{"text": "a", "genre": "humor", "sentiment": "positive"}\n["b", "humor"]\n',
        ["{p}:2: expected a JSON object"],
    ),
    "unsupported suffix": ("t.xlsx", b"PK\x03\x04", ["{p}: unsupported file type '.xlsx'"]),
}


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_training_file(case, capsys, tmp_path):
    name, content, fragments = DATA_CASES[case]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code = cli.main(train_on(tmp_path / "run", path))
    assert_error(capsys, code, *(f.format(p=path) for f in fragments))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_training_file(capsys, tmp_path):
    code = cli.main(train_on(tmp_path / "run", tmp_path / "nope.tsv"))
    assert_error(capsys, code, f"{tmp_path / 'nope.tsv'}: file not found")


def test_unknown_label_in_the_dev_file(capsys, tmp_path):
    train, dev = tmp_path / "train.tsv", tmp_path / "dev.tsv"
    train.write_text(GOOD, encoding="utf-8")
    dev.write_text(HEADER + "x\thumor\tpositive\ny\tpoetry\tnegative\n", encoding="utf-8")
    code = cli.main(train_on(tmp_path / "run", train, f'tasks.genre.dev_file="{dev}"'))
    assert_error(capsys, code, f"{dev}:3 (column 'genre'): unknown label 'poetry'")


@pytest.mark.parametrize("command", ["predict", "embed"])
@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("empty.txt", b"", "{p}: file is empty"),
        ("blank.txt", b"  \n\n", "{p}: file is empty"),
        ("binary.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "{p}:3: NUL byte found"),
        ("latin1.txt", b"ok\nna\xefve\n", "{p}:2: invalid UTF-8"),
        ("broken.jsonl", b'{"text": "a"}\n{"text": \n', "{p}:2: not valid JSON"),
        ("wrong_key.jsonl", b'{"sentence": "a"}\n', "{p}:1 (column 'text'): no key 'text'"),
    ],
)
def test_bad_inference_input(command, name, content, fragment, trained, capsys, tmp_path):
    path = tmp_path / name
    path.write_bytes(content)
    if command == "predict":
        argv = ["predict", "--checkpoint", str(trained), "--input", str(path)]
    else:
        argv = ["embed", "--model", "tiny", "--input", str(path)]
        argv += ["--output", str(tmp_path / "e.npy")]
    assert_error(capsys, cli.main(argv), fragment.format(p=path))


def test_empty_stdin(trained, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n  \n"))
    code = cli.main(["predict", "--checkpoint", str(trained), "--input", "-"])
    assert_error(capsys, code, "stdin: no sentences")


def test_a_line_of_several_megabytes_is_cut_and_counted(trained, capsys, tmp_path):
    long_line = "the detective found a clue " * 200_000  # 5.4 MB
    path = tmp_path / "long.txt"
    path.write_text(f"a short one\n{long_line}\nanother\n", encoding="utf-8")
    output = tmp_path / "e.npy"
    code = cli.main(["embed", "--model", "tiny", "--input", str(path), "--output", str(output)])
    assert code == 0
    summary = json.loads(capsys.readouterr().err)
    assert summary["sentences"] == 3 and summary["truncated"] == 1

    code = cli.main(["predict", "--checkpoint", str(trained), "--input", str(path)])
    assert code == 0
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    assert len(out) == 3 and len(out[1]) > len(long_line)  # the record echoes the text
    assert json.loads(captured.err) == {"sentences": 3, "truncated": 1}


# -- configs ---------------------------------------------------------------------------------

CONFIG_CASES = {
    # name: (config file or None, --set items, fragments; {p} is the config file)
    "unknown key in a file": (
        "[train]\nbatchsize = 8\n",
        [],
        ["{p}: unknown config key 'train.batchsize'"],
    ),
    "unknown section": ("[training]\nepochs = 1\n", [], ["{p}: unknown config key 'training'"]),
    "wrong type in a file": (
        '[train]\nbatch_size = "eight"\n',
        [],
        ["{p}: config key 'train.batch_size' expects an integer, got 'eight'"],
    ),
    "invalid TOML": ("[train\nepochs = 1\n", [], ["{p}: not valid TOML", "line 1"]),
    "unknown key in --set": (None, ["train.batchsize=8"], ["--set train.batchsize: unknown key"]),
    "wrong type in --set": (
        None,
        ['train.epochs="three"'],
        ["config key 'train.epochs' expects an integer, got 'three'"],
    ),
    "negative batch size": (
        None,
        ["train.batch_size=-4"],
        ["config key 'train.batch_size': expected an integer > 0, got -4"],
    ),
    "label smoothing of 1": (
        None,
        ["tasks.sentiment.label_smoothing=1.0"],
        ["config key 'tasks.sentiment.label_smoothing': expected a number in [0, 1), got 1.0"],
    ),
    "negative R-Drop weight": (
        None,
        ["train.rdrop_alpha=-1"],
        ["config key 'train.rdrop_alpha': expected a number >= 0 (0 = off), got -1"],
    ),
    "negative adversarial epsilon": (
        None,
        ["train.adversarial_epsilon=-0.5"],
        ["config key 'train.adversarial_epsilon': expected a number >= 0 (0 = off), got -0.5"],
    ),
    "adversarial epsilon with a frozen backbone": (  # its gradient never reaches the table
        None,
        ["train.adversarial_epsilon=1"],
        [
            "config key 'train.adversarial_epsilon' = 1.0 would be ignored",
            "a train.freeze that trains backbone layers",
        ],
    ),
    "R-Drop without dropout": (  # the demo's backbone is deterministic, its heads too now
        None,
        ["tasks.genre.dropout=0", "train.rdrop_alpha=1"],
        ["config key 'train.rdrop_alpha' = 1.0 would only double", "model.backbone_dropout = true"],
    ),
    "head dropout without hidden blocks": (  # R-Drop's check counts on it being drawn
        None,
        ["tasks.sentiment.hidden=[]", "tasks.sentiment.dropout=0.1"],
        [
            "config key 'tasks.sentiment.dropout' = 0.1 would be ignored",
            "tasks.sentiment.hidden = [width, ...]",
        ],
    ),
    "unknown freeze strategy": (
        None,
        ['train.freeze="sideways"'],
        ["config key 'train.freeze'", "'sideways'"],
    ),
    "unknown task in --set": (
        None,
        ["tasks.poetry.dropout=0.1"],
        ["--set tasks.poetry.dropout: no task named 'poetry'"],
    ),
    "unknown task in head:<task>": (
        None,
        ['train.freeze="head:poetry"'],
        ["config key 'train.freeze'", "'head:poetry'"],
    ),
    "--set without a value": (None, ["train.epochs"], ["--set 'train.epochs': expected"]),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_config(case, capsys, tmp_path):
    text, items, fragments = CONFIG_CASES[case]
    path = tmp_path / "config.toml"
    source = ["--preset", "demo"]
    if text is not None:
        path.write_text(text, encoding="utf-8")
        source = ["--config", str(path)]
    code = cli.main(["train", *source, *sets(*items), "--print-config"])
    assert_error(capsys, code, *(f.format(p=path) for f in fragments))


def test_missing_and_non_bert_model_directories(capsys, tmp_path):
    train = tmp_path / "train.tsv"
    train.write_text(GOOD, encoding="utf-8")
    missing = tmp_path / "no_such_model"
    code = cli.main(train_on(tmp_path / "run", train, f'model.backbone="{missing}"'))
    assert_error(capsys, code, f"{missing}: model directory not found")

    gpt = tmp_path / "gpt2"
    gpt.mkdir()
    (gpt / "config.json").write_text('{"model_type": "gpt2"}', encoding="utf-8")
    code = cli.main(train_on(tmp_path / "run", train, f'model.backbone="{gpt}"'))
    assert_error(capsys, code, f"{gpt / 'config.json'}: model_type is 'gpt2'")

    (tmp_path / "empty_model").mkdir()
    argv = ["embed", "--model", str(tmp_path / "empty_model"), "--input", str(train)]
    code = cli.main([*argv, "--output", str(tmp_path / "e.npy")])
    assert_error(capsys, code, f"{tmp_path / 'empty_model'}: not a Hugging Face model directory")


# -- run directories and checkpoints ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HostileRun:
    workdir: Path
    root: Path  # holds data/ (the files read) and cwd/ (the working directory)
    written: list[str]  # files under root the run created or changed

    @property
    def train_file(self) -> Path:
        return self.root / "data" / "train.tsv"


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory) -> HostileRun:
    """A tiny run trained from files given by relative paths that climb out of the cwd."""
    root = tmp_path_factory.mktemp("hostile")
    data, cwd = root / "data", root / "cwd"
    data.mkdir()
    cwd.mkdir()
    rows = [{**row, "genre": HOSTILE_GENRES[row["genre"]]} for row in make_rows(256, seed=1)]
    write_tsv(data / "train.tsv", rows[:192])
    write_tsv(data / "dev.tsv", rows[192:])
    before = snapshot(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        argv = train_on(Path("runs/r1"), "../data/train.tsv", *dev_files("../data/dev.tsv"))
        argv += sets("tasks.genre.labels=[]")  # inferred from the file
        assert cli.main(argv) == 0
    written = sorted(name for name, stat in snapshot(root).items() if before.get(name) != stat)
    return HostileRun(cwd / "runs" / "r1", root, written)


@pytest.fixture(scope="module")
def trained(hostile_run) -> Path:
    return hostile_run.workdir


def dev_files(path: str) -> list[str]:
    return [f'tasks.genre.dev_file="{path}"', f'tasks.sentiment.dev_file="{path}"']


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root``: (size, mtime in ns)."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


def copy_run(trained: Path, tmp_path: Path, name: str = "copy") -> Path:
    target = tmp_path / name
    shutil.copytree(trained, target)
    return target


def edit_config(workdir: Path, edit) -> None:
    path = workdir / "config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def predict_argv(workdir: Path, tmp_path: Path) -> list[str]:
    sentences = tmp_path / "s.txt"
    sentences.write_text("the ship\n", encoding="utf-8")
    return ["predict", "--checkpoint", str(workdir), "--input", str(sentences)]


def test_eval_with_a_task_the_checkpoint_lacks(trained, capsys, tmp_path):
    code = cli.main(["eval", "--checkpoint", str(trained), "--data", f"poetry={tmp_path}/x.tsv"])
    assert_error(capsys, code, "--data 'poetry=", "the checkpoint has no task 'poetry'")
    code = cli.main(["eval", "--checkpoint", str(trained), "--data", "genre"])
    assert_error(capsys, code, "--data 'genre': expected TASK=FILE")


def test_eval_with_a_label_the_checkpoint_lacks(trained, capsys, tmp_path):
    path = tmp_path / "eval.tsv"
    path.write_text(HEADER + "x\t/etc/humor\tpositive\ny\thumor\tnegative\n", encoding="utf-8")
    code = cli.main(["eval", "--checkpoint", str(trained), "--data", f"genre={path}"])
    assert_error(capsys, code, f"{path}:3 (column 'genre'): unknown label 'humor'")


def test_checkpoint_directories_that_are_not_runs(trained, capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_error(capsys, cli.main(predict_argv(empty, tmp_path)), f"{empty}: not a run directory")

    missing = tmp_path / "missing"
    code = cli.main(predict_argv(missing, tmp_path))
    assert_error(capsys, code, f"{missing}: checkpoint directory not found")

    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(trained / "config.json", config_only)
    code = cli.main(predict_argv(config_only, tmp_path))
    assert_error(capsys, code, f"{config_only}: incomplete run directory")

    no_checkpoints = copy_run(trained, tmp_path, "no_checkpoints")
    shutil.rmtree(no_checkpoints / "checkpoints")
    shutil.rmtree(no_checkpoints / "best")
    code = cli.main(predict_argv(no_checkpoints, tmp_path))
    assert_error(capsys, code, f"{no_checkpoints}: no checkpoints/ directory")
    code = cli.main([*predict_argv(no_checkpoints, tmp_path), "--which", "best"])
    assert_error(capsys, code, f"{no_checkpoints}: no best/ directory")

    # Only what a kill during the first save leaves: Orbax's temporary directory.
    (no_checkpoints / "checkpoints" / "16.orbax-checkpoint-tmp-1234").mkdir(parents=True)
    code = cli.main(predict_argv(no_checkpoints, tmp_path))
    assert_error(capsys, code, "checkpoints: holds no complete checkpoint")


def test_checkpoint_with_damaged_files(trained, capsys, tmp_path):
    run = copy_run(trained, tmp_path)
    (run / "config.json").write_bytes(b"\xff\xfe not json")
    code = cli.main(predict_argv(run, tmp_path))
    assert_error(capsys, code, f"{run / 'config.json'}: not valid JSON")

    run = copy_run(trained, tmp_path, "meta")
    step = next(p for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    (step / "meta" / "metadata").write_text("{not json", encoding="utf-8")
    code = cli.main(predict_argv(run, tmp_path))
    assert_error(capsys, code, f"{step}: cannot read this checkpoint")

    run = copy_run(trained, tmp_path, "arrays")
    step = next(p for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    for chunk in (step / "params").rglob("d/*"):
        chunk.write_bytes(b"")  # truncated array data
    code = cli.main(predict_argv(run, tmp_path))
    assert_error(capsys, code, f"{step}: cannot read this checkpoint")


def _rename_task(data):
    data["tasks"][1]["name"] = "polarity"


def _wider_head(data):
    data["tasks"][1]["hidden"] = [64]


def _permuted_labels(data):  # same shapes: only the recorded label names can tell
    labels = data["tasks"][0]["labels"]
    data["tasks"][0]["labels"] = labels[1:] + labels[:1]


def _hostile_task_name(data):
    data["tasks"][1]["name"] = "../../escape"


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (_rename_task, "checkpoint params do not fit the config saved with it (missing"),
        (_wider_head, "checkpoint params do not fit the config saved with it (shape of"),
        (_permuted_labels, "trained for other labels than the run's config (task 'genre'"),
        (_hostile_task_name, "config key 'tasks.name'"),
    ],
)
def test_checkpoint_under_another_runs_config(trained, capsys, tmp_path, edit, fragment):
    run = copy_run(trained, tmp_path)
    edit_config(run, edit)
    assert_error(capsys, cli.main(predict_argv(run, tmp_path)), str(run), fragment)


@pytest.mark.parametrize(
    "change, fragment",
    [
        ("tasks.sentiment.hidden=[64]", "cannot resume from this checkpoint"),
        (
            'tasks.genre.labels=["/etc/humor", "../../adventure", "${HOME}", '
            "\"__import__('os').system('touch PWNED')\", \"sci\\\\fi\"]",
            "trained for other labels than the run's config (task 'genre'",
        ),
    ],
)
def test_resuming_from_another_runs_checkpoints(hostile_run, capsys, tmp_path, change, fragment):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(hostile_run.workdir / "checkpoints", run / "checkpoints")
    code = cli.main(train_on(run, hostile_run.train_file, "tasks.genre.labels=[]", change))
    assert_error(capsys, code, f"{run / 'checkpoints'}/", fragment)


def test_a_workdir_of_another_config_is_refused(hostile_run, capsys, monkeypatch, tmp_path):
    run = copy_run(hostile_run.workdir, tmp_path)
    monkeypatch.chdir(hostile_run.root / "cwd")  # the same relative data paths as the run
    changes = (
        "tasks.genre.labels=[]",
        *dev_files("../data/dev.tsv"),
        "tasks.sentiment.hidden=[64]",
    )
    code = cli.main(train_on(run, "../data/train.tsv", *changes))
    assert_error(capsys, code, f"{run}: holds a run with another config", "tasks.sentiment.hidden")


def test_unwritable_run_directory(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory", encoding="utf-8")
    train = tmp_path / "train.tsv"
    train.write_text(GOOD, encoding="utf-8")
    code = cli.main(train_on(blocker / "run", train))
    assert_error(capsys, code, f"{blocker / 'run'}: run directory is not writable")

    output = blocker / "embeddings.npy"
    argv = ["embed", "--model", "tiny", "--input", str(train), "--output", str(output)]
    assert_error(capsys, cli.main(argv), f"--output {output}: cannot write")


def test_full_disk_is_refused_before_training(capsys, monkeypatch, tmp_path):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(
        run_setup.shutil, "disk_usage", lambda path: usage._replace(free=10 * 2**20)
    )
    monkeypatch.setattr(run_setup, "load_backbone", _must_not_run)  # refused before any work
    train = tmp_path / "train.tsv"
    train.write_text(GOOD, encoding="utf-8")
    code = cli.main(train_on(tmp_path / "run", train))
    assert_error(capsys, code, f"{tmp_path / 'run'}: only 10 MiB free", "at least 200 MiB")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []


def _must_not_run(*args, **kwargs):
    raise AssertionError("training started")


ENOSPC_FROM_TENSORSTORE = ValueError(
    'RESOURCE_EXHAUSTED: Error writing "params.heads/0" in OCDBT database at local file '
    '"/x/checkpoints/12.orbax-checkpoint-tmp/": Failed to write 487 bytes to file 9: No space '
    "left on device [os_error_code='28']"
)  # what a real full disk gave (tmpfs of 3 MiB), raised by the save after the failed one


@pytest.mark.parametrize(
    "method, error",
    [
        ("save", OSError(errno.ENOSPC, "No space left on device")),
        ("save", ENOSPC_FROM_TENSORSTORE),
        ("wait_until_finished", ENOSPC_FROM_TENSORSTORE),  # a failed async write, at close
    ],
)
def test_disk_full_while_saving_a_checkpoint(
    hostile_run, capsys, monkeypatch, tmp_path, method, error
):
    import orbax.checkpoint as ocp

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(ocp.CheckpointManager, method, fail)
    run = tmp_path / "run"
    code = cli.main(train_on(run, hostile_run.train_file, "tasks.genre.labels=[]"))
    fragment = "cannot write a checkpoint (No space left on device); the last complete"
    assert_error(capsys, code, str(run), fragment, "rerun to resume")


def test_disk_full_while_logging(hostile_run, capsys, monkeypatch, tmp_path):
    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(metrics_log.MetricsLogger, "log", full)
    run = tmp_path / "run"
    code = cli.main(train_on(run, hostile_run.train_file, "tasks.genre.labels=[]"))
    err = assert_error(capsys, code, f"{run / 'metrics.jsonl'}: No space left on device")
    assert "rerun the same command to resume" in err


def test_debug_shows_the_traceback(capsys, tmp_path):
    argv = ["train", "--config", str(tmp_path / "missing.toml"), "--print-config"]
    assert_error(capsys, cli.main(argv), f"{tmp_path / 'missing.toml'}: config file not found")
    with pytest.raises(UserError, match="config file not found"):
        cli.main(["--debug", *argv])
    # As a process (no JAX is imported on this path, so it is quick).
    proc = subprocess.run(
        [sys.executable, "-m", "mtl_jax.cli", "--debug", *argv], capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert "mtl_jax.errors.UserError" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "mtl_jax.cli", *argv], capture_output=True, text=True
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1


# -- hostile files ---------------------------------------------------------------------------

FORBIDDEN = {
    r"\bpickle\b": "pickle runs code when loading",
    r"allow_pickle\s*=\s*True": "np.load with pickles runs code",
    r"trust_remote_code\s*=\s*True": "remote model code",
    r"(?<![\w.])(eval|exec)\(": "eval/exec of strings",
    r"\b(yaml\.load|yaml\.unsafe_load|marshal|shelve|dill|joblib|torch\.load)\b": "unsafe loaders",
    r"shell\s*=\s*True": "shell commands",
}


def test_the_package_never_executes_file_contents():
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            code = line.split("#", 1)[0]
            for pattern, why in FORBIDDEN.items():
                if re.search(pattern, code):
                    offences.append(f"{path.name}:{number}: {why}: {line.strip()}")
    assert offences == []


def test_pretrained_loading_stays_offline():
    """Every ``from_pretrained`` call passes ``local_files_only=True`` (no downloads)."""
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"from_pretrained\((.*?)\)\n", text, re.S):
            assert "local_files_only=True" in match.group(1), f"{path.name}: {match.group(0)}"


def test_config_values_are_data_never_code(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    payload = "__import__('os').system('touch PWNED')"
    code = cli.main(["train", "--preset", "demo", "--set", f"train.freeze={payload}"])
    assert_error(capsys, code, "config key 'train.freeze'")
    code = cli.main(
        ["train", "--preset", "demo", "--set", f'model.backbone="{payload}"', "--print-config"]
    )
    assert code == 0 and json.dumps(payload) in capsys.readouterr().out  # a plain string
    path = tmp_path / "c.toml"
    labels = json.dumps([payload, "$(touch PWNED)"])
    path.write_text(f'[[tasks]]\nname = "t"\nlabels = {labels}\n', encoding="utf-8")
    code = cli.main(["train", "--config", str(path), "--print-config"])
    assert code == 0 and f"labels = {labels}" in capsys.readouterr().out
    assert not (tmp_path / "PWNED").exists()


def test_a_run_writes_only_under_its_workdir(hostile_run):
    """Config paths (``../data/*.tsv``) and label names that look like paths or code are
    read and stored as data: every file the run created or changed is under the workdir."""
    assert "cwd/runs/r1/config.json" in hostile_run.written
    assert [name for name in hostile_run.written if not name.startswith("cwd/runs/r1/")] == []
    assert not list(hostile_run.root.rglob("PWNED"))
    saved = json.loads((hostile_run.workdir / "config.json").read_text(encoding="utf-8"))
    genre = next(task for task in saved["tasks"] if task["name"] == "genre")
    assert genre["labels"] == sorted(HOSTILE_GENRES.values())
    assert genre["train_file"] == "../data/train.tsv"  # stored as given, read relative to cwd


# -- a real full disk: only the one-line error reaches the terminal -------------------------

FULL_DISK_CLI = """
import sys
from mtl_jax import cli, run_setup
run_setup.MIN_FREE_BYTES = 0  # the disk is tiny on purpose
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2.6 MiB tmpfs: room for the run files and two tiny checkpoints, not a third."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2600k", "tmpfs", str(mount)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_real_full_disk_prints_one_line_and_keeps_the_last_checkpoint(tiny_disk, tmp_path):
    run = tiny_disk / "run"
    items = [*SETS, "data.synthetic_train_rows=256", "data.synthetic_dev_rows=64"]
    items += ["train.checkpoint_every=4", "train.keep_checkpoints=10"]
    argv = ["train", "--preset", "demo", *sets(*items), "--workdir", str(run), "--no-progress"]
    with compile_cache(session_cache_dir_for(tmp_path)) as env:
        proc = subprocess.run(
            [sys.executable, "-c", FULL_DISK_CLI, *argv], capture_output=True, text=True, env=env
        )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: {run}") and proc.stderr.count("\n") == 1, proc.stderr
    # A checkpoint write or another write (logs, TensorBoard) meets the full disk first.
    assert "No space left on device" in proc.stderr
    assert "the last complete checkpoint is intact" in proc.stderr
    assert "Traceback" not in proc.stderr and "ERROR:" not in proc.stderr
    complete = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert complete and complete[-1] < 16
    params, meta = checkpoint.restore_params(run)  # the last complete one is intact
    assert meta["step"] == complete[-1] and params["heads"]


def session_cache_dir_for(tmp_path: Path) -> Path:
    directory = tmp_path / "jax_cache"  # not on the tiny disk
    directory.mkdir(exist_ok=True)
    return directory


def test_background_thread_errors_are_quiet_unless_debugging(capfd, caplog, monkeypatch, request):
    import logging
    import threading

    seen = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args.exc_value))
    # An earlier clean error in this process left the loggers quiet (as a CLI process would
    # be until its end); start from checkpoint.py's level.
    absl = logging.getLogger("absl")
    monkeypatch.setattr(absl, "level", logging.WARNING)
    # absl/orbax may have set the logger up earlier in this process: capture it directly.
    monkeypatch.setattr(absl, "disabled", False)
    monkeypatch.setattr(absl, "propagate", False)
    absl.addHandler(caplog.handler)
    request.addfinalizer(lambda: absl.removeHandler(caplog.handler))

    def fail():
        raise OSError(errno.ENOSPC, "No space left on device")

    def noise():
        thread = threading.Thread(target=fail)
        thread.start()
        thread.join()
        logging.getLogger("absl").error("writer thread failed")

    hook = threading.excepthook
    with cli.quiet_background_errors(debug=False):
        noise()
    assert seen == [] and capfd.readouterr().err == "" and caplog.messages == []
    assert threading.excepthook is hook  # restored after a normal end
    with cli.quiet_background_errors(debug=True):
        noise()
    assert [str(e) for e in seen] == ["[Errno 28] No space left on device"]
    assert caplog.messages == ["writer thread failed"]

    excepthook = sys.excepthook
    monkeypatch.setattr(sys, "excepthook", excepthook)  # put back after the test
    with pytest.raises(UserError), cli.quiet_background_errors(debug=False):
        raise UserError("disk full")  # a clean error: quiet until the process ends
    assert threading.excepthook is not hook and sys.excepthook is not excepthook
