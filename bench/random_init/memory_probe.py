"""Resident memory of an in-process peer with N adapters loaded, in a fresh process.

`python -m bench.random_init.memory_probe SYSTEM ROOT N` loads the peer (`genai` or `peft`) with the first
N adapters of the bench workload in ROOT, runs one 1-token request on each adapter (so that
memory-mapped weights are touched, as a server that has served them would have), and prints
one JSON line: {"rss_base": bytes after loading the model, "rss": bytes with N adapters}.
A fresh process per measurement: allocators do not give memory back, so reusing one would
measure history, not the state.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def main(argv: list[str]) -> int:
    system, root, n = argv[0], Path(argv[1]), int(argv[2])
    data = json.loads((root / "prompts.json").read_text())
    from bench.measure.results import Prompt

    prompt = Prompt(text=data["prompts"][0], ids=data["ids"][0])
    names = [f"a{i:02d}" for i in range(n)]
    if system == "genai":
        from loraplex.adapters.package.manifest import Manifest

        from bench.systems.genai_in_process import GenaiInProcess

        package = root / "pkg_fp32_all"
        manifest = Manifest.load(package)
        peer = GenaiInProcess(package, [])
        base = _rss()
        for name in names:
            peer.load_adapter(name, package / manifest.adapters[name].file)
    elif system == "peft":
        from bench.systems.peft_in_process import PeftSystem

        peer = PeftSystem(root / "base", {names[0]: root / "peft" / names[0]})
        base = None  # PEFT needs one adapter to make a PeftModel
        for name in names[1:]:
            peer.load_adapter(name, root / "peft" / name)
    else:
        raise SystemExit(f"unknown system {system!r}: use genai or peft")
    for name in names:
        peer.generate(prompt, name, 1)
    print(json.dumps({"rss_base": base, "rss": _rss()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
