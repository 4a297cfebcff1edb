"""`python -m bench.cluster --package PKG`: loraplex on Ray Serve against `loraplex serve`, same machine.

Measures, on one package and one machine (not run by CI; needs the `ray` extra):
- latency of one client's sequential requests, direct (`loraplex serve`) and through the cluster
  (Serve's gRPC proxy -> front end -> one engine replica): p50/p99, and their difference, the
  cost of the proxy and the front end hop;
- throughput (completion tokens/s) of `--clients` concurrent clients over `--adapters` adapters:
  direct, cluster with 1 replica, cluster with 2 replicas (the CPUs split between them);
- adapter affinity with 2 replicas: the share of requests that found their adapter already on
  the replica they reached (`loraplex_adapter_affinity_total`), with loraplex's router and with
  Serve's own multiplexed routing.
Prints a Markdown report and writes `bench/out/cluster/results.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench.sys_loraplex import LoraplexServer, _free_port

log = logging.getLogger("bench.cluster")
OUT = Path(__file__).parent / "out" / "cluster"
PROMPT = "The weather today is bright and the streets are full of people walking to the market"


@dataclass
class Run:
    latencies_s: list[float]
    tokens: int
    wall_s: float

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


def drive(target: str, adapters: list[str], *, clients: int, requests: int, new_tokens: int) -> Run:
    """`clients` threads, `requests` each, adapters round-robin (offset per client)."""
    from loraplex.runtime.client import Client

    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()

    def worker(index: int) -> None:
        with Client(target, timeout=300) as client:
            for k in range(requests):
                adapter = adapters[(index + k) % len(adapters)]
                start = time.perf_counter()
                response = client.generate(adapter, PROMPT, max_new_tokens=new_tokens, ignore_eos=True)
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    tokens[0] += len(response.token_ids)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return Run(latencies, tokens[0], time.perf_counter() - start)


def affinity(http_port: int, app: str) -> tuple[float, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/{app}/metrics", timeout=60).read().decode()
    counts = {"hit": 0.0, "load": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "loraplex_adapter_affinity_total":
                counts[sample.labels["outcome"]] += sample.value
    return counts["hit"], counts["load"]


def measure_direct(args, adapters: list[str]) -> dict:
    server = LoraplexServer(args.package, "batched", log_dir=OUT / "logs", max_batch=args.max_batch,
                            extra_args=("--max-slots", str(args.slots)))
    try:
        drive(server.target, adapters, clients=1, requests=4, new_tokens=4)  # warm
        return {
            "latency_1tok": drive(server.target, adapters, clients=1, requests=args.latency_requests, new_tokens=1),
            "latency": drive(server.target, adapters, clients=1, requests=args.latency_requests,
                             new_tokens=args.new_tokens),
            "throughput": drive(server.target, adapters, clients=args.clients, requests=args.requests,
                                new_tokens=args.new_tokens),
        }
    finally:
        server.close()


def measure_cluster(args, adapters: list[str], ports: tuple[int, int], *, replicas: int,
                    affinity_router: bool = True, latency: bool = True) -> dict:
    from loraplex.runtime.cluster.app import deploy, undeploy
    from loraplex.runtime.cluster.config import ClusterConfig
    from loraplex.runtime.server import ServerConfig

    cpus = os.cpu_count() or 2
    server = ServerConfig(package=args.package, engine="batched", max_batch=args.max_batch, max_queue=1024,
                          max_slots=args.slots)
    config = ClusterConfig(server=server, grpc_port=ports[0], http_port=ports[1], replicas=replicas,
                           replica_cpus=cpus / replicas, affinity_router=affinity_router)
    deploy(config)
    target = f"127.0.0.1:{ports[0]}"
    try:
        drive(target, adapters, clients=len(adapters), requests=2, new_tokens=4)  # warm: every adapter placed
        result: dict = {}
        if latency:
            result["latency_1tok"] = drive(target, adapters, clients=1, requests=args.latency_requests, new_tokens=1)
            result["latency"] = drive(target, adapters, clients=1, requests=args.latency_requests,
                                      new_tokens=args.new_tokens)
        hits, loads = affinity(ports[1], config.app_name)
        result["throughput"] = drive(target, adapters, clients=args.clients, requests=args.requests,
                                     new_tokens=args.new_tokens)
        hits2, loads2 = affinity(ports[1], config.app_name)
        result["affinity"] = {"hits": hits2 - hits, "loads": loads2 - loads}
        return result
    finally:
        undeploy(config)


def report(results: dict, args) -> str:
    def lat(run: Run) -> str:
        return f"{run.pct(0.5):.1f} / {run.pct(0.99):.1f}"

    direct, one = results["direct"], results["cluster_1"]
    lines = [
        f"package `{args.package}`, batched engine, max_batch {args.max_batch}, {args.slots} adapter slots per "
        f"replica, {len(results['adapters'])} adapters, {args.new_tokens} new tokens (ignore_eos), "
        f"load average at start {results['load_average']}",
        "",
        "| latency, 1 client, sequential (ms) | p50 / p99, 1 token | p50 / p99, "
        f"{args.new_tokens} tokens |",
        "|---|---|---|",
        f"| `loraplex serve` | {lat(direct['latency_1tok'])} | {lat(direct['latency'])} |",
        f"| cluster, 1 replica (proxy + front end) | {lat(one['latency_1tok'])} | {lat(one['latency'])} |",
        f"| added by the cluster | {one['latency_1tok'].pct(.5) - direct['latency_1tok'].pct(.5):+.1f} / "
        f"{one['latency_1tok'].pct(.99) - direct['latency_1tok'].pct(.99):+.1f} | "
        f"{one['latency'].pct(.5) - direct['latency'].pct(.5):+.1f} / "
        f"{one['latency'].pct(.99) - direct['latency'].pct(.99):+.1f} |",
        "",
        f"| throughput, {args.clients} clients | tokens/s | p50 / p99 latency (ms) | affinity hits |",
        "|---|---|---|---|",
    ]
    for key, label in (("direct", "`loraplex serve`"), ("cluster_1", "cluster, 1 replica"),
                       ("cluster_2", "cluster, 2 replicas (loraplex router)"),
                       ("cluster_2_serve_router", "cluster, 2 replicas (Serve's multiplexed routing)")):
        run = results[key]["throughput"]
        hit = results[key].get("affinity")
        share = f"{hit['hits'] / max(1.0, hit['hits'] + hit['loads']):.1%} ({hit['loads']:.0f} loads)" if hit else "-"
        lines.append(f"| {label} | {run.tokens_per_s:.1f} | {lat(run)} | {share} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, required=True)
    parser.add_argument("--adapters", type=int, default=4, help="adapters the requests spread over")
    parser.add_argument("--slots", type=int, default=2, help="adapter slots per replica")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=12, help="per client, in the throughput runs")
    parser.add_argument("--latency-requests", type=int, default=60)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import ray
    from loraplex.adapters.package.manifest import Manifest

    adapters = sorted(Manifest.load(args.package).adapters)[: args.adapters]
    results: dict = {"adapters": adapters, "load_average": " ".join(f"{x:.1f}" for x in os.getloadavg())}
    log.info("direct loraplex serve")
    results["direct"] = measure_direct(args, adapters)
    ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    ports = (_free_port(), _free_port())
    try:
        log.info("cluster, 1 replica")
        results["cluster_1"] = measure_cluster(args, adapters, ports, replicas=1)
        log.info("cluster, 2 replicas")
        results["cluster_2"] = measure_cluster(args, adapters, ports, replicas=2, latency=False)
        log.info("cluster, 2 replicas, Serve's own multiplexed routing")
        results["cluster_2_serve_router"] = measure_cluster(args, adapters, ports, replicas=2, affinity_router=False,
                                                            latency=False)
    finally:
        ray.shutdown()
    text = report(results, args)
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)

    def plain(value):
        if isinstance(value, Run):
            return {"p50_ms": value.pct(0.5), "p99_ms": value.pct(0.99), "tokens_per_s": value.tokens_per_s,
                    "requests": len(value.latencies_s), "mean_ms": statistics.mean(value.latencies_s) * 1000}
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    (OUT / "results.json").write_text(json.dumps(plain(results), indent=2))
    (OUT / "RESULTS.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
