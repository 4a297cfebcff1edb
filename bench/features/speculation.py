"""`python -m bench.features.speculation --package PKG`: decode speed with speculative decoding.

Two servers in process (`loraplex.runtime.api.LLM`, batched engine), one with `speculation=on`
(drafting whatever the precision) and one with `off`, measured in interleaved rounds so both see the
same machine state, greedy:
- `copy`: the base model asked to repeat a passage (its reply copies the prompt: prompt lookup);
- `rewrite`: the base model asked to correct a passage's capitalisation (copies most of it);
- `json`: a JSON schema (object with fixed keys) on an adapter (the contract forces keys and punctuation);
- `free`: a continuation of free text that copies nothing (speculation must not slow it down).
Rounds alternate which server goes first (on a loaded machine the second of a pair ran ~4% slower
in an A/A run).
Single stream: one request at a time; decode tokens/s = (tokens - 1) / (total - time to first
token). `clients`: 8 concurrent clients over 4 adapters on the copy mix, tokens/s over the wall
time of the round. Reported: each ratio on/off with the issue's target, whether the greedy tokens
were identical, drafted and accepted tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loraplex.adapters.package.reader import Package
from loraplex.runtime.api import LLM

PASSAGES = [
    "The committee met on Tuesday to review the budget for the new library. After a long discussion, "
    "the members agreed to extend the opening hours on weekends and to buy more books for children.",
    "Our train left the station at seven in the morning and followed the river through the valley. "
    "By noon we reached the small town where my grandmother was born, and we walked to the old market.",
    "The recipe asks for two cups of flour, one cup of sugar, three eggs and a spoon of butter. Mix the "
    "flour and the sugar first, then add the eggs one by one and bake the cake for forty minutes.",
    "Please send the signed contract to the office before Friday. If you have questions about the terms, "
    "call Maria at the front desk, and she will forward your message to the legal team.",
]
FREE = ["Once upon a time in a quiet village,", "The best way to learn a new language is",
        "In the year 2050, cities will", "My favourite memory from childhood is"]
SCHEMA = json.dumps({"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "city": {"type": "string", "maxLength": 24},
    "country": {"type": "string", "maxLength": 24}, "occupation": {"type": "string", "maxLength": 24}},
    "required": ["name", "city", "country", "occupation"], "additionalProperties": False})
TARGETS = {"copy": 1.6, "rewrite": 1.6, "json": 1.4, "free": 0.95, "clients": 1.3}


def chat(package: Package, text: str) -> str:
    """The text in the package's chat template when it has one (an instruct model copies on request)."""
    template = package.root / "chat_template.jinja"
    if template.is_file():
        return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    return text + "\n"


def tasks(package: Package, adapter: str) -> dict[str, list[tuple[str, str, dict]]]:
    """name -> [(prompt, adapter, sampling)]"""
    copy = [(chat(package, f"Repeat this text exactly, word for word:\n\n{p}"), "", {"max_new_tokens": 64})
            for p in PASSAGES]
    rewrite = [(chat(package, f"Rewrite this text in capital letters:\n\n{p}"), "", {"max_new_tokens": 64})
               for p in PASSAGES]
    people = ["Aisha, a nurse from Dublin in Ireland", "Mateo, a teacher who lives in Seoul, Korea",
              "Leila, a pianist from Cairo, Egypt", "Tomas, a baker in Tokyo, Japan"]
    js = [(chat(package, f"Describe {p} as JSON."), adapter, {"max_new_tokens": 64, "json_schema": SCHEMA})
          for p in people]
    free = [(f, "", {"max_new_tokens": 64, "ignore_eos": True}) for f in FREE]
    return {"copy": copy, "rewrite": rewrite, "json": js, "free": free}


def decode_rate(reply) -> float:
    seconds = (reply.total_ms - reply.time_to_first_token_ms) / 1e3
    return (len(reply.token_ids) - 1) / seconds if seconds > 0 and len(reply.token_ids) > 1 else 0.0


def one(llm: LLM, prompt: str, adapter: str, sampling: dict):
    return llm.generate(prompt, adapter=adapter, **sampling)


def clients_round(llm: LLM, jobs: list[tuple[str, str, dict]]) -> tuple[float, list]:
    started = time.perf_counter()
    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(lambda job: one(llm, *job), jobs))
    return sum(len(r.token_ids) for r in replies) / (time.perf_counter() - started), replies


def measure(package_dir: Path, rounds: int, threads: int, clients: int) -> dict:
    package = Package.open(package_dir)
    names = sorted(package.manifest.adapters)
    adapter = "extract_contact" if "extract_contact" in names else names[0]
    mixed = names[:4]
    options = dict(engine="batched", max_batch=max(clients, 1), load_adapters=False, warmup=False,
                   intra_op_threads=threads, prefix_cache_mib=0)
    with LLM(package_dir, speculation="on", **options) as on, LLM(package_dir, speculation="off", **options) as off:
        for llm in (on, off):
            for name in sorted({adapter, *mixed}):
                llm.load_adapter(name, package.adapter_path(name))
        work = tasks(package, adapter)
        for llm in (on, off):  # warm-up
            one(llm, FREE[0], "", {"max_new_tokens": 4})
        rates: dict[str, dict[str, list[float]]] = {k: {"on": [], "off": []} for k in [*work, "clients"]}
        identical = True
        tokens: dict[str, int] = {k: 0 for k in work}
        for r in range(rounds):
            for kind, items in work.items():
                prompt, name, sampling = items[r % len(items)]
                if r % 2:  # who goes first alternates: the second of a pair ran slower on a loaded machine
                    b, a = one(on, prompt, name, sampling), one(off, prompt, name, sampling)
                else:
                    a, b = one(off, prompt, name, sampling), one(on, prompt, name, sampling)
                identical &= a.token_ids == b.token_ids
                tokens[kind] += len(a.token_ids)
                rates[kind]["off"].append(decode_rate(a))
                rates[kind]["on"].append(decode_rate(b))
            if clients:
                copy = work["copy"]
                jobs = [(copy[i % len(copy)][0], mixed[i % len(mixed)], copy[i % len(copy)][2])
                        for i in range(clients)]
                if r % 2:
                    rate_on, b_replies = clients_round(on, jobs)
                    rate_off, a_replies = clients_round(off, jobs)
                else:
                    rate_off, a_replies = clients_round(off, jobs)
                    rate_on, b_replies = clients_round(on, jobs)
                identical &= [x.token_ids for x in a_replies] == [x.token_ids for x in b_replies]
                rates["clients"]["off"].append(rate_off)
                rates["clients"]["on"].append(rate_on)
        speculator = on._core.engine.runner.speculator
        result = {}
        for kind, values in rates.items():
            if not values["on"]:
                continue
            p50_on, p50_off = statistics.median(values["on"]), statistics.median(values["off"])
            ratio = p50_on / p50_off if p50_off else 0.0
            result[kind] = {"tok_s_on": round(p50_on, 1), "tok_s_off": round(p50_off, 1), "ratio": round(ratio, 3),
                            "target": TARGETS[kind], "met": ratio >= TARGETS[kind],
                            "mean_tokens": tokens.get(kind, 0) / rounds}
        return {"package": str(package_dir), "precision": package.manifest.precision, "rounds": rounds,
                "clients": clients, "tasks": result, "greedy_tokens_identical": identical,
                "drafted": speculator.drafted, "accepted": speculator.accepted,
                "per_run_ms": round(speculator.cost.per_run * 1e3, 2),
                "per_token_ms": round(speculator.cost.per_token * 1e3, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.features.speculation", description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients of the mixed round (0: none)")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.package, args.rounds, args.threads, args.clients), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
