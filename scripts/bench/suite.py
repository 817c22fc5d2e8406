"""What every suite shares: the options of ``scripts/benchmark.py``, the suite base class
(with the ``--profile`` step profiler) and the parts of a training run."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from mtl_jax.config import Config
from mtl_jax.config_io import apply_overrides
from mtl_jax.freezing import backbone_trainable, make_optimizer
from mtl_jax.model import build_model, init_params
from mtl_jax.profiling import StepProfiler
from mtl_jax.train import create_train_state, init_train_params

from .measure import CompileLog, device_name
from .workloads import bench_config


@dataclasses.dataclass
class Options:
    """What ``scripts/benchmark.py`` asks for (one object, so suites share one signature)."""

    backbone: str = "minilm"
    freeze: str = "none"
    backbone_eval: bool = False
    dtype: str = "float32"
    remat: bool = False
    remat_min_length: int = 64
    batch_size: int = 32
    seq_lens: tuple[int, ...] = (64, 128)
    max_length: int = 128
    buckets: tuple[int, ...] | None = None
    steps: int = 12
    warmup: int = 3
    repeats: int = 3
    encode_batch: int = 64
    data_dir: str | None = None
    cache_rows: int = 1024
    cache_epochs: int = 3
    sync: bool = True
    step_over_forward: bool = False  # frozen train-real: also time a forward-only pass
    step_memory: bool = False  # train-real: XLA's memory account of the longest step
    cached: bool = False  # frozen train-real: heads from cached embeddings (mtl-jax train's way)
    seed: int = 0
    profile: tuple[int, int] | None = None  # (start, end) steps, see Suite.profiled
    profile_dir: str = "runs/profile"
    overrides: tuple[str, ...] = ()  # --set KEY=VALUE: config settings the flags do not name

    def config(self, **overrides: Any) -> Config:
        """:func:`bench_config` of these options, with a suite's own ``overrides``."""
        settings = {
            "backbone": self.backbone,
            "freeze": self.freeze,
            "backbone_eval": self.backbone_eval,
            "dtype": self.dtype,
            "remat": self.remat,
            "remat_min_length": self.remat_min_length,
            "max_length": self.max_length,
            "batch_size": self.batch_size,
            "buckets": self.buckets,
            "data_dir": self.data_dir,
        }
        config = bench_config(**{**settings, **overrides})
        return apply_overrides(config, list(self.overrides)).validate()


class Suite:
    """A workload built (and compiled) once, measured any number of rounds.

    With ``opts.profile`` set, the suite's step is traced over that range of its calls
    (:meth:`profiled`) into ``<opts.profile_dir>/<suite name>``.
    """

    name = ""
    step_name = "train"  # the step annotation in the trace

    def __init__(self, opts: Options, backbone: Any, log: CompileLog, peak_gflops: float):
        self.opts, self.backbone, self.log, self.peak = opts, backbone, log, peak_gflops
        self.profiler = None
        self.calls = 0
        if opts.profile is not None:
            logdir = os.path.join(opts.profile_dir, self.name)
            self.profiler = StepProfiler(*opts.profile, logdir, name=self.step_name)

    def profiled(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` with its calls counted from 0 (compile steps first, then every round's
        warm-up and timed steps) and those in ``--profile``'s range traced.

        The profiler waits for the last traced call's result, so that step's timing
        includes the wait (and the trace stop); a profiled run is for the trace, not the
        numbers.
        """
        if self.profiler is None:
            return fn
        profiler = self.profiler

        def run(*args: Any) -> Any:
            step, self.calls = self.calls, self.calls + 1
            profiler.before(step)
            out = fn(*args)
            profiler.after(step, out)
            return out

        return run

    def close(self) -> None:
        """Stop a trace still open (the suite ran fewer steps than ``--profile``'s END)."""
        if self.profiler is not None:
            self.profiler.close()

    def measure(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _common(self, config: Config) -> dict[str, Any]:
        return {
            "model": self.opts.backbone,
            "dtype": config.model.dtype,
            "remat": config.model.remat,
            "remat_min_length": config.model.remat_min_length,
            "backbone_dropout": config.model.backbone_dropout,
            "overrides": list(self.opts.overrides),
            "device": device_name(),
            "peak_gflops": self.peak,
        }

    def _mfu(self, flops: float, seconds: float) -> float:
        return flops / seconds / (self.peak * 1e9)


def train_parts(config: Config, backbone: Any, seed: int):
    """Model, params, optimiser and train state as the fit loop builds them."""
    model = build_model(config, backbone)
    params = init_train_params(init_params(model, jax.random.key(seed), backbone), config)
    optimizer = make_optimizer(config.train, params, total_steps=1)
    return model, params, optimizer, create_train_state(params, optimizer)


def without_weights(backbone: Any) -> Any:
    """The backbone without its host weights: once the train state holds them (a copy on
    the device), the fit loop keeps no other; a suite that did would measure 90 MB (MiniLM)
    more peak RSS than ``mtl-jax train`` holds."""
    return dataclasses.replace(backbone, params=None)


def head_params(params: Any) -> int:
    """Parameter count of all heads (for the FLOP count)."""
    return int(sum(np.size(x) for x in jax.tree.leaves(params["heads"])))


def step_mode(config: Config) -> str:
    """The :func:`step_flops` mode of a config's train step."""
    return "train_full" if backbone_trainable(config.train) else "train_frozen"
