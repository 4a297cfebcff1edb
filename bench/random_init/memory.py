"""Resident memory with 1, 8 and 32 adapters loaded, each system in a fresh process.

A fresh process per (system, count): allocators keep freed memory, so loading and unloading in
one process would measure its history. Each system serves one 1-token request per adapter
before the reading, so memory-mapped adapter files count once they have been used (a loraplex
server twice, 1 s apart: see `server_rss`).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from bench.measure.results import Prompt
from bench.paths import REPO_ROOT
from bench.systems.loraplex_server import LoraplexServer, Unavailable

log = logging.getLogger("bench.memory")


def peer_rss(system: str, root: Path, n: int) -> dict:
    """RSS of an in-process peer (`genai` or `peft`) with n adapters, from bench.random_init.memory_probe."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.random_init.memory_probe", system, str(root), str(n)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=900,
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def server_rss(package: Path, engine: str, adapters: list[str], prompt: Prompt, log_dir: Path, max_batch: int) -> dict:
    """RSS of `loraplex serve` on a package with these adapters, after a request on each, twice, 1 s
    apart (the server drops the code pages only its start-up ran at its first idle moment: the second
    round brings back what serving runs)."""
    try:
        server = LoraplexServer(package, engine, log_dir=log_dir, max_batch=max_batch)
    except Unavailable as exc:
        return {"error": str(exc).splitlines()[0]}
    try:
        base = server.rss_bytes()
        failed = [a for a in adapters if not server.generate_unary(prompt, a, 1).ok]
        time.sleep(1.0)
        failed += [a for a in adapters if not server.generate_unary(prompt, a, 1).ok]
        result = {"rss_base": base, "rss": server.rss_bytes(), "start_s": server.start_s}
        if failed:
            result["error"] = f"requests failed on {failed[:3]}"
        return result
    finally:
        server.close()
