"""The server's metrics without prometheus_client until something reads the registry: a plain serve
never imports it, and the registry, once made, exposes what prometheus_client's own metrics would."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from loraplex.runtime.client import Client
from loraplex.runtime.server.metrics import LATENCY_BUCKETS, ServerMetrics

from tests.fixtures.serving import ENGINES, wait_until

# `loraplex serve` that answers each line on its stdin with whether prometheus_client is imported.
REPORTING_SERVE = """
import sys, threading

def report():
    for _ in sys.stdin:
        print("prometheus_client imported:", "prometheus_client" in sys.modules, flush=True)

threading.Thread(target=report, daemon=True).start()
from loraplex.runtime.app.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _serve(package, engine: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", REPORTING_SERVE, "serve", "--package", str(package), "--port", "0",
         "--engine", engine, *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _prometheus_imported(process: subprocess.Popen) -> bool:
    process.stdin.write("?\n")
    process.stdin.flush()
    line = process.stdout.readline()
    assert line.startswith("prometheus_client imported: "), line + process.stderr.read()
    return line.split()[-1] == "True"


@pytest.mark.parametrize("engine", ENGINES)
def test_a_plain_serve_never_imports_prometheus_client(recipe_package, engine):
    process = _serve(recipe_package, engine)
    try:
        serving = process.stdout.readline()
        assert serving.startswith("loraplex serving on "), serving + process.stderr.read()
        with Client(serving.split()[-1], timeout=60) as client:
            assert client.generate("alpha", "hello", max_new_tokens=2, ignore_eos=True).usage.completion_tokens == 2
            client.unload_adapter("beta")
        assert not _prometheus_imported(process)
    finally:
        process.terminate()
        process.wait(30)


def test_a_serve_with_a_metrics_port_exports_what_it_counted(recipe_package):
    import urllib.request

    process = _serve(recipe_package, "batched", "--metrics-port", "0")
    try:
        lines = [process.stdout.readline() for _ in range(2)]
        serving = next((line for line in lines if line.startswith("loraplex serving on ")), None)
        metrics = next((line for line in lines if "metrics" in line), None)
        assert serving and metrics, "".join(lines) + process.stderr.read()
        assert _prometheus_imported(process)
        port = re.search(r":(\d+)/metrics", metrics).group(1)

        def scraped(name: str) -> float:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
            found = re.search(rf'^{name}{{adapter="alpha",status="OK"}} (\S+)$', text, re.MULTILINE)
            return float(found.group(1)) if found else 0.0

        requests, tokens = scraped("loraplex_requests_total"), scraped("loraplex_completion_tokens_total")  # warm-up
        with Client(serving.split()[-1], timeout=60) as client:
            assert client.generate("alpha", "hello", max_new_tokens=2, ignore_eos=True).usage.completion_tokens == 2
        # the request is counted once its reply has gone out
        wait_until(lambda: scraped("loraplex_requests_total") == requests + 1, what="the request counted")
        assert scraped("loraplex_completion_tokens_total") == tokens + 2
    finally:
        process.terminate()
        process.wait(30)


def _masked(text: str) -> str:
    return re.sub(r"(_created(\{[^}]*\})?) \S+", r"\1 T", text)


def test_the_registry_exposes_what_prometheus_client_metrics_would():
    """Counts made before the registry exists are in it, and the exposition equals that of
    prometheus_client's Counter, Gauge and Histogram given the same calls (timestamps aside)."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    ours = ServerMetrics()
    reference = CollectorRegistry()
    theirs = {
        "requests": Counter("loraplex_requests", "Generation requests finished, by adapter and status",
                            ["adapter", "status"], registry=reference),
        "tokens": Counter("loraplex_completion_tokens", "Completion tokens produced, by adapter and status",
                          ["adapter", "status"], registry=reference),
        "prompt_tokens": Counter("loraplex_prompt_tokens", "Prompt tokens processed", ["adapter"], registry=reference),
        "queue_depth": Gauge("loraplex_queue_depth", "Requests waiting for a decoding slot", registry=reference),
        "in_flight": Gauge("loraplex_in_flight", "Requests admitted and not finished", registry=reference),
        "ttft": Histogram("loraplex_time_to_first_token_seconds", "Request received -> first token decoded",
                          ["adapter"], buckets=LATENCY_BUCKETS, registry=reference),
        "token_latency": Histogram("loraplex_inter_token_latency_seconds",
                                   "Time between consecutive tokens of a request", ["adapter"],
                                   buckets=LATENCY_BUCKETS, registry=reference),
        "loaded_adapters": Gauge("loraplex_loaded_adapters", "Adapters loaded (current versions)", registry=reference),
        "adapter_loads": Counter("loraplex_adapter_loads", "Adapter Load/Unload calls by action and status",
                                 ["action", "status"], registry=reference),
    }
    for metrics in (ours, theirs):
        get = metrics.__getitem__ if isinstance(metrics, dict) else lambda name: getattr(ours, name)
        get("requests").labels("", "OK").inc()
        get("requests").labels("a", "CANCELLED").inc()
        get("tokens").labels("a", "OK").inc(5)
        get("prompt_tokens").labels("a").inc(12)
        get("queue_depth").set_function(lambda: 3)
        get("in_flight").set_function(lambda: 2)
        for value in (0.0005, 0.001, 0.003, 0.7, 10.0, 20.0):
            get("ttft").labels("a").observe(value)
        get("token_latency").labels("").observe(0.02)
        get("loaded_adapters").set(2)
        get("adapter_loads").labels("load", "OK").inc()
    assert "prometheus_client" in sys.modules  # imported by this test; the registry is made below
    assert _masked(generate_latest(ours.registry).decode()) == _masked(generate_latest(reference).decode())
    ours.requests.labels("", "OK").inc()  # counted after the registry was made: seen at the next scrape
    assert ours.registry.get_sample_value("loraplex_requests_total", {"adapter": "", "status": "OK"}) == 2.0
