"""Data parallelism: mesh, batch and state shardings, multi-host start, bf16 compute.

Several devices are faked with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``,
which must be set before JAX starts, so the multi-device runs happen in subprocesses
(``tests/parallel_worker.py``): one with 4 devices, two forming a 2-process multi-host run
on localhost, then one with a single device. They share a persistent XLA compilation cache
(in ``.pytest_cache``) and compile at a low XLA optimisation level, as every run here is a
tiny model. Everything else runs in this process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mtl_jax import dots as mtl_dots
from mtl_jax import parallel
from mtl_jax.checkpoint import restore_params
from mtl_jax.config import Config, ParallelConfig, TrainConfig, default_tasks
from mtl_jax.config_io import apply_overrides
from mtl_jax.errors import UserError
from mtl_jax.forward import model_forward
from mtl_jax.freezing import make_optimizer
from mtl_jax.model import build_model
from mtl_jax.train import build_train_step, create_train_state

from conftest import make_fake_batch, replace_model
from parallel_worker import max_rel_diff

WORKER = Path(__file__).with_name("parallel_worker.py")
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
LAUNCH_ENV = (
    "JAX_COORDINATOR_ADDRESS",
    "JAX_COORDINATOR_BIND_ADDRESS",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
    "OMPI_MCA_orte_hnp_uri",
    "MEGASCALE_COORDINATOR_ADDRESS",
    "TPU_WORKER_HOSTNAMES",
    "TPU_PROCESS_ADDRESSES",
    "XLA_FLAGS",
)
TIMEOUT = 600


# -- config ---------------------------------------------------------------------------------


def test_parallel_section_round_trips_and_takes_overrides():
    config = Config(tasks=default_tasks())
    assert config.parallel == ParallelConfig(fsdp=False, distributed="auto")
    assert config.to_dict()["parallel"] == {"fsdp": False, "distributed": "auto"}
    changed = apply_overrides(config, ["parallel.fsdp=true", "parallel.distributed=off"])
    assert changed.parallel == ParallelConfig(fsdp=True, distributed="off")
    assert Config.from_dict(changed.to_dict()) == changed
    older = changed.to_dict()
    del older["parallel"]  # a config.json written before the section existed
    assert Config.from_dict(older).parallel == ParallelConfig()


def test_parallel_section_is_validated_with_key_names():
    with pytest.raises(UserError, match="parallel.distributed"):
        Config(tasks=default_tasks(), parallel=ParallelConfig(distributed="yes")).validate()
    with pytest.raises(UserError, match="parallel.fsdp"):
        apply_overrides(Config(tasks=default_tasks()), ["parallel.fsdp=3"])


def test_batch_sizes_must_split_over_devices():
    parallel.check_batch_sizes(8, 64, 4)
    with pytest.raises(UserError, match=r"'train.batch_size'.*multiple of the 4 devices.*got 6"):
        parallel.check_batch_sizes(6, 64, 4)
    with pytest.raises(UserError, match=r"'data.eval_batch_size'.*got 10"):
        parallel.check_batch_sizes(8, 10, 4)


# -- shardings --------------------------------------------------------------------------------


def test_fsdp_spec_shards_the_largest_divisible_dimension():
    assert parallel.fsdp_spec((32, 64), 4) == P(None, "data")
    assert parallel.fsdp_spec((64, 32), 4) == P("data")
    assert parallel.fsdp_spec((32, 32), 4) == P("data")  # ties: the first
    assert parallel.fsdp_spec((1002, 32), 4) == P(None, "data")  # 1002 does not split
    assert parallel.fsdp_spec((3, 5, 8), 4) == P(None, None, "data")
    assert parallel.fsdp_spec((5,), 4) == P()
    assert parallel.fsdp_spec((), 4) == P()
    assert parallel.fsdp_spec((64, 32), 1) == P()


def test_mesh_batch_and_state_on_this_process(tiny_config):
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data",) and mesh.size == jax.device_count()
    batch = make_fake_batch(tiny_config, batch=8)
    assert parallel.process_rows(8, mesh) == (0, 8)
    placed = parallel.shard_batch(batch, mesh)
    assert set(placed) == set(batch) and set(placed["labels"]) == set(batch["labels"])
    for host, dev in zip(jax.tree.leaves(batch), jax.tree.leaves(placed), strict=True):
        assert dev.sharding == parallel.batch_sharding(mesh)
        np.testing.assert_array_equal(np.asarray(dev), host)
    assert parallel.shard_batch(placed, mesh)["input_ids"] is placed["input_ids"]

    state = {"w": np.arange(12.0).reshape(4, 3), "step": np.int32(3)}
    for fsdp in (False, True):
        on_mesh = parallel.place_state(state, mesh, fsdp)
        jax.tree.map(np.testing.assert_array_equal, on_mesh, state)
        abstract = parallel.abstract_state(on_mesh, mesh, fsdp)
        assert abstract["w"].shape == (4, 3) and abstract["w"].sharding == on_mesh["w"].sharding
    copy = parallel.host_copy(on_mesh)
    assert isinstance(copy["w"], np.ndarray) and not np.shares_memory(copy["w"], state["w"])
    key = parallel.place_state(jax.random.key(0), mesh)
    assert jax.random.key_data(key).tolist() == jax.random.key_data(jax.random.key(0)).tolist()


# -- multi-host start -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "env", "expected"),
    [
        ("off", {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, False),
        ("on", {}, True),
        ("auto", {}, False),
        ("auto", {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
        ("auto", {"OMPI_MCA_orte_hnp_uri": "1234.0;tcp://10.0.0.1:5678"}, True),
        ("auto", {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1"}, False),
        ("auto", {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2"}, True),
        ("auto", {"TPU_WORKER_HOSTNAMES": "t0"}, False),
        ("auto", {"TPU_WORKER_HOSTNAMES": "t0,t1"}, True),
        ("auto", {"MEGASCALE_COORDINATOR_ADDRESS": "t0:8080"}, True),
    ],
)
def test_distributed_start_follows_flag_and_environment(flag, env, expected):
    assert parallel.wants_distributed(flag, env) is expected


def test_distributed_launch_arguments_from_environment():
    assert parallel.distributed_args({}) == {}
    env = {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert parallel.distributed_args(env) == {"num_processes": 2, "process_id": 1}
    with pytest.raises(UserError, match="JAX_PROCESS_ID"):
        parallel.distributed_args({"JAX_PROCESS_ID": "one"})
    with pytest.raises(UserError, match="parallel.distributed"):
        parallel.wants_distributed("maybe", {})


def test_single_process_run_stays_single_process(monkeypatch):
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    assert parallel.maybe_initialize_distributed("auto") is False
    assert parallel.maybe_initialize_distributed("off") is False
    assert not jax.distributed.is_initialized() and parallel.is_main_process()


# -- bf16 -------------------------------------------------------------------------------------


def _dot_dtypes(jaxpr) -> Counter:
    """``(operand dtypes, result dtype)`` of every dot_general, nested jaxprs included."""
    found: Counter = Counter()

    def walk(jp):
        for eqn in jp.eqns:
            if eqn.primitive.name == "dot_general":
                ins = tuple(str(v.aval.dtype) for v in eqn.invars)
                found[(ins, str(eqn.outvars[0].aval.dtype))] += 1
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        walk(sub)

    walk(jaxpr.jaxpr)
    return found


def test_bfloat16_computes_in_bf16_with_float32_params_and_optimizer(tiny_config, tiny_backbone):
    config = replace_model(tiny_config, dtype="bfloat16")
    config = Config(model=config.model, tasks=config.tasks, train=TrainConfig(freeze="none"))
    model = build_model(config, tiny_backbone)
    ids = jnp.ones((1, 8), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), ids, ids, ids)["params"]
    params = jax.tree.map(lambda x: getattr(x, "value", x), params)
    optimizer = make_optimizer(config.train, params, steps_per_epoch=10, total_steps=10)
    state = jax.eval_shape(lambda p: create_train_state(p, optimizer), params)
    batch = {k: v for k, v in make_fake_batch(config).items() if k != "index"}
    step = build_train_step(model_forward(model, config), optimizer, config)
    key = jax.random.key(1)

    new_state, _ = jax.eval_shape(step, state, batch, key)
    floats = {str(x.dtype) for x in jax.tree.leaves(new_state) if x.dtype.kind == "f"}
    assert floats == {"float32"}  # params and Adam moments stay float32
    dots = _dot_dtypes(jax.make_jaxpr(step)(state, batch, key))
    assert sum(dots.values()) > 20  # forward and backward of BERT and the heads
    bf16 = ("bfloat16", "bfloat16")
    if not mtl_dots.wanted("bfloat16"):
        assert set(dots) == {(bf16, "bfloat16")}
        return
    # CPU (mtl_jax.dots): BERT's dense layers multiply bf16 operands into float32 on the
    # BF16 unit, its activations (attention included) stay float32; the heads are bf16.
    assert dots[(bf16, "float32")] == 6 * model.n_layers
    assert (("float32", "float32"), "float32") in dots and (bf16, "bfloat16") in dots
    assert set(dots) <= {
        (bf16, "float32"),
        (bf16, "bfloat16"),
        (("float32", "float32"), "float32"),
        (("float32", "bfloat16"), "float32"),  # the dense layers' backward
    }


# -- several devices and processes (subprocesses) ---------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, cache: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in LAUNCH_ENV and not k.startswith("SLURM_")
    }
    root = str(Path(__file__).resolve().parents[1])
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST_XLA}",
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")])),
        **extra,
    )
    return env


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, str(WORKER), *args], env=env, stdout=out, stderr=subprocess.STDOUT
        )


def _finish(proc: subprocess.Popen, log: Path, what: str) -> None:
    try:
        code = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        code = "timeout"
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        pytest.fail(f"{what} failed ({code}):\n{tail}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, request) -> dict:
    """Results of every subprocess run (see tests/parallel_worker.py)."""
    out = tmp_path_factory.mktemp("parallel")
    store = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    cache = store.mkdir("xla-compilation-cache") if store else out / "xla-compilation-cache"
    port = str(_free_port())
    loopback = f"127.0.0.1:{port}"
    # Compiles are single-threaded: the 4-device run and the two hosts overlap on 2 cores.
    procs = {"devices4": _start(["devices4", str(out)], _env(4, cache), out / "devices4.log")}
    for i in (0, 1):
        env = _env(
            2,
            cache,
            JAX_COORDINATOR_ADDRESS=loopback,
            JAX_COORDINATOR_BIND_ADDRESS=loopback,  # never listen beyond localhost
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(i),
        )
        procs[f"host{i}"] = _start(["host", str(out), str(i)], env, out / f"host{i}.log")
    try:
        _finish(procs["devices4"], out / "devices4.log", "devices4")
        # One device, resuming what the 4-device run saved (while the hosts finish).
        procs["device1"] = _start(["device1", str(out)], _env(1, cache), out / "device1.log")
        for name in ("host0", "host1", "device1"):
            _finish(procs[name], out / f"{name}.log", name)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    results = {n: json.loads((out / f"{n}.json").read_text()) for n in procs}
    return {**results, "out": str(out)}


def _assert_losses_match(got, want, start: int = 0):
    assert len(got) == len(want) == 20
    np.testing.assert_allclose(got[start:], want[start:], rtol=1e-5)


@pytest.mark.slow
def test_four_devices_train_like_one(runs):
    four = runs["devices4"]
    assert four["ref1"]["devices"] == 1
    _assert_losses_match(four["rep4"]["losses"], four["ref1"]["losses"])
    assert four["rep4"]["param_specs"] == ["P()"]  # replicated by default
    assert set(four["rep4"]["eval"]) == {"genre", "sentiment"}  # sharded dev batches
    assert four["rep4"]["checkpoints"] == ["10", "20"]


@pytest.mark.slow
def test_fit_splits_each_batch_over_the_devices(runs):
    batch = runs["devices4"]["rep4"]["batch"]
    assert batch["spec"] == str(P("data")) and batch["shape"] == [8, 32]  # global batch
    assert batch["shard_rows"] == [2, 2, 2, 2]
    assert batch["label_shard_rows"] == [2, 2, 2, 2]


@pytest.mark.slow
def test_fsdp_shards_params_and_optimizer_and_trains_the_same(runs):
    fsdp = runs["devices4"]["fsdp4"]
    _assert_losses_match(fsdp["losses"], runs["devices4"]["ref1"]["losses"])
    assert fsdp["kernel_shape"] == [32, 64]
    assert fsdp["kernel_spec"] == str(P(None, "data"))
    assert fsdp["kernel_shard_shape"] == [32, 16]
    assert fsdp["sharded_leaves"] > fsdp["leaves"] // 2  # params and Adam moments
    assert fsdp["state_keeps_shardings"]  # the step's outputs keep the layout: no recompiles


@pytest.mark.slow
def test_checkpoint_of_four_devices_resumes_on_two(runs):
    resumed = runs["devices4"]["resume2"]
    assert resumed["devices"] == 2 and resumed["steps"] == 20
    _assert_losses_match(resumed["losses"], runs["devices4"]["rep4"]["losses"], start=10)


@pytest.mark.slow
def test_checkpoint_of_four_devices_resumes_on_one(runs):
    resumed = runs["device1"]
    assert resumed["steps"] == 20
    _assert_losses_match(resumed["losses"], runs["devices4"]["rep4"]["losses"], start=10)
    assert resumed["max_rel_param_diff"] < 1e-4


@pytest.mark.slow
def test_two_processes_train_like_one(runs):
    hosts = [runs["host0"], runs["host1"]]
    for i, host in enumerate(hosts):
        assert (host["process"], host["processes"]) == (i, 2)
        assert (host["devices"], host["local_devices"]) == (4, 2)
        assert host["main"] is (i == 0) and host["steps"] == 20
    assert [h["rows"] for h in hosts] == [[0, 4], [4, 8]]  # each its half of the batch
    # Only process 0 logs: one event per step, and the single-process trajectory.
    _assert_losses_match(hosts[0]["losses"], runs["devices4"]["ref1"]["losses"])
    # Its FSDP checkpoint (shards gathered across processes) restores here, on one device.
    host, meta = restore_params(Path(runs["out"]) / "host")
    final, _ = restore_params(Path(runs["out"]) / "rep4")
    assert meta["step"] == 20
    assert max_rel_diff(host, final) < 1e-4
