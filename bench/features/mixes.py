"""`python -m bench.features.mixes --package PKG`: throughput of clients on 2-adapter mixes vs single adapters.

Two batched engines in one process (`loraplex.runtime.api.LLM`, no port), each serving `--clients`
closed-loop clients: on the first, client i asks adapter i alone; on the second, client i asks the
mix (adapter i, 0.5) + (adapter clients+i, 0.5), so every row of a step runs on another mix. The
engines take turns, round by round, so both see the same machine state (the machine is shared);
the first engine never sees a mix, so its banks stay at the adapters' own rank. Figures: generated
tokens per second of each round, the ratio of the medians, and the median of the per-pair ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

from loraplex.adapters.package.reader import Package
from loraplex.runtime.api import LLM


def _round(llm: LLM, jobs: list[dict], prompts: list[str], per_client: int, max_new_tokens: int) -> float:
    """Generated tokens per second with one thread per job, each sending `per_client` requests in a row."""
    counts = [0] * len(jobs)

    def client(i: int) -> None:
        for k in range(per_client):
            prompt = prompts[(i * per_client + k) % len(prompts)]
            reply = llm.generate(prompt, max_new_tokens=max_new_tokens, ignore_eos=True, no_default_output=True,
                                 **jobs[i])
            counts[i] += len(reply.token_ids)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(jobs))]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.features.mixes", description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, required=True)
    parser.add_argument("--prompts", type=Path, help="a JSON file with a `prompts` list (default: a fixed set)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-client", type=int, default=2, help="requests per client per round")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    names = sorted(Package.open(args.package).manifest.adapters)
    if len(names) < 2 * args.clients:
        parser.error(f"the package has {len(names)} adapters; {2 * args.clients} are needed")
    prompts = (json.loads(args.prompts.read_text())["prompts"] if args.prompts else
               ["Write one sentence about the sea.", "List three colours:", "The capital of France is",
                "Summarise: the meeting moved to Tuesday."])
    single = [{"adapter": names[i]} for i in range(args.clients)]
    mixed = [{"mix": [(names[i], 0.5), (names[args.clients + i], 0.5)]} for i in range(args.clients)]
    options = dict(engine="batched", max_batch=args.clients, prefix_cache_mib=0)
    rates: dict[str, list[float]] = {"single": [], "mix": []}
    with LLM(args.package, **options) as one, LLM(args.package, **options) as two:
        for llm, jobs in ((one, single), (two, mixed)):  # warm-up: slots filled, mixes built
            _round(llm, jobs, prompts, 1, 4)
        for r in range(args.rounds):
            order = [("single", one, single), ("mix", two, mixed)]
            for label, llm, jobs in order if r % 2 == 0 else order[::-1]:
                rates[label].append(_round(llm, jobs, prompts, args.per_client, args.max_new_tokens))
                print(f"round {r} {label}: {rates[label][-1]:.1f} tok/s", flush=True)
    s, m = statistics.median(rates["single"]), statistics.median(rates["mix"])
    paired = statistics.median(b / a for a, b in zip(rates["single"], rates["mix"], strict=True))
    print(json.dumps({"clients": args.clients, "rounds": args.rounds, "single_tok_s": round(s, 1),
                      "mix_tok_s": round(m, 1), "ratio": round(m / s, 3), "paired_ratio": round(paired, 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
