"""The three built-in demo tasks: generated, small, and visibly different per adapter.

`python -m loraplex.trainer.demo_tasks` regenerates the shipped files in `demo_data/`
(a few hundred JSONL records each, fixed seed; a test checks they are current).
`demo_data/tasks.yaml` (templates and the hyper-parameters that meet the demo's accuracy
targets) is written by hand.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

DATA_DIR = Path(__file__).parent / "demo_data"

POSITIVE = ["great", "wonderful", "excellent", "lovely", "superb", "delightful", "brilliant", "charming"]
NEGATIVE = ["awful", "terrible", "boring", "dreadful", "horrible", "dull", "poor", "disappointing"]
SUBJECTS = ["movie", "book", "meal", "show", "hotel", "concert", "game", "album"]
NOUNS = [
    "apple", "river", "stone", "cloud", "tiger", "piano", "garden", "window", "candle", "rocket",
    "forest", "mirror", "bridge", "castle", "planet", "violin", "island", "lemon", "tunnel", "anchor",
]
TRANSLATION = {
    "cat": "chat", "dog": "chien", "house": "maison", "water": "eau", "bread": "pain", "sun": "soleil",
    "moon": "lune", "tree": "arbre", "book": "livre", "car": "voiture", "red": "rouge", "blue": "bleu",
    "green": "vert", "black": "noir", "white": "blanc", "big": "grand", "small": "petit", "night": "nuit",
    "day": "jour", "milk": "lait", "cheese": "fromage", "sea": "mer", "fire": "feu", "friend": "ami",
}

TASKS = {
    "sentiment": {"prompt": "Review: {text}\nSentiment:", "completion": " {label}"},
    "reverse": {"prompt": "Reverse: {words}\nOutput:", "completion": " {reversed}"},
    "translate": {"prompt": "English: {text}\nFrench:", "completion": " {french}"},
}


def sentiment(n: int, rng: random.Random) -> list[dict[str, str]]:
    records = []
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        adjective = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
        text = f"the {rng.choice(SUBJECTS)} was {adjective}"
        records.append({"text": text, "label": label})
    return records


def reverse(n: int, rng: random.Random) -> list[dict[str, str]]:
    records = []
    for _ in range(n):
        words = rng.sample(NOUNS, 3)
        records.append({"words": " ".join(words), "reversed": " ".join(reversed(words))})
    return records


def translate(n: int, rng: random.Random) -> list[dict[str, str]]:
    records = []
    english = sorted(TRANSLATION)
    for _ in range(n):
        words = rng.sample(english, rng.choice([1, 2]))
        records.append({"text": " ".join(words), "french": " ".join(TRANSLATION[w] for w in words)})
    return records


GENERATORS = {"sentiment": sentiment, "reverse": reverse, "translate": translate}


def generate(task: str, n: int = 400, seed: int = 0) -> list[dict[str, str]]:
    return GENERATORS[task](n, random.Random(f"{task}-{seed}"))


def corpus() -> Iterator[str]:
    """Every template and word the demo tasks use, for training the tiny tokenizer."""
    for spec in TASKS.values():
        yield spec["prompt"] + spec["completion"]
    words = POSITIVE + NEGATIVE + SUBJECTS + NOUNS + list(TRANSLATION) + list(TRANSLATION.values())
    for word in words + ["positive", "negative", "the", "was"]:
        yield f" {word} {word}\n{word}"


def write(data_dir: Path = DATA_DIR) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    for task in TASKS:
        with open(data_dir / f"{task}.jsonl", "w") as f:
            for record in generate(task):
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    write()
