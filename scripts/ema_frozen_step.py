"""The cached heads-only train step with an EMA, frozen MiniLM backbone: the EMA over every
param against the EMA over the params that train (what ``make_optimizer`` builds).

A frozen group's EMA stays equal to the param, so tracking it is pure cost: 3 flops and
about 12 bytes of memory traffic per param per step, 23M params for MiniLM's backbone,
against a heads-only step of a few small matmuls. A/B alternating rounds in one process,
median milliseconds per step; prints one JSON line.

    .venv/bin/python scripts/ema_frozen_step.py --rounds 7 --steps 50
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np
import optax
from bench.measure import time_steps
from bench.workloads import random_batch

from mtl_jax import freezing
from mtl_jax.config import Config, ModelConfig, TrainConfig, default_tasks
from mtl_jax.ema import params_ema
from mtl_jax.encoder import load_backbone
from mtl_jax.features import cached_forward
from mtl_jax.model import build_model, init_params
from mtl_jax.train import build_train_step, create_train_state, init_train_params, jit_train_step

DECAY = 0.999


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm", help="minilm | tiny | a BERT directory")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=50, help="timed steps per round")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    train = TrainConfig(freeze="backbone", ema_decay=DECAY)
    model_cfg = ModelConfig(backbone=args.model, backbone_dropout=False)
    config = Config(model=model_cfg, tasks=default_tasks(), train=train)
    backbone = load_backbone(args.model)
    model = build_model(config, backbone)
    params = init_train_params(init_params(model, jax.random.key(0), backbone), config)
    no_ema = freezing.make_optimizer(TrainConfig(freeze="backbone"), params, total_steps=10**4)
    optimizers = {
        "every_param": optax.chain(no_ema, params_ema(DECAY)),  # tracked=None: all
        "trained_params": freezing.make_optimizer(train, params, total_steps=10**4),
    }
    forward = cached_forward(model, config)
    hidden = backbone.bert_config.hidden_size
    rng = np.random.default_rng(0)

    def batch():  # the benchmarks' random labels, a random cached embedding per row
        rows = random_batch(config, args.batch, seq=2, vocab=100, seed=int(rng.integers(1 << 30)))
        embedding = rng.standard_normal((args.batch, hidden)).astype(np.float32)
        return {"labels": rows["labels"], "index": rows["index"], "embedding": embedding}

    arms = {}
    for name, optimizer in optimizers.items():
        step = jit_train_step(build_train_step(forward, optimizer, config), forward.step_keys)
        state, _ = step(create_train_state(params, optimizer), batch(), jax.random.key(0))
        arms[name] = [step, jax.block_until_ready(state)]
    times: dict[str, list[float]] = {name: [] for name in arms}
    for r in range(args.rounds):
        for name in list(arms) if r % 2 == 0 else reversed(list(arms)):
            step, state = arms[name]
            batches = [batch() for _ in range(args.steps)]
            key = jax.random.key(r)
            state, total, _ = time_steps(
                lambda s, b, step=step, key=key: step(s, b, key), state, batches, sync=False
            )
            arms[name][1] = state
            times[name].append(total[0] / args.steps * 1e3)
    medians = {name: float(np.median(t)) for name, t in times.items()}
    print(
        json.dumps(
            {
                "model": args.model,
                "ms_per_step_median": {k: round(v, 3) for k, v in medians.items()},
                "ratio_every_over_trained": round(
                    medians["every_param"] / medians["trained_params"], 2
                ),
                "rounds_ms": {k: [round(x, 3) for x in t] for k, t in times.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
