"""Task 2: the two-headed model: a forward pass, probabilities per task, parameter counts."""

import argparse

import jax
import numpy as np

from mtl_jax.config import Config, ModelConfig, default_tasks
from mtl_jax.encoder import load_backbone, tokenize
from mtl_jax.inference import predict_tokenized
from mtl_jax.model import build_model, init_params, param_counts

SENTENCES = [
    "The detective found a clue in the locked room.",
    "What a wonderful, moving film.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="minilm", help="minilm | tiny | a BERT directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    config = Config(model=ModelConfig(backbone=args.model), tasks=default_tasks())
    backbone = load_backbone(args.model)
    model = build_model(config, backbone)
    params = init_params(model, jax.random.key(args.seed), backbone)

    for group, count in param_counts(params).items():
        print(f"{group:>16}: {count:,} parameters")
    tokenized = tokenize(backbone.tokenizer, SENTENCES, config.model.max_length)
    probs = predict_tokenized(model, params, tokenized)
    np.set_printoptions(precision=3, suppress=True)
    print("\nheads are untrained (random init): the probabilities carry no meaning yet")
    for i, sentence in enumerate(SENTENCES):
        print(sentence)
        for task in config.tasks:
            pairs = ", ".join(
                f"{lab} {p:.3f}" for lab, p in zip(task.labels, probs[task.name][i], strict=True)
            )
            print(f"  {task.name}: {pairs}")


if __name__ == "__main__":
    main()
