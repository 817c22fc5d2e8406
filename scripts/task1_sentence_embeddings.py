"""Task 1: sentence embeddings from MiniLM's second-to-last layer, and their similarities."""

import argparse

import numpy as np

from mtl_jax.inference import SentenceEncoder, cosine_similarity

SENTENCES = [
    "The detective examined the bloodstain by the window.",
    "An inspector questioned the suspect about the murder.",
    "The spaceship drifted toward a red planet.",
    "Robots repaired the hull of the orbiting station.",
    "She read his love letter twice and smiled.",
    "This movie is a delight from start to finish.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="minilm", help="minilm | tiny | a BERT directory")
    parser.add_argument("--layer", type=int, default=-2)
    parser.add_argument("--pooling", default="mean", choices=("mean", "cls", "max"))
    args = parser.parse_args()

    encoder = SentenceEncoder.load(args.model, layer=args.layer, pooling=args.pooling)
    result = encoder.embed(SENTENCES)
    print(f"embeddings: {result.embeddings.shape} (layer {args.layer}, {args.pooling} pooling)")
    sims = cosine_similarity(result.embeddings, result.embeddings)
    np.set_printoptions(precision=2, suppress=True, linewidth=120)
    for i, sentence in enumerate(SENTENCES):
        row = " ".join(f"{s:5.2f}" for s in sims[i])
        print(f"{row}  {sentence}")


if __name__ == "__main__":
    main()
