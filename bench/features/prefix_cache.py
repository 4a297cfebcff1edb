"""`python -m bench.features.prefix_cache --package PKG`: time to first token with the prefix cache.

A task whose template is a few-shot instruction of at least 200 tokens, each request the template
plus its own text, one request at a time (a single client), over the package's adapters in turn.
Three servers in process (`loraplex.runtime.api.LLM`, batched engine), measured in interleaved
rounds so all see the same machine state:
- `off`: the prefix cache off (every request computes its whole prompt);
- `warm`: the cache on, the template seen before (its blocks cached): against `off` on the same prompt;
- `cold`: the cache on, a prompt never seen (a unique first line), against `off` on that same
  prompt: what storing costs. A server of its own, so its one-off prompts do not evict the
  templates `warm` measures (the cache's own policy protects those; see `prefix_cache`).
Reported: TTFT p50 of each and the ratios off/warm (target >= 3) and cold/off (target <= 1.05),
and whether the greedy tokens of every request were identical with and without the cache.
For SmolLM2 packages (233 template tokens); the recipe package's byte-level tokenizer makes the
template over 700 tokens, more than its 512-token context.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from loraplex.adapters.package.reader import Package
from loraplex.runtime.api import LLM

INSTRUCTIONS = (
    "You are a careful assistant for a support team. Read the customer's message and reply with a short, "
    "polite answer. Keep every name, number and product exactly as the customer wrote it. Never promise a "
    "refund or a date. If the message is unclear, ask one question. Answer in one sentence.\n\n"
)
EXAMPLES = [
    ("My order 4471 arrived with a cracked lid, can you help?",
     "I am sorry the lid of order 4471 arrived cracked; could you send a photo so we can help?"),
    ("Where is the manual for the Rivet 300 kettle?",
     "The Rivet 300 manual is on the product page under Downloads."),
    ("Hi, I was charged twice for my subscription this month.",
     "Sorry about the double charge; could you tell me the last four digits of the card used?"),
    ("The blue lamp I bought flickers when dimmed.",
     "Thanks for telling us the blue lamp flickers when dimmed; which bulb is in it?"),
]
TEXTS = ["My parcel says delivered but I never got it.", "Can I change the address on order 5520?",
         "The charger gets very hot after an hour.", "Do you ship the Rivet 300 to Norway?",
         "I forgot my password and the reset mail never comes.", "The left earbud stopped working.",
         "Is the oak table available in a smaller size?", "My coupon code SPRING10 was refused."]


def template() -> str:
    shots = "".join(f"Customer: {q}\nReply: {a}\n\n" for q, a in EXAMPLES)
    return INSTRUCTIONS + shots + "Customer: {text}\nReply:"


def measure(package_dir: Path, rounds: int, adapters: int, mib: float, threads: int) -> dict:
    package = Package.open(package_dir)
    names = sorted(package.manifest.adapters)[:adapters]
    fixed = template()
    # Speculation off in all three: this measures the cache alone, and its verification runs round int4
    # differently from decoding steps (see bench/README.md), which would blur the token comparison.
    options = dict(engine="batched", max_batch=4, load_adapters=False, warmup=False, intra_op_threads=threads,
                   speculation="off")
    with LLM(package_dir, prefix_cache_mib=0, **options) as off, \
            LLM(package_dir, prefix_cache_mib=mib, **options) as warm, \
            LLM(package_dir, prefix_cache_mib=mib, **options) as cold:
        for llm in (off, warm, cold):
            for name in names:
                llm.load_adapter(name, package.adapter_path(name))
        prefix_tokens = len(warm._core.service.tokenizer.encode(fixed.split("{text}")[0]))
        for name in names:  # warm-up (all), and the template's blocks into the warm cache
            for llm in (off, warm, cold):
                llm.generate(f"Warm-up {name}.\n" + fixed.format(text="Hello."), adapter=name, max_new_tokens=2)
            warm.generate(fixed.format(text="Hello."), adapter=name, max_new_tokens=2)
        ttft: dict[str, list[float]] = {"off": [], "warm": [], "off_cold": [], "cold": []}
        mismatches: list[dict] = []
        for i in range(rounds):
            name = names[i % len(names)]
            prompt = fixed.format(text=TEXTS[i % len(TEXTS)] + f" (ticket {i})")
            unseen = f"Ticket queue {i} of {rounds}, shift {i * 7919 % 1000}.\n" + prompt
            calls = [("off", off, prompt), ("warm", warm, prompt), ("off_cold", off, unseen), ("cold", cold, unseen)]
            if i % 2:  # alternate which server goes first
                calls = [calls[1], calls[0], calls[3], calls[2]]
            replies = {kind: llm.generate(text, adapter=name, max_new_tokens=8) for kind, llm, text in calls}
            for with_cache, without in (("warm", "off"), ("cold", "off_cold")):
                if replies[with_cache].token_ids != replies[without].token_ids:
                    mismatches.append({"round": i, "adapter": name, "kind": with_cache,
                                       "with": replies[with_cache].token_ids, "without": replies[without].token_ids})
            for kind, reply in replies.items():
                ttft[kind].append(reply.time_to_first_token_ms)
        stats = warm._core.engine.prefix_cache.stats
        cold_stats = cold._core.engine.prefix_cache.stats
        p50 = {k: statistics.median(v) for k, v in ttft.items()}
    return {
        "package": str(package_dir), "precision": package.manifest.precision, "adapters": names,
        "template_prefix_tokens": prefix_tokens, "rounds": rounds, "ttft_p50_ms": p50,
        "warm_speedup": p50["off"] / p50["warm"], "cold_ratio": p50["cold"] / p50["off_cold"],
        "targets": {"warm_speedup>=3": p50["off"] / p50["warm"] >= 3,
                    "cold_ratio<=1.05": p50["cold"] / p50["off_cold"] <= 1.05},
        "greedy_tokens_identical": not mismatches, "mismatches": mismatches,
        "warm_hits": stats.hits, "warm_lookups": stats.lookups,
        "warm_reused_tokens": stats.tokens_reused, "cold_hits": cold_stats.hits,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.features.prefix_cache", description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--adapters", type=int, default=4, help="the package's first N adapters, in turn")
    parser.add_argument("--mib", type=float, default=64)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.package, args.rounds, args.adapters, args.mib, args.threads)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
