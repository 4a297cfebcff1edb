"""Offline merges: one new PEFT adapter from several, with PEFT's `add_weighted_adapter`.

Combinations (PEFT's names): `cat` (ranks concatenated: exactly the weighted sum of the sources'
LoRA terms, rank sum r_i; what a request's `mix` computes at serving time), `linear` (A's and B's
averaged with sqrt(weight) each: sources of one rank, an approximation), `ties`, `dare_linear`,
`dare_ties` (task-arithmetic merges with `density`, the fraction of each source's weights kept).
The merged directory is an ordinary PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`)
plus a `training.json` recording the merge: combination, density, and each source's name,
directory, weight and weights-file sha256; the template and output contract carry over when every
source has the same one. `loraplex adapters add` then puts it in a package (parity with PyTorch
checked there).

Verification (default): on each source task's held-out examples (the eval split its training
recorded, or `eval_data`), the merged adapter and the source adapter alone both decode greedily in
PyTorch PEFT fp32, each prompt rendered with the source's template; both scores (the source's
training metric, and exact match) and their agreement (the share of examples answered with the same
tokens) are recorded beside the source in `training.json`: how much of each task the merge keeps.
Nothing is refused (a merge trades tasks by design). The package side (parity of the converted
file with PyTorch) is `adapters add`'s check.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from loraplex.adapters.export.peft_adapter import CONFIG_NAME, TRAINING_NAME, WEIGHTS_NAME, load_peft_adapter

COMBINATIONS = ("cat", "linear", "ties", "dare_linear", "dare_ties")
MERGED = "merged"


@dataclass(frozen=True)
class MergeSource:
    name: str
    path: Path  # a PEFT adapter directory
    weight: float


def merge_adapters(base_dir: str | Path, sources: list[MergeSource], out_dir: str | Path, *,
                   combination: str = "cat", density: float | None = None, verify: bool = True,
                   eval_data: dict[str, Path] | None = None, eval_examples: int = 64) -> Path:
    """Write the merge of `sources` (on the base model in `base_dir`) as a PEFT adapter in `out_dir`;
    with `verify`, score it and each source on that source's held-out examples (see the module doc)."""
    from loraplex.adapters.export.parity import TorchDecoder

    if combination not in COMBINATIONS:
        raise ValueError(f"combination {combination!r} is not one of {', '.join(COMBINATIONS)}")
    if len(sources) < 1 or len({s.name for s in sources}) != len(sources):
        raise ValueError("give one or more sources, each name once")
    needs_density = combination in ("ties", "dare_linear", "dare_ties")
    if needs_density and not (density is not None and 0 < density <= 1):
        raise ValueError(f"combination {combination!r} needs a density in (0, 1] (the fraction of weights kept)")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new directory")
    adapters = [load_peft_adapter(s.path) for s in sources]  # refuses a directory that is not a PEFT adapter
    if MERGED in {s.name for s in sources}:
        raise ValueError(f"a source may not be named {MERGED!r}")
    decoder = TorchDecoder(base_dir, None)
    for source in sources:
        decoder.load(source.name, source.path)
    peft_model = decoder.model
    options = {"density": density} if needs_density else {}
    try:
        peft_model.add_weighted_adapter([s.name for s in sources], [s.weight for s in sources], MERGED,
                                        combination_type=combination, **options)
    except (ValueError, TypeError) as exc:  # e.g. linear over sources of different ranks
        raise ValueError(f"PEFT cannot merge these adapters with {combination!r}: {exc}") from exc
    with tempfile.TemporaryDirectory(prefix=".loraplex-merge-") as tmp:
        peft_model.save_pretrained(tmp, selected_adapters=[MERGED], safe_serialization=True)
        saved = Path(tmp) / MERGED
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            shutil.move(str(saved / name), out_dir / name)
    record = _record(adapters, sources, combination, density)
    if verify:
        for entry, source, adapter in zip(record["merge"]["sources"], sources, adapters, strict=True):
            entry["accuracy"] = _task_scores(decoder, base_dir, source, adapter, (eval_data or {}).get(source.name),
                                             eval_examples)
    (out_dir / TRAINING_NAME).write_text(json.dumps(record, indent=2))
    return out_dir


def _task_scores(decoder, base_dir: str | Path, source: MergeSource, adapter, eval_data: Path | None,
                 limit: int) -> dict | None:
    """The source's and the merge's scores on the source's held-out examples (None: it has none)."""
    from loraplex.adapters.export import accuracy
    from transformers import AutoTokenizer

    found = accuracy.task_examples(adapter, eval_data, limit)
    if found is None:
        return None
    examples, where = found
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    prompts = [tokenizer.encode(e.prompt, add_special_tokens=False) for e in examples]
    budget = max(len(tokenizer.encode(e.completion, add_special_tokens=False)) for e in examples) + 2
    metric = accuracy.task_metric(adapter.task_metric)

    def decode(tokens: list[int]) -> str:
        return tokenizer.decode(tokens, skip_special_tokens=True)

    scores, predicted = {}, {}
    for side, name in (("source", source.name), ("merged", MERGED)):
        predicted[side] = [accuracy._prediction(t, decoder.eos_ids)
                           for t in decoder.greedy_many(prompts, name, budget)]
        scores[side] = accuracy._scores(predicted[side], examples, decode, metric)
    same = sum(a == b for a, b in zip(predicted["source"], predicted["merged"], strict=True))
    # agreement: the share of examples the merge answers with the source's very tokens
    return {"metric": metric, "examples": len(examples), "data": where, **scores, "agreement": same / len(examples)}


def _record(adapters, sources: list[MergeSource], combination: str, density: float | None) -> dict:
    """training.json of a merge: how it was made, and what carries over from its sources."""
    trainings = [a.training or {} for a in adapters]
    record: dict = {"merge": {
        "combination": combination, "density": density,
        "sources": [{"name": s.name, "path": str(s.path), "weight": s.weight,
                     "sha256": hashlib.sha256((s.path / WEIGHTS_NAME).read_bytes()).hexdigest()}
                    for s in sources],
    }}
    for key in ("base", "base_sha256", "template", "output"):
        values = [t.get(key) for t in trainings]
        if values[0] is not None and all(v == values[0] for v in values):
            record[key] = values[0]
    return record
