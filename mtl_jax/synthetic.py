"""Built-in synthetic data: sentences whose words really carry a genre and a sentiment.

The main job of a fresh clone (no ``../shared`` data) trains on this. Each sentence mixes
genre cue words, one sentiment cue and neutral filler, so a model can learn both tasks but
not trivially (cues are shared between some genres, and a few labels are flipped).
"""

from __future__ import annotations

import numpy as np

GENRE_CUES: dict[str, tuple[str, ...]] = {
    "adventure": ("river", "jungle", "map", "treasure", "ship", "storm", "mountain", "rifle"),
    "humor": ("joke", "clown", "silly", "laughed", "prank", "grin", "pie", "tickled"),
    "mystery": ("detective", "clue", "murder", "alibi", "suspect", "inspector", "poison", "safe"),
    "romance": ("kiss", "heart", "wedding", "lover", "darling", "roses", "embrace", "letter"),
    "science_fiction": (
        "robot",
        "planet",
        "laser",
        "galaxy",
        "android",
        "rocket",
        "alien",
        "orbit",
    ),
}
SENTIMENT_CUES: dict[str, tuple[str, ...]] = {
    "negative": ("awful", "dull", "terrible", "boring", "painful", "weak", "tedious", "bad"),
    "positive": (
        "wonderful",
        "great",
        "delightful",
        "brilliant",
        "moving",
        "good",
        "superb",
        "fun",
    ),
}
FILLER = (
    "the",
    "a",
    "and",
    "then",
    "she",
    "he",
    "they",
    "was",
    "were",
    "saw",
    "found",
    "near",
    "old",
    "night",
    "morning",
    "house",
    "town",
    "road",
    "with",
    "of",
    "in",
    "story",
    "it",
    "felt",
    "seemed",
    "very",
    "quite",
    "long",
    "small",
    "door",
    "window",
    "after",
    "before",
)


def vocabulary() -> list[str]:
    """Every word the generator can emit (the tiny backbone's WordPiece vocabulary)."""
    words = list(FILLER)
    for cues in (*GENRE_CUES.values(), *SENTIMENT_CUES.values()):
        words += list(cues)
    return sorted(set(words))


def make_rows(n: int, seed: int, label_noise: float = 0.05) -> list[dict[str, str]]:
    """``n`` rows ``{"text", "genre", "sentiment"}``, deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    genres = sorted(GENRE_CUES)
    sentiments = sorted(SENTIMENT_CUES)
    rows = []
    for _ in range(n):
        genre = genres[rng.integers(len(genres))]
        sentiment = sentiments[rng.integers(len(sentiments))]
        words = list(rng.choice(FILLER, size=rng.integers(4, 12)))
        words += list(rng.choice(GENRE_CUES[genre], size=rng.integers(1, 3)))
        if rng.random() < 0.3:  # a distracting cue from another genre
            other = genres[rng.integers(len(genres))]
            words.append(rng.choice(GENRE_CUES[other]))
        words.append(rng.choice(SENTIMENT_CUES[sentiment]))
        rng.shuffle(words)
        if rng.random() < label_noise:
            genre = genres[rng.integers(len(genres))]
        if rng.random() < label_noise:
            sentiment = sentiments[rng.integers(len(sentiments))]
        rows.append({"text": " ".join(words) + ".", "genre": genre, "sentiment": sentiment})
    return rows


def write_tsv(path, rows: list[dict[str, str]]) -> None:
    """Write rows as the TSV format the data readers take (header: the first row's keys,
    by default text, genre, sentiment)."""
    import csv

    fieldnames = list(rows[0]) if rows else ["text", "genre", "sentiment"]
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames, delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
