"""Per freezing strategy: trainable parameters, optimiser-state bytes and train-step time.

Builds the real model (MiniLM by default) with the `real` preset's tasks, the optimiser of
each strategy, and times a few jitted steps at batch 32 x 64 tokens on whatever device JAX
sees. Prints one JSON line per strategy, then a markdown table.
"""

import argparse
import dataclasses
import json
import time

import jax
import numpy as np
from bench import random_batch  # scripts/bench, beside this script

from mtl_jax.config import Config, ModelConfig, TrainConfig, default_tasks
from mtl_jax.encoder import load_backbone
from mtl_jax.freezing import freeze_schedule, make_optimizer, param_groups
from mtl_jax.model import build_model, init_params
from mtl_jax.train import create_train_state, make_train_step

STRATEGIES = ("all", "backbone", "head:genre", "top:2", "gradual", "none")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (0: no timing)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    args = parser.parse_args()

    base = Config(
        model=ModelConfig(backbone=args.model, backbone_dropout=False), tasks=default_tasks()
    )
    backbone = load_backbone(args.model)
    model = build_model(base, backbone)
    params = init_params(model, jax.random.key(0), backbone)
    batch = random_batch(base, args.batch, args.seq_len, backbone.bert_config.vocab_size)
    rows = []
    for strategy in STRATEGIES:
        train_cfg = TrainConfig(freeze=strategy, unfreeze_unit="steps", unfreeze_every=100)
        config = dataclasses.replace(base, train=train_cfg)
        optimizer = make_optimizer(train_cfg, params, steps_per_epoch=100, total_steps=1000)
        starts = freeze_schedule(train_cfg, params, steps_per_epoch=100)
        trainable = sum(
            int(np.size(x))
            for x, g in zip(
                jax.tree_util.tree_leaves(params),
                jax.tree_util.tree_leaves(param_groups(params)),
                strict=True,
            )
            if starts.get(g) is not None
        )
        opt_bytes = sum(
            int(np.prod(x.shape)) * x.dtype.itemsize
            for x in jax.tree_util.tree_leaves(jax.eval_shape(optimizer.init, params))
        )
        row = {
            "strategy": strategy,
            "trainable_params": trainable,
            "opt_state_mb": opt_bytes / 2**20,
        }
        if args.steps:
            state = create_train_state(params, optimizer)
            step = make_train_step(model, optimizer, config)
            key = jax.random.key(1)
            state, m = step(state, batch, key)  # compile
            jax.block_until_ready(m["loss"])
            times = []
            for _ in range(args.steps):
                t = time.perf_counter()
                state, m = step(state, batch, key)
                jax.block_until_ready(m["loss"])
                times.append(time.perf_counter() - t)
            row["step_s_median"] = float(np.median(times))
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(
        f"\n| strategy | trainable params | optimiser state | step time ({args.batch}x{args.seq_len}) |"
    )
    print("|---|---|---|---|")
    for r in rows:
        t = f"{r['step_s_median'] * 1000:.0f} ms" if "step_s_median" in r else "-"
        print(
            f"| `{r['strategy']}` | {r['trainable_params']:,} | {r['opt_state_mb']:.1f} MiB | {t} |"
        )


if __name__ == "__main__":
    main()
