"""`python -m bench.features.structured --package PKG`: the cost of output constraints per token.

Each engine in process (no server), `--rows` requests submitted together (they share the batched
engine's batch; the genai engine interleaves them), `--new-tokens` tokens each, greedy. Rounds
alternate free and constrained so both see the same machine state; the figure is wall time per
generated token (all rows) and its difference. Constraints: a regex that keeps every row decoding
for the whole budget (`[a-z ]{200,400}`, EOS forbidden meanwhile: a mask over most of the
vocabulary every step) and a JSON schema with one long string field.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

from loraplex.adapters.package.output import OutputConstraint
from loraplex.adapters.package.reader import Package
from loraplex.runtime.engines.base import FinishReason, GenerationJob, SamplingParams

CONSTRAINTS = {
    "regex": OutputConstraint("regex", "[a-z ]{200,400}"),
    "json_schema": OutputConstraint("json_schema", json.dumps(
        {"type": "object", "properties": {"text": {"type": "string", "minLength": 300}}, "required": ["text"]})),
}


class _Sink:
    def __init__(self) -> None:
        self.tokens = 0
        self.done = threading.Event()

    def on_token(self, token: int) -> None:
        self.tokens += 1

    def on_finish(self, reason: FinishReason) -> None:
        self.done.set()


def _round(engine, prompt: list[int], rows: int, new_tokens: int, constraint: OutputConstraint | None) -> float:
    """Seconds per generated token for `rows` jobs submitted together."""
    sinks = [_Sink() for _ in range(rows)]
    started = time.perf_counter()
    for i, sink in enumerate(sinks):
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=constraint is None, constraint=constraint)
        engine.submit(GenerationJob(f"b{i}", list(prompt), params, None, sink))
    for sink in sinks:
        sink.done.wait(600)
    elapsed = time.perf_counter() - started
    return elapsed / max(1, sum(s.tokens for s in sinks))


def measure(package_dir: Path, engine_name: str, rows: int, new_tokens: int, rounds: int) -> dict:
    from loraplex.runtime.engines.batched import BatchedEngine
    from loraplex.runtime.engines.genai import GenaiEngine
    from loraplex.runtime.server.tokenizer import PackageTokenizer

    package = Package.open(package_dir)
    engine = (BatchedEngine(package, max_batch=rows) if engine_name == "batched"
              else GenaiEngine(package, max_batch=rows))
    prompt = PackageTokenizer(package_dir).encode("The weather today is calm and the river runs slowly")
    try:
        _round(engine, prompt, rows, 4, None)  # warm-up
        times: dict[str, list[float]] = {"free": [], **{k: [] for k in CONSTRAINTS}}
        for _ in range(rounds):
            times["free"].append(_round(engine, prompt, rows, new_tokens, None))
            for kind, constraint in CONSTRAINTS.items():
                times[kind].append(_round(engine, prompt, rows, new_tokens, constraint))
    finally:
        engine.close()
    median = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"engine": engine_name, "rows": rows, "ms_per_token": median,
            "overhead_ms_per_token": {k: median[k] - median["free"] for k in CONSTRAINTS}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.features.structured", description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, required=True)
    parser.add_argument("--engines", default="batched,genai")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    for name in args.engines.split(","):
        result = measure(args.package, name, args.rows, args.new_tokens, args.rounds)
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
