"""Benchmark harness (``scripts/bench``): the workload matches the PyTorch baseline's, the
script runs, ``--profile`` traces the steps it names.

No timing is asserted anywhere: benchmarks report, tests check.
"""

from __future__ import annotations

import io
import json
import sys
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from mtl_jax.synthetic import make_rows

from conftest import ROOT, SHARED, load_module, load_script
from probes import traced_steps

sys.path.insert(0, str(ROOT / "scripts"))  # the harness lives beside the scripts using it

import bench  # noqa: E402


def test_flops_match_the_shared_baseline_formula():
    """Same count as ``benchlib.step_flops(...)["effective"]`` for MiniLM (5 layers run)."""
    path = Path(bench.bench_dir()) / "benchlib.py"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    sys.path.insert(0, str(path.parent))
    try:
        benchlib = load_module(path, "benchlib")
    finally:
        sys.path.remove(str(path.parent))
    from transformers import BertConfig

    minilm = BertConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6)
    heads = benchlib.head_param_count()
    for mode, kind in (("train_full", "train_full"), ("infer", "infer")):
        for seq in (16, 128):
            ours = bench.step_flops(minilm, 5, heads, 32, seq, mode)
            theirs = benchlib.step_flops(32, seq, kind, layers_used=5)["effective"]
            assert ours == pytest.approx(theirs, rel=1e-12), (mode, seq)
    frozen = bench.step_flops(minilm, 5, heads, 32, 64, "train_frozen")
    cached = bench.step_flops(minilm, 5, heads, 32, 64, "train_cached")
    assert cached == 6 * heads * 32 < frozen


def test_bench_config_is_the_baselines_optimiser():
    config = bench.bench_config(backbone="tiny", freeze="backbone", backbone_eval=True)
    train = config.train
    assert (train.learning_rate, train.head_learning_rate, train.weight_decay) == (2e-5, 2e-5, 0.01)
    assert (train.grad_clip, train.lr_schedule, train.warmup_steps) == (0.0, "constant", 0)
    assert config.model.backbone_dropout is False
    assert [t.name for t in config.tasks] == ["genre", "sentiment"]


def test_real_stream_reads_the_baselines_files_not_the_presets():
    """pt_realdata.py trains on the SST-2 sentences, unweighted, whatever `real` becomes."""
    config = bench.bench_config(backbone="tiny", data_dir="data")
    files = {t.name: (t.train_file, t.dev_file, t.class_weighting) for t in config.tasks}
    assert files == {
        "genre": ("data/brown_genre/train.tsv", "data/brown_genre/dev.tsv", "none"),
        "sentiment": ("data/sst2/train.tsv", "data/sst2/dev.tsv", "none"),
    }


def test_subset_keeps_rows_aligned(tiny_config, tiny_backbone):
    from mtl_jax.data import dataset_from_rows

    full = dataset_from_rows(make_rows(30, seed=4), tiny_config, tiny_backbone.tokenizer)
    part = bench.subset(full, 10, seed=1)
    assert len(part) == 10
    for i, text in enumerate(part.texts):
        j = full.texts.index(text)
        np.testing.assert_array_equal(part.input_ids[i], full.input_ids[j])
        np.testing.assert_array_equal(part.labels[i], full.labels[j])


@pytest.mark.slow
def test_benchmark_script_prints_one_json_line_per_result():
    script = load_script("benchmark")
    out = io.StringIO()
    argv = ["--model", "tiny", "--suite", "train", "--seq-len", "16", "--steps", "2"]
    with redirect_stdout(out):
        assert script.main([*argv, "--warmup", "1", "--batch", "4", "--peak-size", "256"]) == 0
    (line,) = out.getvalue().splitlines()
    result = json.loads(line)
    for key in ("suite", "freeze", "examples_per_s", "real_tokens_per_s", "step_s", "compiles"):
        assert key in result
    for key in ("compile_s", "peak_rss_mb", "mfu", "device"):
        assert key in result
    assert result["compiles"] >= 1 and result["recompiles_while_timed"] == 0
    assert set(result["step_s"]) >= {"min", "median", "max"}


def test_set_reaches_every_suites_config_and_a_bad_setting_exits_2(capsys):
    """--set KEY=VALUE times a config setting the flags do not name (A/B: with and without)."""
    opts = bench.Options(
        backbone="tiny", overrides=("tasks.genre.own_layers=1", "train.adversarial_epsilon=0.5")
    )
    config = opts.config()
    assert config.task("genre").own_layers == 1 and config.train.adversarial_epsilon == 0.5
    assert bench.Options(backbone="tiny").config().task("genre").own_layers == 0
    script = load_script("benchmark")
    out = io.StringIO()
    argv = ["--model", "tiny", "--suite", "train", "--seq-len", "16", "--steps", "1"]
    argv += ["--warmup", "0", "--batch", "4", "--peak-size", "256"]
    with redirect_stdout(out):
        assert script.main([*argv, "--set", "tasks.genre.own_layers=1"]) == 0
    assert json.loads(out.getvalue())["overrides"] == ["tasks.genre.own_layers=1"]
    # FGM with a frozen backbone is refused by the config, in one line, before any work.
    assert script.main([*argv, "--freeze", "backbone", "--set", "train.adversarial_epsilon=1"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: config key 'train.adversarial_epsilon' = 1.0 would be ignored")


def test_matmul_peak_is_measured_in_a_child_process_on_cpu(monkeypatch):
    """The limit an MFU is taken against; its operands must not count in our peak RSS."""
    calls = []
    monkeypatch.setattr(bench.workloads, "matmul_gflops", lambda *a: calls.append(a) or 1.0)
    gflops = bench.matmul_gflops_apart(64, reps=2)
    assert calls == [] and np.isfinite(gflops) and gflops > 0  # not this process's function


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "data" / "sst2").is_dir(), reason="../shared/data absent")
def test_cached_train_real_trains_the_heads_from_a_cache_and_refuses_a_live_backbone(capsys):
    """--cached times mtl-jax train's frozen path: the cache is built once (its time
    reported), the timed steps never recompile; a backbone that trains cannot be cached."""
    script = load_script("benchmark")
    argv = ["--model", "tiny", "--suite", "train-real", "--freeze", "backbone", "--cached"]
    argv += ["--max-length", "32", "--steps", "3", "--batch", "8", "--peak-size", "256"]
    argv += ["--data-dir", str(SHARED / "data")]
    assert script.main(argv) == 2  # backbone dropout on: not a fixed function
    assert "--cached: needs --freeze backbone --backbone-eval" in capsys.readouterr().err
    out = io.StringIO()
    with redirect_stdout(out):
        assert script.main([*argv, "--backbone-eval"]) == 0
    (line,) = out.getvalue().splitlines()
    result = json.loads(line)
    assert result["cached"] is True and result["cache_build_s"] > 0
    assert result["recompiles_while_timed"] == 0 and result["mfu"] is None
    assert result["step_memory_mb"] is None and result["examples_per_s"] > 0


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "data" / "sst2").is_dir(), reason="../shared/data absent")
def test_cache_suite_trains_the_same_heads_from_the_cache_as_the_full_step():
    """The cache suite's two runs (full frozen step, cached step) see the same batches from
    the same state: their heads and losses agree to float rounding."""
    script = load_script("benchmark")
    argv = ["--model", "tiny", "--suite", "cache", "--cache-rows", "64", "--cache-epochs", "2"]
    argv += ["--max-length", "32", "--batch", "8", "--data-dir", str(SHARED / "data")]
    out = io.StringIO()
    with redirect_stdout(out):
        assert script.main(argv) == 0
    (line,) = out.getvalue().splitlines()
    result = json.loads(line)
    assert result["suite"] == "cache" and result["steps_per_epoch"] == 8
    assert len(result["epoch_s_cached"]) == len(result["epoch_s_uncached"]) == 2
    assert result["max_abs_diff_heads"] < 1e-4 and result["max_abs_diff_loss"] < 1e-4
    assert result["cache_build_s"] > 0 and result["examples_per_s"] > 0


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "data" / "sst2").is_dir(), reason="../shared/data absent")
def test_frozen_train_real_reports_the_step_against_a_forward_pass():
    """The two opt-in diagnostics: the step against a forward pass, XLA's memory account."""
    script = load_script("benchmark")
    out = io.StringIO()
    argv = ["--model", "tiny", "--suite", "train-real", "--freeze", "backbone", "--backbone-eval"]
    argv += [
        "--step-over-forward",
        "--step-memory",
        "--max-length",
        "32",
        "--steps",
        "3",
        "--batch",
        "8",
        "--peak-size",
        "256",
    ]
    with redirect_stdout(out):
        assert script.main([*argv, "--data-dir", str(SHARED / "data")]) == 0
    (line,) = out.getvalue().splitlines()
    result = json.loads(line)
    assert result["recompiles_while_timed"] == 0 and result["compiles"] >= 2
    assert result["forward_step_s"]["n"] == 3 and result["step_over_forward"] > 0
    memory = result["step_memory_mb"]
    assert memory["seq_len"] == 32 and memory["argument"] > 0 and memory["temp"] > 0


def test_benchmark_refuses_a_bad_profile_range(capsys):
    script = load_script("benchmark")
    assert script.main(["--model", "tiny", "--profile", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --profile '4': expected START:END")


@pytest.mark.slow
def test_benchmark_profile_traces_the_named_steps(tmp_path):
    """Call 0 compiles (one sequence length), calls 1-2 are the timed steps: 1:2 traces both."""
    script = load_script("benchmark")
    argv = ["--model", "tiny", "--suite", "train", "--seq-len", "16", "--steps", "3"]
    argv += ["--warmup", "1", "--batch", "4", "--peak-size", "256"]
    out = io.StringIO()
    with redirect_stdout(out):
        code = script.main([*argv, "--profile", "1:2", "--profile-dir", str(tmp_path)])
    assert code == 0
    (line,) = out.getvalue().splitlines()
    assert json.loads(line)["step_s"]["n"] == 3
    assert traced_steps(tmp_path / "train", "train") == [1, 2]
