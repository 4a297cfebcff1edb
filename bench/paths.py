"""Where the bench lives and writes: one place, so modules in subpackages need not count parents."""

from __future__ import annotations

from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
# Built artefacts (models, adapters, packages, llama.cpp, logs), keyed by configuration; not in git.
OUT_ROOT = BENCH_DIR / "out"
