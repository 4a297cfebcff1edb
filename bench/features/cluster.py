"""`python -m bench.features.cluster --package PKG`: loraplex on Ray Serve against `loraplex serve`, same machine.

Every system runs at once and the measurements interleave (in blocks of requests for latency, run by
run for throughput), so a shared machine's changing load hits all of them alike:
- `direct`: `loraplex serve` (one process, onnxruntime threads = physical cores);
- `cluster-1`: the cluster with one engine replica holding all the machine's CPUs;
- `cluster-2`: two engine replicas splitting the CPUs, loraplex's adapter-affinity router;
- `cluster-2-serve`: the same with Serve's own multiplexed routing, for comparison.
Each replica has as many adapter slots as its share of the adapters (2 replicas: half each).

Measures:
- latency of one client's sequential requests (1 and `--new-tokens` tokens), direct vs cluster-1:
  p50/p99 and their difference, the cost of Serve's proxy and the front end hop;
- throughput (completion tokens/s) of `--clients` concurrent clients over the adapters, median of
  `--rounds` runs per system, with the p50/p99 latency of those requests;
- adapter affinity: loads during a cold start of sequential round-robin requests (each cluster
  is deployed fresh), and the share of hits in the concurrent runs.
Prints a Markdown report and writes `bench/out/cluster/results.json` (not run by CI).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.paths import OUT_ROOT
from bench.systems.loraplex_server import LoraplexServer, free_port

log = logging.getLogger("bench.cluster")
OUT = OUT_ROOT / "cluster"
LATENCY_BLOCK = 10
PROMPT = "The weather today is bright and the streets are full of people walking to the market"


@dataclass
class Run:
    latencies_s: list[float] = field(default_factory=list)
    tokens: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0  # CPU the serving processes spent on these requests

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


@dataclass
class System:
    name: str
    target: str
    application: str | None = None
    http_port: int | None = None  # cluster: Serve's HTTP proxy, for the affinity counters

    def client(self):
        from loraplex.runtime.client import Client

        return Client(self.target, timeout=600, application=self.application)

    def affinity(self) -> tuple[float, float]:
        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://127.0.0.1:{self.http_port}/{self.application}/metrics"
        counts = {"hit": 0.0, "load": 0.0}
        for family in text_string_to_metric_families(urllib.request.urlopen(url, timeout=120).read().decode()):
            for sample in family.samples:
                if sample.name == "loraplex_adapter_affinity_total":
                    counts[sample.labels["outcome"]] += sample.value
        return counts["hit"], counts["load"]


def cpu_seconds(root: int, exclude: set[int] = frozenset()) -> float:
    """User + system CPU of `root`'s descendants (not `root` itself: the bench's clients), minus `exclude` trees."""
    import psutil

    total = 0.0
    skip: set[int] = set()
    for pid in exclude:
        with contextlib.suppress(psutil.Error):
            skip |= {pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))}
    for child in psutil.Process(root).children(recursive=True):
        if child.pid in skip:
            continue
        with contextlib.suppress(psutil.Error):
            times = child.cpu_times()
            total += times.user + times.system
    return total


def one_request(client, adapter: str, new_tokens: int) -> tuple[float, int]:
    start = time.perf_counter()
    response = client.generate(adapter, PROMPT, max_new_tokens=new_tokens, ignore_eos=True)
    return time.perf_counter() - start, len(response.token_ids)


def concurrent(system: System, adapters: list[str], clients: int, requests: int, new_tokens: int) -> Run:
    """`clients` threads, `requests` each, adapters round-robin (offset per client)."""
    run, lock = Run(), threading.Lock()

    def worker(index: int) -> None:
        with system.client() as client:
            for k in range(requests):
                elapsed, tokens = one_request(client, adapters[(index + k) % len(adapters)], new_tokens)
                with lock:
                    run.latencies_s.append(elapsed)
                    run.tokens += tokens

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    run.wall_s = time.perf_counter() - start
    return run


def _own(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def deploy_cluster(args, name: str, ports: tuple[int, int], replicas: int, adapters: int, *,
                   affinity_router: bool = True) -> System:
    from loraplex.runtime.cluster.app import deploy
    from loraplex.runtime.cluster.config import ClusterConfig
    from loraplex.runtime.server import ServerConfig

    cores = args.cores
    server = ServerConfig(package=args.package, engine="batched", max_batch=args.max_batch, max_queue=1024,
                          max_slots=-(-adapters // replicas), intra_op_threads=max(1, cores // replicas))
    config = ClusterConfig(server=server, app_name=name, grpc_port=ports[0], http_port=ports[1], replicas=replicas,
                           replica_cpus=cores / replicas, affinity_router=affinity_router)
    deploy(config)
    return System(name, f"127.0.0.1:{ports[0]}", name, ports[1])


def measure(args) -> dict:
    import ray
    from loraplex.adapters.package.manifest import Manifest

    adapters = sorted(Manifest.load(args.package).adapters)[: args.adapters]
    results: dict = {"adapters": adapters, "load_average_start": os.getloadavg()}
    direct_server = LoraplexServer(args.package, "batched", log_dir=OUT / "logs", max_batch=args.max_batch,
                                   extra_args=("--max-slots", str(len(adapters))))
    direct = System("direct", direct_server.target)
    ray.init(num_cpus=6 * args.cores, include_dashboard=False, log_to_driver=False)  # accounting only
    ports = (free_port(), free_port())
    try:
        clusters = {"cluster-1": deploy_cluster(args, "cluster-1", ports, 1, len(adapters))}
        for system in (direct, clusters["cluster-1"]):  # warm: every adapter placed, sessions run
            concurrent(system, adapters, len(adapters), 2, 4)
        log.info("latency, interleaved in blocks (only direct and cluster-1 deployed)")
        server_pid = direct_server.process.pid
        for new_tokens in (1, args.new_tokens):
            runs = {s.name: Run() for s in (direct, clusters["cluster-1"])}
            clients = {name: s.client() for name, s in (("direct", direct), ("cluster-1", clusters["cluster-1"]))}
            for block in range(0, args.latency_requests, LATENCY_BLOCK):
                for name, client in clients.items():
                    # Blocks, not alternate requests: onnxruntime's threads spin a while after each run and
                    # would steal the other process's CPU on a 2-core machine.
                    cpu = (lambda: cpu_seconds(server_pid) + _own(server_pid)) if name == "direct" else (
                        lambda: cpu_seconds(os.getpid(), exclude={server_pid}))
                    before = cpu()
                    for k in range(block, min(block + LATENCY_BLOCK, args.latency_requests)):
                        elapsed, _ = one_request(client, adapters[k % len(adapters)], new_tokens)
                        runs[name].latencies_s.append(elapsed)
                    runs[name].cpu_s += cpu() - before
            for client in clients.values():
                client.close()
            results[f"latency/{new_tokens}"] = runs

        for name, affinity_router in (("cluster-2", True), ("cluster-2-serve", False)):
            log.info("deploying %s", name)
            clusters[name] = deploy_cluster(args, name, ports, 2, len(adapters), affinity_router=affinity_router)
            with clusters[name].client() as client:  # cold start: sequential round-robin over the adapters
                for k in range(args.cold_requests):
                    one_request(client, adapters[k % len(adapters)], 1)
            hits, loads = clusters[name].affinity()
            results[f"{name}/cold"] = {"requests": args.cold_requests, "loads": loads, "hits": hits}
        systems = [direct, *clusters.values()]
        for system in systems:
            concurrent(system, adapters, len(adapters), 2, 4)

        log.info("throughput, %d rounds", args.rounds)
        before = {s.name: s.affinity() for s in systems if s.http_port}
        throughput: dict[str, list[Run]] = {s.name: [] for s in systems}
        for round_ in range(args.rounds):
            for system in systems:
                throughput[system.name].append(concurrent(system, adapters, args.clients, args.requests,
                                                          args.new_tokens))
            log.info("round %d done", round_ + 1)
        results["throughput"] = throughput
        results["affinity"] = {}
        for system in systems:
            if system.http_port:
                hits, loads = system.affinity()
                results["affinity"][system.name] = {"hits": hits - before[system.name][0],
                                                    "loads": loads - before[system.name][1]}
    finally:
        direct_server.close()
        ray.shutdown()
    results["load_average_end"] = os.getloadavg()
    return results


def report(results: dict, args) -> str:
    def lat(run: Run) -> str:
        return f"{run.pct(0.5):.1f} / {run.pct(0.99):.1f}"

    lines = [
        f"Package `{args.package.name}` ({', '.join(results['adapters'])}), batched engine, max_batch "
        f"{args.max_batch}, greedy, EOS ignored; {args.cores} cores; load average "
        f"{results['load_average_start'][0]:.1f} at start, {results['load_average_end'][0]:.1f} at the end.",
        "",
        f"| latency, 1 client, blocks of {LATENCY_BLOCK} interleaved (ms) | p50 / p99, 1 token | "
        f"p50 / p99, {args.new_tokens} tokens |",
        "|---|---|---|",
    ]
    short, long = results["latency/1"], results[f"latency/{args.new_tokens}"]
    for name, label in (("direct", "`loraplex serve`"), ("cluster-1", "cluster, 1 replica")):
        lines.append(f"| {label} | {lat(short[name])} | {lat(long[name])} |")
    cpu = {name: short[name].cpu_s / len(short[name].latencies_s) * 1000 for name in ("direct", "cluster-1")}
    lines.append(
        f"| added by Serve's proxy + the front end | {short['cluster-1'].pct(.5) - short['direct'].pct(.5):+.1f} / "
        f"{short['cluster-1'].pct(.99) - short['direct'].pct(.99):+.1f} | "
        f"{long['cluster-1'].pct(.5) - long['direct'].pct(.5):+.1f} / "
        f"{long['cluster-1'].pct(.99) - long['direct'].pct(.99):+.1f} |"
    )
    lines += ["", f"CPU per 1-token request, all serving processes: `loraplex serve` {cpu['direct']:.1f} ms, "
              f"cluster {cpu['cluster-1']:.1f} ms (Serve's proxy, front end, replica, Ray's own processes)."]
    lines += ["", f"| throughput, {args.clients} clients, {args.new_tokens} tokens | tokens/s (median of "
              f"{args.rounds}) | p50 / p99 latency (ms) | adapter hits |", "|---|---|---|---|"]
    labels = {"direct": "`loraplex serve`", "cluster-1": "cluster, 1 replica",
              "cluster-2": "cluster, 2 replicas (loraplex router)",
              "cluster-2-serve": "cluster, 2 replicas (Serve's multiplexed routing)"}
    for name, runs in results["throughput"].items():
        merged = Run([x for r in runs for x in r.latencies_s])
        tps = statistics.median(r.tokens_per_s for r in runs)
        hit = results["affinity"].get(name)
        share = f"{hit['hits'] / max(1.0, hit['hits'] + hit['loads']):.1%}" if hit else "-"
        lines.append(f"| {labels[name]} | {tps:.1f} | {lat(merged)} | {share} |")
    lines += ["", "| cold start, sequential round-robin over the adapters | requests | loads | hits |",
              "|---|---|---|---|"]
    for name in ("cluster-2", "cluster-2-serve"):
        cold = results[f"{name}/cold"]
        lines.append(f"| {labels[name]} | {cold['requests']} | {cold['loads']:.0f} | {cold['hits']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.features.cluster", description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, required=True)
    parser.add_argument("--adapters", type=int, default=4, help="adapters the requests spread over")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=6, help="per client, in each throughput run")
    parser.add_argument("--rounds", type=int, default=3, help="throughput runs per system (interleaved)")
    parser.add_argument("--latency-requests", type=int, default=40)
    parser.add_argument("--cold-requests", type=int, default=40)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    results = measure(args)
    text = report(results, args)
    print(text)
    OUT.mkdir(parents=True, exist_ok=True)

    def plain(value):
        if isinstance(value, Run):
            return {"p50_ms": value.pct(0.5), "p99_ms": value.pct(0.99), "requests": len(value.latencies_s),
                    "tokens_per_s": value.tokens_per_s if value.wall_s else None}
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    (OUT / "results.json").write_text(json.dumps(plain(results), indent=2))
    (OUT / "RESULTS.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
