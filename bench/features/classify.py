"""`python -m bench.features.classify --package PKG --adapter NAME --data EVAL.jsonl`: label probabilities.

Each engine in process (`loraplex.runtime.api.LLM`, no port), one request at a time on an idle
engine: `classify` (every label of the adapter's choice contract scored) against a one-token
greedy `generate` on the same task inputs, alternating so both see the same machine state; the
figures are median latencies, their ratio, and the median of each pair's ratio (steadier on a
shared machine). The batched engine's prefix cache is off unless `--prefix-cache` (with it, whichever
call of a pair comes second finds the prompt cached; the order alternates). It also counts the
examples on which the label `classify` ranks first equals the label greedy `generate` returns
(under the adapter's contract), and the one the example records. `--label` scores other labels
(agreement is then not counted).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from loraplex.runtime.api import LLM


def _timed(call) -> tuple[float, object]:
    started = time.perf_counter()
    result = call()
    return (time.perf_counter() - started) * 1e3, result


def measure(package_dir: Path, engine: str, adapter: str, examples: list[dict], rounds: int, prefix_cache: bool,
            labels: list[str]) -> dict:
    options = {} if prefix_cache or engine != "batched" else {"prefix_cache_mib": 0}
    with LLM(package_dir, engine=engine, max_batch=8, **options) as llm:
        fields = [{k: v for k, v in e.items() if k != "label"} for e in examples]
        llm.classify(inputs=fields[0], adapter=adapter, labels=labels)  # warm-up (and llguidance's tokenizer)
        llm.generate(inputs=fields[0], adapter=adapter, max_new_tokens=4)
        agree = correct = 0
        for example, inputs in zip(examples if not labels else [], fields, strict=False):
            top = llm.classify(inputs=inputs, adapter=adapter)[0].label
            greedy = llm.generate(inputs=inputs, adapter=adapter, max_new_tokens=16).text
            agree += top == greedy
            correct += top.strip() == str(example.get("label", "")).strip()
        classify_ms, generate_ms = [], []
        for r in range(rounds):
            for k, inputs in enumerate(fields):
                def classify(i=inputs) -> float:
                    return _timed(lambda: llm.classify(inputs=i, adapter=adapter, labels=labels))[0]

                def generate(i=inputs) -> float:
                    return _timed(lambda: llm.generate(inputs=i, adapter=adapter, max_new_tokens=1,
                                                       no_default_output=True))[0]

                if (r + k) % 2:  # which goes first alternates (a prefix cache serves the second one's prompt)
                    generate_ms.append(generate())
                    classify_ms.append(classify())
                else:
                    classify_ms.append(classify())
                    generate_ms.append(generate())
    c, g = statistics.median(classify_ms), statistics.median(generate_ms)
    paired = statistics.median(x / y for x, y in zip(classify_ms, generate_ms, strict=True))
    return {"engine": engine, "labels": labels or "contract", "examples": len(examples),
            "top_equals_greedy": agree, "top_equals_label": correct,
            "classify_ms": round(c, 2), "generate_1_token_ms": round(g, 2), "ratio": round(c / g, 3),
            "paired_ratio": round(paired, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.features.classify", description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, required=True)
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--data", type=Path, required=True, help="held-out examples (JSON lines with the task fields)")
    parser.add_argument("--engines", default="batched,genai")
    parser.add_argument("--limit", type=int, default=0, help="examples to use (0: all)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--label", action="append", default=[], help="a label to score instead of the contract's")
    parser.add_argument("--prefix-cache", action="store_true",
                        help="keep the batched engine's prefix cache on (then the second call of a pair reuses the "
                             "first one's prompt)")
    args = parser.parse_args(argv)
    examples = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    if args.limit:
        examples = examples[: args.limit]
    for engine in args.engines.split(","):
        print(json.dumps(measure(args.package, engine, args.adapter, examples, args.rounds, args.prefix_cache,
                                 args.label)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
