"""What both workloads share: a build step's done marker, package views, fixed-length prompts.

Every build step writes into its own directory under `bench/out/<workload key>/` and marks it done
last, so an interrupted run rebuilds only the step it was in.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

DONE = ".bench_done"


def done(path: Path) -> bool:
    """True when the build step writing `path` finished."""
    return (path / DONE).is_file()


def mark_done(path: Path) -> None:
    (path / DONE).write_text("ok\n")


def link(src: Path, dst: Path) -> None:
    """Hard link (a copy across file systems). Not a symlink: ONNX Runtime refuses external data
    that resolves outside the model's directory."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def package_view(full: Path, names: list[str], out: Path, *, link_banked: bool = True) -> Path:
    """A package holding `names` of `full`: links to its files, a trimmed manifest. Without
    `link_banked` the batched engine's graphs are left out (each view then writes its own)."""
    if done(out):
        return out
    from loraplex.adapters.package.manifest import ADAPTER_DIR, MANIFEST_NAME, Manifest

    manifest = Manifest.load(full)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for item in full.iterdir():
        banked = ".batched." in item.name
        if item.is_file() and item.name not in (MANIFEST_NAME, DONE) and (link_banked or not banked):
            link(item, out / item.name)
    (out / ADAPTER_DIR).mkdir()
    for name in names:
        link(full / manifest.adapters[name].file, out / manifest.adapters[name].file)
    manifest.adapters = {name: manifest.adapters[name] for name in names}
    manifest.save(out)
    mark_done(out)
    return out


def fixed_length_prompts(path: Path, base: Path, *, n_prompts: int, prompt_tokens: int, seed: int,
                         text: Callable[[random.Random], str]) -> tuple[list[str], list[list[int]]]:
    """`n_prompts` texts (from `text`, fed one seeded RNG) cut to exactly `prompt_tokens` tokens of
    `base`'s tokenizer, kept only when the cut text round-trips to the same ids: a gRPC client's
    text and an in-process peer's ids are then the same request. Cached in `path` (JSON)."""
    if path.is_file():
        data = json.loads(path.read_text())
        return data["prompts"], data["ids"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    rng = random.Random(seed)
    prompts: list[str] = []
    ids: list[list[int]] = []
    for _ in range(n_prompts * 50):
        if len(prompts) == n_prompts:
            break
        first = tokenizer.encode(text(rng), add_special_tokens=False)[:prompt_tokens]
        cut = tokenizer.decode(first)
        if tokenizer.encode(cut, add_special_tokens=False) == first and len(first) == prompt_tokens:
            prompts.append(cut)
            ids.append(first)
    if len(prompts) < n_prompts:
        raise RuntimeError("could not make prompts that round-trip through the tokenizer at the asked length")
    path.write_text(json.dumps({"prompts": prompts, "ids": ids}))
    return prompts, ids
