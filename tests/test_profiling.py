"""The step-range profiler: parsing, the exact jax.profiler calls, and one real trace."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from mtl_jax import profiling
from mtl_jax.errors import UserError
from mtl_jax.profiling import StepProfiler, parse_profile_range, profile_dir

from probes import traced_steps


def test_parse_profile_range():
    assert parse_profile_range("2:4") == (2, 4)
    assert parse_profile_range(" 10 : 20 ") == (10, 20)
    assert parse_profile_range("7:7") == (7, 7)


@pytest.mark.parametrize("bad", ["", "5", "2-4", "a:b", "-1:3", "2:4:6", "1.5:3", "3:"])
def test_parse_profile_range_names_the_flag_and_the_form(bad):
    with pytest.raises(UserError) as err:
        parse_profile_range(bad)
    message = str(err.value)
    assert message.startswith(f"--profile {bad!r}:") and "START:END" in message


def test_parse_profile_range_refuses_end_before_start():
    with pytest.raises(UserError, match=r"--profile '5:2': END must be >= START"):
        parse_profile_range("5:2")
    with pytest.raises(UserError, match=r"^--train-profile '5'"):
        parse_profile_range("5", flag="--train-profile")


def test_profile_dir_is_under_the_workdir(tmp_path):
    assert profile_dir(tmp_path) == str(tmp_path / "profile")


class _Recorder:
    """Stands in for jax.profiler: records start/stop and each annotation's span."""

    def __init__(self):
        self.calls: list[tuple] = []
        recorder = self

        class Annotation:
            def __init__(self, name, *, step_num):
                self.name, self.step_num = name, step_num

            def __enter__(self):
                recorder.calls.append(("enter", self.name, self.step_num))
                return self

            def __exit__(self, *exc):
                recorder.calls.append(("exit", self.name, self.step_num))

        self.StepTraceAnnotation = Annotation

    def start_trace(self, logdir):
        self.calls.append(("start", logdir))

    def stop_trace(self):
        self.calls.append(("stop",))


def _run_steps(profiler: StepProfiler, steps, trail: list) -> None:
    for step in steps:
        profiler.before(step)
        trail.append(("step", step))
        profiler.after(step, jnp.ones(()))
    profiler.close()


@pytest.fixture
def recorder(monkeypatch):
    fake = _Recorder()
    monkeypatch.setattr(profiling.jax, "profiler", fake)
    return fake


def test_profiler_traces_only_the_range_in_order(recorder):
    trail = recorder.calls
    _run_steps(StepProfiler(2, 4, "logs"), range(6), trail)
    assert trail == [
        ("step", 0),
        ("step", 1),
        ("start", "logs"),
        ("enter", "train", 2),
        ("step", 2),
        ("exit", "train", 2),
        ("enter", "train", 3),
        ("step", 3),
        ("exit", "train", 3),
        ("enter", "train", 4),
        ("step", 4),
        ("exit", "train", 4),
        ("stop",),
        ("step", 5),
    ]


def test_profiler_resumed_inside_the_range_and_closed_early(recorder):
    trail = recorder.calls
    _run_steps(StepProfiler(2, 9, "logs", name="bench"), [5, 6], trail)
    assert trail == [
        ("start", "logs"),
        ("enter", "bench", 5),
        ("step", 5),
        ("exit", "bench", 5),
        ("enter", "bench", 6),
        ("step", 6),
        ("exit", "bench", 6),
        ("stop",),  # from close(): the loop ended before step 9
    ]


def test_profiler_never_restarts(recorder):
    profiler = StepProfiler(1, 1, "logs")
    for step in (0, 1, 2, 0, 1, 2):  # a second pass over the range traces nothing
        with profiler.step(step):
            recorder.calls.append(("step", step))
    profiler.close()
    traced = [c for c in recorder.calls if c[0] != "step"]
    assert traced == [("start", "logs"), ("enter", "train", 1), ("exit", "train", 1), ("stop",)]
    assert profiler.done and not profiler.active


def test_profiler_as_context_manager_stops_the_trace_on_error(recorder):
    profiler = StepProfiler(0, 5, "logs")
    with pytest.raises(RuntimeError, match="step failed"), profiler, profiler.step(0):
        raise RuntimeError("step failed")
    assert recorder.calls == [
        ("start", "logs"),
        ("enter", "train", 0),
        ("exit", "train", 0),
        ("stop",),
    ]


def test_profiler_rejects_a_bad_range():
    with pytest.raises(ValueError, match="0 <= start <= end"):
        StepProfiler(4, 2, "logs")


def test_real_trace_of_a_jitted_loop_holds_only_the_range(tmp_path):
    step_fn = jax.jit(lambda x: jnp.tanh(x @ x) + 1.0)
    x = jnp.ones((32, 32))
    logdir = tmp_path / "profile"
    with StepProfiler(2, 4, logdir) as profiler:
        for step in range(6):
            profiler.before(step)
            x = step_fn(x)
            profiler.after(step, x)
            assert profiler.active == (2 <= step < 4)
    (xplane,) = logdir.glob("plugins/profile/*/*.xplane.pb")
    assert xplane.stat().st_size > 0
    assert list(xplane.parent.glob("*.trace.json.gz"))  # the Perfetto-readable copy
    assert traced_steps(logdir) == [2, 3, 4]
