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

Not yet: checking the merged adapter on each source task's held-out examples (as `export` checks an
adapter on its own task); `add` verifies parity, and accuracy only when the merge records one task.
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
                   combination: str = "cat", density: float | None = None) -> Path:
    """Write the merge of `sources` (on the base model in `base_dir`) as a PEFT adapter in `out_dir`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

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
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), torch_dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, str(sources[0].path), adapter_name=sources[0].name)
    for source in sources[1:]:
        peft_model.load_adapter(str(source.path), adapter_name=source.name)
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
    (out_dir / TRAINING_NAME).write_text(json.dumps(_record(adapters, sources, combination, density), indent=2))
    return out_dir


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
