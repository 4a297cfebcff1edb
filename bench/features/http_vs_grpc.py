"""`python -m bench.features.http_vs_grpc`: what the OpenAI-compatible HTTP port costs over gRPC.

One `loraplex serve --http-port` process serves both ports over the same engine, so the two front
ends are measured against the same model, warm-up and machine state, interleaved:
- latency: the same greedy request (one adapter, a fixed prompt, `--new-tokens` tokens, EOS
  ignored), one at a time, in blocks alternating gRPC and HTTP; p50 and p90 of the whole request
  as the client sees it, p50 of the time to the first streamed chunk, and the server process's
  CPU time per request (robust on a shared machine, where wall times of both sides stretch);
- throughput: `--clients` threads, client i on adapter i % `--adapters`, each sending requests
  back to back for `--seconds`; completion tokens per second, gRPC and HTTP phases alternating.
The gRPC side is `loraplex.runtime.client.Client`; the HTTP side plain JSON over keep-alive
connections (`httpx2`), or the `openai` client with `--client openai`. Clients run in this
process, on the same cores as the server: on a 2-core machine both sides pay for their client too.

The model: `--package`, or (default) the bench workload's tiny random Llama with 4 rank-16 adapters
(built once under bench/out/). A package with fewer adapters than `--adapters` gets copies of its
own loaded under new names (same weights; what matters here is the mixed-adapter path).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

PROMPT = "The weather today is calm and the river runs slowly past the old mill while"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.features.http_vs_grpc", description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, help="package to serve (default: the bench's tiny workload)")
    parser.add_argument("--engine", default="batched", choices=["batched", "genai"])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--latency-rounds", type=int, default=40, help="requests per front end, alternating")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=15.0, help="length of one throughput phase")
    parser.add_argument("--phases", type=int, default=2, help="throughput phases per front end (alternating)")
    parser.add_argument("--client", default="httpx", choices=["httpx", "openai"], help="the HTTP client")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def tiny_package() -> Path:
    from bench.workloads.random_llama import QUICK_SHAPE, Workload, build

    work = Workload(shape=dict(QUICK_SHAPE), total_adapters=4, served_adapters=4, n_prompts=8, precisions=("fp32",))
    return build(work).packages["fp32"]


class Served:
    """`loraplex serve` with both ports, and one client of each kind per thread."""

    def __init__(self, package: Path, engine: str, adapters: int, http_client: str):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "loraplex.runtime.app.cli", "serve", "--package", str(package), "--port", "0",
             "--http-port", "0", "--engine", engine, "--max-batch", "16", "--max-queue", "256"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        self.target = self.process.stdout.readline().split()[-1]
        self.base_url = self.process.stdout.readline().split()[-1]
        self.http_client = http_client
        self._local = threading.local()
        from loraplex.runtime.client import Client

        with Client(self.target) as client:
            names = [a.name for a in client.list_adapters()]
            for i in range(len(names), adapters):
                source = names[i % len(names)]
                client.load_adapter(f"{source}-copy{i}", f"{source}.onnx_adapter")
            self.adapters = [a.name for a in client.list_adapters()][:adapters]

    def grpc(self):
        if not hasattr(self._local, "grpc"):
            from loraplex.runtime.client import Client

            self._local.grpc = Client(self.target, timeout=600)
        return self._local.grpc

    def http(self):
        if not hasattr(self._local, "http"):
            if self.http_client == "openai":
                import openai

                self._local.http = openai.OpenAI(base_url=self.base_url, api_key="unused", max_retries=0)
            else:
                import httpx2

                self._local.http = httpx2.Client(base_url=self.base_url, timeout=600)
        return self._local.http

    def grpc_request(self, adapter: str, tokens: int, stream: bool = False) -> tuple[int, float | None]:
        start = time.perf_counter()
        if stream:
            first = None
            count = 0
            for chunk in self.grpc().stream(adapter, PROMPT, max_new_tokens=tokens, ignore_eos=True):
                if chunk.token_ids and first is None:
                    first = time.perf_counter() - start
                count += len(chunk.token_ids)
            return count, first
        return len(self.grpc().generate(adapter, PROMPT, max_new_tokens=tokens, ignore_eos=True).token_ids), None

    def http_request(self, adapter: str, tokens: int, stream: bool = False) -> tuple[int, float | None]:
        body = {"model": adapter, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
        start = time.perf_counter()
        client = self.http()
        if self.http_client == "openai":
            extra = body.pop("ignore_eos")
            if not stream:
                return client.completions.create(**body, extra_body={"ignore_eos": extra}).usage.completion_tokens, None
            first = None
            for chunk in client.completions.create(**body, stream=True, extra_body={"ignore_eos": extra}):
                if first is None and chunk.choices and chunk.choices[0].text:
                    first = time.perf_counter() - start
            return tokens, first
        if not stream:
            answer = client.post("/completions", json=body)
            return answer.json()["usage"]["completion_tokens"], None
        first = None
        with client.stream("POST", "/completions", json={**body, "stream": True}) as answer:
            for line in answer.iter_lines():
                if first is None and line.startswith("data: {"):
                    first = time.perf_counter() - start
        return tokens, first

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(60)


def latency(served: Served, rounds: int, tokens: int, block: int = 10) -> dict:
    """Blocks of `block` requests per front end, alternating; wall time per request, and the server
    process's CPU time per request (user + system, per block: a shared machine slows the wall clock
    of both sides, CPU time shows what each front end costs the server)."""
    import psutil

    server = psutil.Process(served.process.pid)
    adapter = served.adapters[0]
    sides: dict[str, Callable] = {"grpc": served.grpc_request, "http": served.http_request}
    for side in sides.values():  # connections open, both paths warm
        for stream in (False, True):
            side(adapter, tokens, stream)
    total: dict[str, list[float]] = {name: [] for name in sides}
    first: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    for b in range(max(1, rounds // block)):
        order = list(sides.items()) if b % 2 == 0 else list(sides.items())[::-1]
        for name, side in order:
            before = sum(server.cpu_times()[:2])
            for _ in range(block):
                start = time.perf_counter()
                side(adapter, tokens)
                total[name].append(time.perf_counter() - start)
            cpu[name].append((sum(server.cpu_times()[:2]) - before) / block)
            for _ in range(block):
                first[name].append(side(adapter, tokens, True)[1])
    return {name: {"p50_ms": _pct(total[name], 50), "p90_ms": _pct(total[name], 90),
                   "first_chunk_p50_ms": _pct(first[name], 50),
                   "server_cpu_ms_per_request": 1000 * statistics.median(cpu[name])} for name in sides}


def throughput(served: Served, clients: int, seconds: float, tokens: int, phases: int) -> dict:
    sides = {"grpc": served.grpc_request, "http": served.http_request}
    out: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(phases):
        for name, side in sides.items():
            out[name].append(_phase(side, served.adapters, clients, seconds, tokens))
    return {name: {"tokens_per_s": statistics.mean(v), "phases": v} for name, v in out.items()}


def _phase(side: Callable, adapters: list[str], clients: int, seconds: float, tokens: int) -> float:
    counts = [0] * clients
    deadline = [0.0]
    ready = threading.Barrier(clients + 1)

    def run(i: int) -> None:
        side(adapters[i % len(adapters)], 1)  # this thread's connection, opened before the clock starts
        ready.wait()
        while time.perf_counter() < deadline[0]:
            counts[i] += side(adapters[i % len(adapters)], tokens)[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    deadline[0] = time.perf_counter() + 3600
    ready.wait()
    start = time.perf_counter()
    deadline[0] = start + seconds
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def _pct(values: list[float], q: int) -> float:
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _machine() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{socket.gethostname()}, {os.cpu_count()} cores, load average {load}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # a line per request otherwise
    package = args.package or tiny_package()
    served = Served(package, args.engine, args.adapters, args.client)
    try:
        lat = latency(served, args.latency_rounds, args.new_tokens)
        thr = throughput(served, args.clients, args.seconds, args.new_tokens, args.phases)
    finally:
        served.close()
    results = {"package": str(package), "engine": args.engine, "new_tokens": args.new_tokens,
               "http_client": args.client, "machine": _machine(), "latency": lat, "throughput": thr}
    g, h = lat["grpc"], lat["http"]
    print(f"package {package} ({args.engine} engine), {args.new_tokens} new tokens, HTTP client {args.client}")
    print(f"machine: {results['machine']} (at the end)")
    print(f"single request p50: gRPC {g['p50_ms']:.1f} ms, HTTP {h['p50_ms']:.1f} ms "
          f"(+{h['p50_ms'] - g['p50_ms']:.1f} ms); p90 {g['p90_ms']:.1f} / {h['p90_ms']:.1f} ms")
    print(f"first streamed chunk p50: gRPC {g['first_chunk_p50_ms']:.1f} ms, HTTP {h['first_chunk_p50_ms']:.1f} ms")
    print(f"server CPU per request (median of blocks): gRPC {g['server_cpu_ms_per_request']:.1f} ms, "
          f"HTTP {h['server_cpu_ms_per_request']:.1f} ms")
    tg, th = thr["grpc"]["tokens_per_s"], thr["http"]["tokens_per_s"]
    print(f"{args.clients} clients over {args.adapters} adapters: gRPC {tg:.0f} tok/s, HTTP {th:.0f} tok/s "
          f"({th / tg:.2f}x); phases gRPC {[round(x) for x in thr['grpc']['phases']]}, "
          f"HTTP {[round(x) for x in thr['http']['phases']]}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
