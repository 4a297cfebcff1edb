"""`python -m bench.features.structured --package PKG`: the cost of output constraints per token.

Each engine in process (`loraplex.runtime.api.LLM`, no port), `--rows` requests submitted
together (they share the batched engine's batch; the genai engine interleaves them),
`--new-tokens` tokens each, greedy. Rounds alternate free and constrained so both see the same
machine state; the figure is wall time per generated token (all rows) and its difference.
Constraints: a regex that keeps every row decoding for the whole budget (`[a-z ]{200,400}`, EOS
forbidden meanwhile: a mask over most of the vocabulary every step) and a JSON schema with one
long string field.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from loraplex.adapters.package.output import OutputConstraint
from loraplex.runtime.api import LLM

CONSTRAINTS = {
    "regex": OutputConstraint("regex", "[a-z ]{200,400}"),
    "json_schema": OutputConstraint("json_schema", json.dumps(
        {"type": "object", "properties": {"text": {"type": "string", "minLength": 300}}, "required": ["text"]})),
}


PROMPT = "The weather today is calm and the river runs slowly"


def _round(llm: LLM, rows: int, new_tokens: int, constraint: OutputConstraint | None) -> float:
    """Seconds per generated token for `rows` requests submitted together."""
    started = time.perf_counter()
    replies = llm.generate([PROMPT] * rows, max_new_tokens=new_tokens, ignore_eos=constraint is None,
                           output=constraint)
    elapsed = time.perf_counter() - started
    return elapsed / max(1, sum(len(r.token_ids) for r in replies))


def measure(package_dir: Path, engine_name: str, rows: int, new_tokens: int, rounds: int) -> dict:
    with LLM(package_dir, engine=engine_name, max_batch=rows, load_adapters=False) as llm:
        _round(llm, rows, 4, None)  # warm-up
        times: dict[str, list[float]] = {"free": [], **{k: [] for k in CONSTRAINTS}}
        for _ in range(rounds):
            times["free"].append(_round(llm, rows, new_tokens, None))
            for kind, constraint in CONSTRAINTS.items():
                times[kind].append(_round(llm, rows, new_tokens, constraint))
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
