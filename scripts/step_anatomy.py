"""What the compiled train step contains: ops, fusions, scatters, dot dtypes, copies.

    python scripts/step_anatomy.py --backbone tiny --batch 32 --seq-len 64 [--dtype bfloat16]

Lowers and compiles the full fine-tuning step at one fixed shape and counts, in XLA's
optimised HLO: instructions by opcode, fusions, scatter ops (the embedding gradients),
the result element type of every dot (in bfloat16 mode every matmul should be bf16), copies,
and how many donated state buffers XLA aliased to outputs (a donated buffer not aliased
is copied). Prints one JSON line; ``--hlo FILE`` also writes the HLO text.
"""

from __future__ import annotations

import argparse
import collections
import json
import re

import jax
import numpy as np

from mtl_jax.config import Config, ModelConfig, TrainConfig, default_tasks
from mtl_jax.encoder import load_backbone
from mtl_jax.forward import model_forward
from mtl_jax.freezing import make_optimizer
from mtl_jax.model import build_model, init_params
from mtl_jax.train import build_train_step, create_train_state, step_inputs

OPCODE = re.compile(r"=\s*([a-z0-9\[\],{}() ]*?)\s*([a-z][a-z0-9-]*)\(")
DOT = re.compile(r"=\s*(\w+)\[[^\]]*\](?:\{[^}]*\})?\s+dot\(")


def _batch(config: Config, batch: int, seq: int, vocab: int) -> dict:
    rng = np.random.default_rng(0)
    ids = rng.integers(5, vocab, size=(batch, seq)).astype(np.int32)
    labels = {t.name: rng.integers(0, t.num_labels, batch).astype(np.int32) for t in config.tasks}
    return {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "token_type_ids": np.zeros_like(ids),
        "labels": labels,
    }


def anatomy(hlo: str) -> dict:
    """Counts of the optimised HLO text of one compiled program."""
    opcodes = collections.Counter()
    for line in hlo.splitlines():
        line = line.strip()
        if "=" not in line or line.startswith(("HloModule", "//", "ROOT tuple")):
            continue
        match = OPCODE.search(line)
        if match:
            opcodes[match.group(2)] += 1
    dots = collections.Counter(DOT.findall(hlo))  # by result element type
    header = hlo.split("\n", 1)[0]
    aliased = header.count("may-alias") + header.count("must-alias")
    return {
        "instructions": sum(opcodes.values()),
        "fusions": opcodes["fusion"],
        "scatters": opcodes["scatter"],
        "copies": opcodes["copy"],
        "dots_by_dtype": dict(dots),
        "aliased_outputs": aliased,
        "top_opcodes": dict(opcodes.most_common(12)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--hlo", default="", help="write the optimised HLO text here")
    args = parser.parse_args()

    config = Config(
        model=ModelConfig(backbone=args.backbone, max_length=args.seq_len, dtype=args.dtype),
        tasks=default_tasks(),
        train=TrainConfig(freeze="none", batch_size=args.batch),
    )
    backbone = load_backbone(args.backbone)
    model = build_model(config, backbone)
    params = init_params(model, jax.random.key(0), backbone)
    optimizer = make_optimizer(config.train, params, total_steps=100)
    state = create_train_state(params, optimizer)
    step = build_train_step(model_forward(model, config), optimizer, config)
    batch = step_inputs(_batch(config, args.batch, args.seq_len, backbone.bert_config.vocab_size))
    lowered = jax.jit(step, donate_argnums=0).lower(state, batch, jax.random.key(1))
    hlo = lowered.compile().as_text()
    if args.hlo:
        with open(args.hlo, "w", encoding="utf-8") as f:
            f.write(hlo)
    report = anatomy(hlo)
    # What the program asks for, before XLA's passes (which may upcast dots on CPU).
    requested = re.findall(r"stablehlo.dot_general.*->\s*tensor<[0-9x]*x?(\w+)>", lowered.as_text())
    report["requested_dots_by_dtype"] = dict(collections.Counter(requested))
    report["donated_state_buffers"] = len(jax.tree.leaves(state))
    report["backend"] = jax.default_backend()
    report.update(backbone=args.backbone, batch=args.batch, seq_len=args.seq_len, dtype=args.dtype)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
