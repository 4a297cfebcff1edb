"""The random part's workload: a mid-size random-init Llama, random rank-16 adapters, exported packages.

Everything is built locally (no hub) and cached under `bench/out/<key>/`, where the key hashes
the workload's configuration: a second run with the same configuration reuses the model, the
PEFT adapters, the packages and the prompts. Random weights are fine for speed; the adapters'
B matrices are non-zero so every LoRA branch does real work and changes the output.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loraplex.trainer.base_model import target_modules_for
from loraplex.trainer.tiny_base import DEFAULT_SHAPE

from bench.paths import OUT_ROOT
from bench.workloads.cache import done, fixed_length_prompts, mark_done, package_view

log = logging.getLogger("bench.workloads.random_llama")

PROJECTIONS = target_modules_for("llama")  # all attention and MLP projections

# About 78M parameters with the bench tokenizer: shapes far larger than the tests' tiny base, yet cheap
# to build and export with 32 adapters on a small machine.
FULL_SHAPE = dict(
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=4,
    max_position_embeddings=512,
)
# --quick: the tests' tiny shape, for developing the bench itself.
QUICK_SHAPE = dict(DEFAULT_SHAPE)


@dataclass(frozen=True)
class Workload:
    """What is built and how requests look; hashed into the cache key."""

    shape: dict = field(default_factory=lambda: dict(FULL_SHAPE))
    total_adapters: int = 32  # built and exported (the memory scenario loads up to this many)
    served_adapters: int = 8  # what the throughput scenarios spread requests over
    rank: int = 16
    alpha: int = 32
    lora_b_std: float = 0.02  # non-zero B: the adapter changes the output
    prompt_tokens: int = 64
    new_tokens: int = 32
    n_prompts: int = 16
    precisions: tuple[str, ...] = ("fp32", "int4")
    seed: int = 0

    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def adapter_names(self, n: int | None = None) -> list[str]:
        return [f"a{i:02d}" for i in range(self.total_adapters if n is None else n)]


@dataclass
class Artifacts:
    """Paths of everything built for one workload."""

    root: Path
    base: Path
    peft: dict[str, Path]  # adapter name -> PEFT directory (all `total_adapters`)
    packages: dict[str, Path]  # precision -> package serving the first `served_adapters`
    prompts: list[str]  # each exactly `prompt_tokens` tokens long
    prompt_ids: list[list[int]]

    def package_with(self, n_adapters: int, precision: str = "fp32") -> Path:
        """A package view with the first `n_adapters` adapters (built on demand, cheap: hard links)."""
        return _package_view(
            self.root / f"pkg_{precision}_all", n_adapters, self.root / f"pkg_{precision}_n{n_adapters}"
        )


def build(workload: Workload, out_root: Path = OUT_ROOT) -> Artifacts:
    """Build (or reuse) the base model, the adapters, the packages and the prompts."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    root = out_root / workload.key()
    root.mkdir(parents=True, exist_ok=True)
    (root / "workload.json").write_text(json.dumps(asdict(workload), indent=2))

    base = _build_base(workload, root / "base")
    peft = _build_adapters(workload, base, root / "peft")
    packages: dict[str, Path] = {}
    for precision in workload.precisions:
        names = workload.adapter_names() if precision == "fp32" else workload.adapter_names(workload.served_adapters)
        full = _export(base, {n: peft[n] for n in names}, root / f"pkg_{precision}_all", precision)
        if full is None:
            continue
        packages[precision] = _package_view(
            full, workload.served_adapters, root / f"pkg_{precision}_n{workload.served_adapters}"
        )
    prompts, prompt_ids = _build_prompts(workload, base, root / "prompts.json")
    return Artifacts(root=root, base=base, peft=peft, packages=packages, prompts=prompts, prompt_ids=prompt_ids)


def _build_base(workload: Workload, out: Path) -> Path:
    if done(out):
        return out
    from loraplex.trainer.tiny_base import build_tiny_base

    log.info("building random-init llama base %s", workload.shape)
    if out.exists():
        shutil.rmtree(out)
    build_tiny_base(out, seed=workload.seed, architecture="llama", **workload.shape)
    mark_done(out)
    return out


def _build_adapters(workload: Workload, base: Path, out: Path) -> dict[str, Path]:
    """Rank-r LoRA on every projection, A and B random (seeded per adapter), saved as PEFT dirs."""
    names = workload.adapter_names()
    dirs = {name: out / name for name in names}
    if done(out):
        return dirs
    import torch
    from loraplex.trainer.random_adapter import random_adapters

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    random_adapters(base, dirs, rank=workload.rank, alpha=workload.alpha, targets=PROJECTIONS, seed=workload.seed,
                    b_std=workload.lora_b_std, progress=True)
    mark_done(out)
    return dirs


def _export(base: Path, adapters: dict[str, Path], out: Path, precision: str) -> Path | None:
    """`loraplex export` of the base with these adapters; None (logged) if export is unavailable."""
    if done(out):
        return out
    try:
        from loraplex.adapters.export import export_package
    except ImportError as exc:
        log.warning("loraplex export is not available (%s): skipping the %s package", exc, precision)
        return None
    if out.exists():
        shutil.rmtree(out)
    log.info("exporting %s package with %d adapters to %s", precision, len(adapters), out)
    try:
        export_package(base, adapters, out, precision=precision, device="cpu", verify=False)
    except Exception as exc:  # one precision failing must not cost the other systems' numbers
        log.error("export of the %s package failed: %s", precision, exc, exc_info=True)
        return None
    mark_done(out)
    return out


def _package_view(full: Path, n_adapters: int, out: Path) -> Path:
    """A package holding the first `n_adapters` of `full`: links to its files, a trimmed manifest."""
    from loraplex.adapters.package.manifest import Manifest

    names = sorted(Manifest.load(full).adapters)[:n_adapters]
    if len(names) < n_adapters:
        raise ValueError(f"package {full} has {len(names)} adapters, fewer than the {n_adapters} asked for")
    return package_view(full, names, out)


def _build_prompts(workload: Workload, base: Path, path: Path) -> tuple[list[str], list[list[int]]]:
    """Random demo-task words cut to exactly `prompt_tokens` tokens (they round-trip the tokenizer)."""
    from loraplex.trainer import demo_tasks

    words = sorted(set(demo_tasks.NOUNS + demo_tasks.POSITIVE + demo_tasks.NEGATIVE + list(demo_tasks.TRANSLATION)))
    return fixed_length_prompts(
        path, base, n_prompts=workload.n_prompts, prompt_tokens=workload.prompt_tokens, seed=workload.seed,
        text=lambda rng: " ".join(rng.choice(words) for _ in range(workload.prompt_tokens * 2)))
