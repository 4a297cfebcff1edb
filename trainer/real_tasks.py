"""Three tasks where a pretrained model's generalisation shows: the real-model demo and tests.

Each task draws training records from one pool of wording (subjects, phrases, names, templates)
and evaluation records from a disjoint pool, so the eval set measures what the adapter
generalises to, not what it memorised:
- `review_sentiment`: a short review of anything -> " positive" / " negative" (a label task);
- `extract_contact`: a sentence naming a person and a city -> a JSON object with both;
- `polite_rewrite`: an imperative request -> the same request as a polite question.
Generated with a fixed seed; `write(out_dir)` writes `<task>.jsonl` (training) and
`<task>.eval.jsonl` (unseen wording) for each.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

TEMPLATES = {
    "review_sentiment": {"prompt": "Review: {text}\nSentiment:", "completion": " {label}"},
    "extract_contact": {"prompt": "Extract the person and the city as JSON.\nText: {text}\nJSON:",
                        "completion": " {json}"},
    "polite_rewrite": {"prompt": "Rewrite as a polite request.\nRequest: {request}\nPolite:",
                       "completion": " {polite}"},
}

# (training pool, evaluation pool) for every slot of every task.
SUBJECTS = (["movie", "restaurant", "phone", "hotel", "novel", "laptop", "concert", "coffee shop", "headphones",
             "museum", "sofa", "video game", "haircut", "taxi ride", "camera", "gym", "bakery", "airline"],
            ["blender", "theme park", "tablet", "ramen bar", "bicycle", "TV series", "backpack", "smartwatch"])
PRAISE = (["was fantastic", "exceeded my expectations", "was worth every penny", "made my day", "works perfectly",
           "was wonderful from start to finish", "left me very happy", "was surprisingly good", "was superb"],
          ["blew me away", "is a joy to use", "deserves five stars", "was a pleasant surprise",
           "was simply delightful"])
COMPLAINTS = (["was a complete waste of money", "broke after two days", "was terribly slow", "let me down badly",
               "was boring from start to finish", "left me very disappointed", "stopped working within a week",
               "was overpriced and bland", "was awful"],
              ["was a nightmare", "fell apart quickly", "was not worth it at all", "made me regret buying it",
               "was mediocre at best"])
REVIEW_FORMS = (["The {s} {p}.", "Honestly, the {s} {p}.", "I think the {s} {p}.", "Our {s} {p}!",
                 "Overall the {s} {p}.", "To be honest, this {s} {p}."],
                ["Last weekend the {s} {p}.", "In short: the {s} {p}.", "My sister said the {s} {p}, and I agree."])
NAMES = (["Maria", "James", "Aisha", "Chen", "Lukas", "Sofia", "Omar", "Priya", "Mateo", "Hannah", "Kenji", "Fatima",
          "Oliver", "Ines", "Grace", "Tomas", "Leila", "Samuel", "Yuki", "Nadia"],
         ["Beatriz", "Henrik", "Amara", "Felix", "Mei", "Joaquin", "Elif", "Patrick"])
CITIES = (["Paris", "Lisbon", "Tokyo", "Nairobi", "Toronto", "Berlin", "Madrid", "Sydney", "Cairo", "Seoul", "Chicago",
           "Oslo", "Lima", "Dublin", "Prague", "Vienna"],
          ["Marseille", "Helsinki", "Osaka", "Accra", "Vancouver", "Porto", "Krakow", "Hanoi"])
CONTACT_FORMS = (["{n} lives in {c}.", "My friend {n} moved to {c} last year.", "Yesterday {n} flew to {c}.",
                  "{n} was born in {c} and still works there.", "In {c}, {n} opened a small bakery.",
                  "We met {n} at a conference in {c}.", "{n} is studying music in {c}."],
                 ["Next month {n} will give a talk in {c}.", "Everyone in {c} knows {n}.",
                  "According to the letter, {n} now teaches chemistry in {c}."])
ACTIONS = (["send me the report", "close the window", "call the client", "book a table for two", "check the invoice",
            "water the plants", "update the schedule", "print the slides", "lock the office", "order more paper",
            "fix the login page", "email the team", "clean the kitchen", "answer the phone", "sign the contract",
            "bring the keys", "copy the files", "feed the cat", "charge the laptop", "rename the folder"],
           ["review my draft", "move the meeting to Friday", "reset my password", "pick up the parcel",
            "share the photos", "turn off the heater", "wake me at seven", "return the library books"])
# request form -> polite form (`{n}`: someone addressed by name)
REQUEST_FORMS = (["{a}.", "{a} now.", "{a} today.", "{n}, {a}."], ["{a} soon.", "{a} right away.", "{n}, {a} please."])
POLITE_FORMS = {"{a}.": "Could you please {a}?", "{a} now.": "Could you please {a} now?",
                "{a} today.": "Could you please {a} today?", "{n}, {a}.": "{n}, could you please {a}?",
                "{a} soon.": "Could you please {a} soon?", "{a} right away.": "Could you please {a} right away?",
                "{n}, {a} please.": "{n}, could you please {a}?"}


def _pool(options: tuple[list[str], list[str]], fresh: bool) -> list[str]:
    return options[1] if fresh else options[0]


def review_sentiment(rng: random.Random, fresh: bool) -> dict[str, str]:
    label = rng.choice(["positive", "negative"])
    phrase = rng.choice(_pool(PRAISE if label == "positive" else COMPLAINTS, fresh))
    form = rng.choice(_pool(REVIEW_FORMS, fresh))
    return {"text": form.format(s=rng.choice(_pool(SUBJECTS, fresh)), p=phrase), "label": label}


def extract_contact(rng: random.Random, fresh: bool) -> dict[str, str]:
    name, city = rng.choice(_pool(NAMES, fresh)), rng.choice(_pool(CITIES, fresh))
    text = rng.choice(_pool(CONTACT_FORMS, fresh)).format(n=name, c=city)
    return {"text": text, "json": json.dumps({"name": name, "city": city})}


def polite_rewrite(rng: random.Random, fresh: bool) -> dict[str, str]:
    action, form = rng.choice(_pool(ACTIONS, fresh)), rng.choice(_pool(REQUEST_FORMS, fresh))
    name = rng.choice(_pool(NAMES, fresh))
    request = form.format(a=action, n=name)
    return {"request": request[0].upper() + request[1:], "polite": POLITE_FORMS[form].format(a=action, n=name)}


GENERATORS: dict[str, Callable[[random.Random, bool], dict[str, str]]] = {
    "review_sentiment": review_sentiment,
    "extract_contact": extract_contact,
    "polite_rewrite": polite_rewrite,
}


def generate(task: str, count: int, *, fresh: bool = False, seed: int = 0) -> list[dict[str, str]]:
    """`count` distinct records of `task` from the training pool (or, `fresh`, the evaluation pool)."""
    rng = random.Random(f"{task}-{'eval' if fresh else 'train'}-{seed}")
    records: list[dict[str, str]] = []
    seen: set[str] = set()
    for _ in range(count * 50):
        record = GENERATORS[task](rng, fresh)
        key = json.dumps(record, sort_keys=True)
        if key not in seen:
            seen.add(key)
            records.append(record)
        if len(records) == count:
            return records
    raise ValueError(f"task {task!r} has fewer than {count} distinct {'eval' if fresh else 'training'} records")


def write(out_dir: str | Path, *, train: int = 240, eval: int = 60, seed: int = 0) -> dict[str, tuple[Path, Path]]:
    """Write every task's training and evaluation JSONL files; returns {task: (train file, eval file)}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for task in GENERATORS:
        paths = (out_dir / f"{task}.jsonl", out_dir / f"{task}.eval.jsonl")
        for path, records in zip(paths, (generate(task, train, seed=seed), generate(task, eval, fresh=True, seed=seed)),
                                 strict=True):
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
        files[task] = paths
    return files
