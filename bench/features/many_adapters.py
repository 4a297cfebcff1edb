"""`python -m bench.features.many_adapters --package PKG`: a thousand adapters on one server.

A store of N random adapters (rank 8 on the package's q/k/v/o LoRA inputs, their sha256 beside each
file; made once under bench/out/many-adapters/) served through `--adapter-store` on the package's
own adapters, each configuration in a fresh process (`loraplex.runtime.api.LLM`, batched engine
unless `--engine genai`), one request at a time:
- `package`: only the package's adapters, each asked once: the reference RSS and start time;
- `store`: the same, plus every store adapter asked once (resolved on first use: read, checked,
  loaded), with host copies bounded by `--cache-mib`: RSS and start time against `package`
  (targets: RSS <= package RSS + the budget + 10%; start <= 1.1x);
- cold against warm: for `--probe` store adapters, the first request (resolution + load, file in the
  page cache) against the next request on the same adapter, and a request after the adapter's host
  copy was evicted (read again from its file) against a warm one: time to first token, p50 of the
  differences (target: cold <= warm + 30 ms).
Requests: a 1-token completion of a short prompt. The store's greedy tokens are not compared here
(the tests check that a dropped and re-read adapter gives the tokens it gives alone).

With `--load`, throughput under `--clients` concurrent clients (`--requests` requests of
`--tokens` tokens each, EOS ignored), each in a fresh process: over the package's 4 adapters
(`four`, the reference), and over the store's adapters drawn by popularity Zipf (alpha 1) and
uniformly (speculative decoding off); tokens/s (median of `--repeat` interleaved rounds), and
for Zipf the p50/p99 latency of the most and least popular tenths of the adapters (targets: Zipf
>= 0.85x, uniform >= 0.6x the reference's throughput; p99 of the least popular tenth <= 2x the most
popular's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "out" / "many-adapters"
PROMPT = "Review: the service was quick and friendly\nSentiment:"
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
RANK = 8


def make_store(package_dir: Path, count: int, root: Path) -> Path:
    """`root/a0000.onnx_adapter`...: random rank-8 adapters on q/k/v/o with their sha256 beside them."""
    import hashlib

    from loraplex.adapters.package.adapter_file import write_adapter_file
    from loraplex.adapters.package.reader import Package

    package = Package.open(package_dir)
    pairs = [p for p in package.lora_inputs.pairs if p.module.rsplit(".", 1)[-1] in MODULES]
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        file = root / f"a{i:04d}.onnx_adapter"
        if file.exists() and file.with_name(file.name + ".sha256").exists():
            continue
        rng = np.random.default_rng(i)
        tensors = {}
        for pair in pairs:
            a_shape, b_shape = pair.a.shape(RANK), pair.b.shape(RANK)
            tensors[pair.a.name] = (rng.standard_normal(a_shape) / np.sqrt(a_shape[0])).astype(np.float32)
            tensors[pair.b.name] = (rng.standard_normal(b_shape) * 0.02).astype(np.float32)
        write_adapter_file(tensors, file)
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        file.with_name(file.name + ".sha256").write_text(f"{digest}  {file.name}\n")
    return root


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(args: argparse.Namespace) -> dict:
    """One configuration in this process (see the module)."""
    from loraplex.runtime.api import LLM

    options = dict(engine=args.engine, max_batch=4, warmup=True, intra_op_threads=args.threads)
    if args.mode == "store":
        options.update(adapter_stores=[args.store], adapter_cache_mib=args.cache_mib)
    started = time.monotonic()
    llm = LLM(args.package, **options)
    start_s = time.monotonic() - started
    result: dict = {"mode": args.mode, "start_s": start_s}
    with llm:
        registry = llm._core.registry
        for name in registry.names():
            llm.generate(PROMPT, adapter=name, max_new_tokens=1)
        if args.mode == "store":
            names = sorted(p.name[: -len(".onnx_adapter")] for p in Path(args.store).glob("*.onnx_adapter"))
            probe = set(names[: args.probe])
            cold, warm = [], []
            for name in names:
                first = llm.generate(PROMPT, adapter=name, max_new_tokens=1)
                if name in probe:
                    again = llm.generate(PROMPT, adapter=name, max_new_tokens=1)
                    cold.append(first.time_to_first_token_ms)
                    warm.append(again.time_to_first_token_ms)
            evicted, rewarm = [], []
            for name in sorted(probe):  # long evicted by the thousand after them (unless the budget holds all)
                before = registry.get(name)
                first = llm.generate(PROMPT, adapter=name, max_new_tokens=1)
                again = llm.generate(PROMPT, adapter=name, max_new_tokens=1)
                evicted.append(first.time_to_first_token_ms)
                rewarm.append(again.time_to_first_token_ms)
                del before
            cache = registry.engine.executor.cache
            result.update(
                adapters=len(registry.names()), resolved=registry.resolved,
                cache_bytes=cache.bytes, cache_budget=cache.budget,
                ttft_cold_p50=statistics.median(cold), ttft_warm_p50=statistics.median(warm),
                cold_extra_p50=statistics.median(c - w for c, w in zip(cold, warm, strict=True)),
                ttft_evicted_p50=statistics.median(evicted), ttft_rewarm_p50=statistics.median(rewarm),
                evicted_extra_p50=statistics.median(e - w for e, w in zip(evicted, rewarm, strict=True)),
            )
        else:
            result.update(adapters=len(registry.names()))
        time.sleep(1.0)  # the engine hands its free heap back after 0.5 s idle
        result["rss_mib"] = rss_mib()
    return result


def load_child(args: argparse.Namespace) -> dict:
    """`--clients` threads send `--requests` requests in all; adapters drawn per `args.mode`."""
    from concurrent.futures import ThreadPoolExecutor

    from loraplex.runtime.api import LLM

    # Speculative decoding off: its drafts' acceptance depends on what each adapter writes (trained or
    # random), which would make the adapters differ by more than where their weights are.
    options = dict(engine=args.engine, max_batch=args.clients, max_queue=4 * args.clients, warmup=True,
                   intra_op_threads=args.threads, speculation="off")
    rng = np.random.default_rng(7)
    if args.mode == "four":
        llm = LLM(args.package, **options)
        names = llm._core.registry.names()
        picks = [names[i % len(names)] for i in range(args.requests)]
    else:
        llm = LLM(args.package, adapter_stores=[args.store], adapter_cache_mib=args.cache_mib, **options)
        names = sorted(p.name[: -len(".onnx_adapter")] for p in Path(args.store).glob("*.onnx_adapter"))
        if args.mode == "zipf":  # rank k drawn with probability proportional to 1/k
            weights = 1.0 / np.arange(1, len(names) + 1)
            picks = [names[i] for i in rng.choice(len(names), size=args.requests, p=weights / weights.sum())]
        else:
            picks = [names[i] for i in rng.integers(0, len(names), size=args.requests)]
    latency: dict[str, list[float]] = {}

    def one(name: str) -> int:
        started = time.monotonic()
        reply = llm.generate(PROMPT, adapter=name, max_new_tokens=args.tokens, ignore_eos=True,
                             no_default_output=True)  # every request the same work
        latency.setdefault(name, []).append((time.monotonic() - started) * 1000)
        return len(reply.token_ids)

    with llm:
        started = time.monotonic()
        with ThreadPoolExecutor(args.clients) as pool:
            tokens = sum(pool.map(one, picks))
        elapsed = time.monotonic() - started
        result = {"mode": args.mode, "requests": len(picks), "tokens": tokens, "seconds": elapsed,
                  "tokens_per_s": tokens / elapsed, "distinct_adapters": len(set(picks)), "rss_mib": rss_mib()}
        if args.mode == "zipf":
            tenth = max(1, len(names) // 10)
            top = [ms for n in names[:tenth] for ms in latency.get(n, [])]
            bottom = [ms for n in names[-tenth:] for ms in latency.get(n, [])]
            for band, values in (("top_tenth", top), ("bottom_tenth", bottom)):
                if values:
                    result[f"{band}_n"] = len(values)
                    result[f"{band}_p50_ms"] = float(np.percentile(values, 50))
                    result[f"{band}_p99_ms"] = float(np.percentile(values, 99))
    return result


def run(mode: str, args: argparse.Namespace, store: Path) -> dict:
    command = [sys.executable, "-m", "bench.features.many_adapters", "--child", mode, "--package",
               str(args.package), "--store", str(store), "--cache-mib", str(args.cache_mib), "--probe",
               str(args.probe), "--engine", args.engine, "--threads", str(args.threads), "--clients",
               str(args.clients), "--requests", str(args.requests), "--tokens", str(args.tokens)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2],
                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", type=Path, required=True)
    parser.add_argument("--adapters", type=int, default=1000, help="random adapters in the store")
    parser.add_argument("--cache-mib", type=float, default=64.0, help="--adapter-cache-mib of the store server")
    parser.add_argument("--probe", type=int, default=40, help="store adapters whose cold and warm TTFT are compared")
    parser.add_argument("--engine", choices=("batched", "genai"), default="batched")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--load", action="store_true", help="throughput with concurrent clients (see the module)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=1, help="--load: rounds of the three configurations")
    parser.add_argument("--store", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=("package", "store", "four", "zipf", "uniform"), default=None,
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        args.mode = args.child
        print(json.dumps(child(args) if args.child in ("package", "store") else load_child(args)))
        return 0
    store = args.store or make_store(args.package, args.adapters, OUT / f"store-{args.adapters}")
    if args.load:  # `--repeat` rounds of the three, interleaved; each one's median throughput
        rounds = [{mode: run(mode, args, store) for mode in ("four", "zipf", "uniform")} for _ in range(args.repeat)]
        runs = {mode: rounds[-1][mode] for mode in ("four", "zipf", "uniform")}
        for mode in runs:
            runs[mode]["tokens_per_s_rounds"] = [r[mode]["tokens_per_s"] for r in rounds]
            runs[mode]["tokens_per_s"] = statistics.median(runs[mode]["tokens_per_s_rounds"])
        reference = runs["four"]["tokens_per_s"]
        zipf = runs["zipf"]
        report = {**runs, "zipf_ratio": zipf["tokens_per_s"] / reference,
                  "uniform_ratio": runs["uniform"]["tokens_per_s"] / reference}
        report["zipf_met"] = report["zipf_ratio"] >= 0.85
        report["uniform_met"] = report["uniform_ratio"] >= 0.6
        if "bottom_tenth_p99_ms" in zipf and "top_tenth_p99_ms" in zipf:
            report["band_p99_ratio"] = zipf["bottom_tenth_p99_ms"] / zipf["top_tenth_p99_ms"]
            report["band_met"] = report["band_p99_ratio"] <= 2.0
        print(json.dumps(report, indent=2))
        return 0
    package = run("package", args, store)
    many = run("store", args, store)
    budget_mib = many["cache_budget"] / 2**20
    report = {
        "package": package, "store": many,
        "rss_target_mib": package["rss_mib"] + budget_mib + 0.1 * package["rss_mib"],
        "rss_met": many["rss_mib"] <= package["rss_mib"] + budget_mib + 0.1 * package["rss_mib"],
        "start_ratio": many["start_s"] / package["start_s"],
        "start_met": many["start_s"] <= 1.1 * package["start_s"],
        "cold_extra_met": many["cold_extra_p50"] <= 30.0,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
