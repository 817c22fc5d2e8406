"""The benchmark harness behind ``scripts/benchmark.py`` (kept outside the library).

``workloads`` builds the baseline's configs and batches and counts FLOPs; ``measure`` times
steps, counts compiles and runs the PyTorch baseline; ``suite`` holds what every suite
shares; ``train_suites``, ``encode`` and ``cache`` are the suites. Import it with
``scripts/`` on ``sys.path`` (a script in ``scripts/`` has it there already).
"""

from .cache import FeatureCache
from .encode import Encode, load_corpus
from .measure import (
    CompileLog,
    bench_dir,
    device_name,
    peak_rss_mb,
    ratio,
    run_baseline,
    step_summary,
    summarize,
    time_steps,
    token_counts,
)
from .suite import Options, Suite
from .train_suites import TrainFixed, TrainReal
from .workloads import (
    BASELINE_LR,
    BASELINE_WEIGHT_DECAY,
    bench_config,
    bucket_batches,
    layer_params,
    load_real_train,
    matmul_gflops,
    matmul_gflops_apart,
    random_batch,
    step_flops,
    step_memory_mb,
    subset,
)

SUITES = {s.name: s for s in (TrainFixed, TrainReal, Encode, FeatureCache)}

__all__ = [
    "BASELINE_LR",
    "BASELINE_WEIGHT_DECAY",
    "SUITES",
    "CompileLog",
    "Encode",
    "FeatureCache",
    "Options",
    "Suite",
    "TrainFixed",
    "TrainReal",
    "bench_config",
    "bench_dir",
    "bucket_batches",
    "device_name",
    "layer_params",
    "load_corpus",
    "load_real_train",
    "matmul_gflops",
    "matmul_gflops_apart",
    "peak_rss_mb",
    "random_batch",
    "ratio",
    "run_baseline",
    "step_flops",
    "step_memory_mb",
    "step_summary",
    "subset",
    "summarize",
    "time_steps",
    "token_counts",
]
