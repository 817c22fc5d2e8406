"""Runs for tests/test_parallel.py in a fresh process (XLA_FLAGS must precede JAX's start).

``python tests/parallel_worker.py SCENARIO OUTDIR [ARGS]`` writes ``OUTDIR/<scenario>.json``:

* ``devices4``: 4 fake CPU devices. A 20-step run on a 1-device mesh (the reference), the
  same run on 4 devices (replicated, with dev evaluation and checkpoints at 10 and 20), with
  FSDP, and a resume of the 4-device run's step-10 checkpoint on a 2-device mesh.
* ``device1``: 1 device. Resume the 4-device run's step-10 checkpoint.
* ``host I``: process I of 2 (2 fake devices each), started by ``fit`` itself from
  ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``; FSDP over the 4
  global devices.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

STEPS = 20
BATCH = 8
# This bias's gradient is exactly zero in exact arithmetic (softmax ignores a shift shared by
# all keys), so Adam turns rounding noise into full-size steps: not comparable across layouts.
NOISE_ONLY = "['attention']['self']['key']['bias']"


def config(**train):
    from mtl_jax.config import Config, DataConfig, ModelConfig, TrainConfig, default_tasks

    return Config(
        # layer 1: one encoder layer (fast compiles); heads keep the default dropout.
        model=ModelConfig(backbone="tiny", max_length=32, layer=1),
        tasks=default_tasks(),
        data=DataConfig(
            synthetic_train_rows=STEPS * BATCH,
            length_buckets=(32,),  # one shape: one compile
            eval_batch_size=8,
        ),
        train=TrainConfig(
            freeze="none",  # train the backbone too: its params are the ones FSDP shards
            epochs=1,
            batch_size=BATCH,
            learning_rate=1e-3,
            log_every=1,
            eval_every=1000,
            checkpoint_every=10,
            **train,
        ),
    )


def with_parallel(cfg, **changes):
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, **changes))


def with_dev(cfg, rows):
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, synthetic_dev_rows=rows))


def train_losses(workdir) -> list[float]:
    from mtl_jax.metrics_log import read_metrics

    return [e["loss"] for e in read_metrics(workdir) if e["split"] == "train"]


def specs(tree) -> list[str]:
    import jax

    return [str(x.sharding.spec) for x in jax.tree.leaves(tree)]


def resume_from_step10(source: Path, workdir: Path) -> None:
    """A copy of ``source`` as it was after step 10: later checkpoints and events dropped."""
    shutil.copytree(source, workdir)
    for step_dir in (workdir / "checkpoints").iterdir():
        if step_dir.name.isdigit() and int(step_dir.name) > 10:
            shutil.rmtree(step_dir)
    shutil.rmtree(workdir / "best", ignore_errors=True)


def devices4(out: Path) -> dict:
    import jax

    from mtl_jax import parallel
    from mtl_jax.loop import fit

    assert jax.device_count() == 4, jax.devices()
    result: dict = {}
    base = config()

    ref = fit(base, out / "ref1", progress=False, mesh=parallel.make_mesh(jax.devices()[:1]))
    result["ref1"] = {
        "losses": train_losses(out / "ref1"),
        "devices": len(ref.state.step.devices()),
    }

    # Record what fit hands the train step: the batches after shard_batch.
    seen = []
    shard_batch = parallel.shard_batch

    def recording(batch, mesh):
        placed = shard_batch(batch, mesh)
        if not seen:
            ids = placed["input_ids"]
            seen.append(
                {
                    "spec": str(ids.sharding.spec),
                    "shape": list(ids.shape),
                    "shard_rows": [s.data.shape[0] for s in ids.addressable_shards],
                    "label_shard_rows": [
                        s.data.shape[0] for s in placed["labels"]["genre"].addressable_shards
                    ],
                }
            )
        return placed

    parallel.shard_batch = recording
    try:
        rep = fit(with_dev(base, 16), out / "rep4", progress=False)
    finally:
        parallel.shard_batch = shard_batch
    result["rep4"] = {
        "losses": train_losses(out / "rep4"),
        "batch": seen[0],
        "param_specs": sorted(set(specs(rep.state.params))),
        "eval": {t: s["accuracy"] for t, s in rep.eval.items()},
        "checkpoints": sorted(p.name for p in (out / "rep4" / "checkpoints").iterdir()),
    }

    fsdp_cfg = with_parallel(base, fsdp=True)
    fsdp = fit(fsdp_cfg, out / "fsdp4", progress=False)
    expected = parallel.state_shardings(fsdp.state, parallel.make_mesh(), fsdp=True)
    kernel = fsdp.state.params["backbone"]["encoder"]["layer"]["0"]["intermediate"]["dense"]
    result["fsdp4"] = {
        "losses": train_losses(out / "fsdp4"),
        "kernel_shape": list(kernel["kernel"].shape),
        "kernel_spec": str(kernel["kernel"].sharding.spec),
        "kernel_shard_shape": list(kernel["kernel"].addressable_shards[0].data.shape),
        "sharded_leaves": sum(
            any(axis is not None for axis in x.sharding.spec) for x in jax.tree.leaves(fsdp.state)
        ),
        "leaves": len(jax.tree.leaves(fsdp.state)),
        "state_keeps_shardings": all(
            x.sharding.is_equivalent_to(s, x.ndim)
            for x, s in zip(jax.tree.leaves(fsdp.state), jax.tree.leaves(expected), strict=True)
        ),
    }

    resume_from_step10(out / "rep4", out / "resume2")
    resumed = fit(base, out / "resume2", progress=False, mesh=parallel.make_mesh(jax.devices()[:2]))
    result["resume2"] = {
        "losses": train_losses(out / "resume2"),
        "steps": resumed.steps,
        "devices": len(resumed.state.step.devices()),
    }
    return result


def device1(out: Path) -> dict:
    import jax

    from mtl_jax.checkpoint import restore_params
    from mtl_jax.loop import fit

    assert jax.device_count() == 1, jax.devices()
    resume_from_step10(out / "rep4", out / "resume1")
    resumed = fit(config(), out / "resume1", progress=False)
    final, _ = restore_params(out / "rep4")
    return {
        "losses": train_losses(out / "resume1"),
        "steps": resumed.steps,
        "max_rel_param_diff": max_rel_diff(jax.device_get(resumed.state.params), final),
    }


def max_rel_diff(params, reference) -> float:
    """The largest per-array ``max|a - b| / max|b|``, skipping :data:`NOISE_ONLY` arrays."""
    import jax
    import numpy as np

    diffs = [
        float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))
        for (path, a), b in zip(
            jax.tree_util.tree_flatten_with_path(params)[0],
            jax.tree.leaves(reference),
            strict=True,
        )
        if NOISE_ONLY not in jax.tree_util.keystr(path)
    ]
    return max(diffs)


def host(out: Path, index: int) -> dict:
    import jax

    from mtl_jax import parallel
    from mtl_jax.loop import fit

    result = fit(with_parallel(config(), fsdp=True), out / "host", progress=False)
    return {
        "process": jax.process_index(),
        "processes": jax.process_count(),
        "devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "main": parallel.is_main_process(),
        "steps": result.steps,
        "losses": train_losses(out / "host"),
        "rows": list(parallel.process_rows(BATCH, parallel.make_mesh())),
    }


def main() -> None:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    started = time.perf_counter()
    if scenario == "devices4":
        result, name = devices4(out), scenario
    elif scenario == "device1":
        result, name = device1(out), scenario
    elif scenario == "host":
        index = int(sys.argv[3])
        result, name = host(out, index), f"host{index}"
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    result["seconds"] = round(time.perf_counter() - started, 1)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
