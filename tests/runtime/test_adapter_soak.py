"""The soak of `loraplex serve` (tests.fixtures.soak) with no host copies kept (`--adapter-cache-mib 0`)
and two bank slots: every adapter not in use is dropped and read again from its file by its next
request, while cancels, deadlines, hot replaces and unloads go on. Only documented codes, greedy
outputs unchanged, no error in the server's log, and the tiers actually churned."""

from __future__ import annotations

import pytest
from loraplex.runtime.client import Client

from tests.fixtures.serving import ENGINES
from tests.fixtures.soak import ALLOWED, ServeProcess, run_soak


@pytest.mark.parametrize("engine", ENGINES)
def test_the_soak_with_every_idle_adapter_dropped(engine, recipe_package, adapter_root, tmp_path):
    requests = 600
    serve = ServeProcess(recipe_package, engine, adapter_root, tmp_path / "serve.log", "--adapter-cache-mib", "0",
                         "--max-slots", "2")
    try:
        report, before, after = run_soak(serve, engine, requests)
        text = serve.metrics_text()
        with Client(serve.target, timeout=60) as client:
            listed = {a.name: a for a in client.list_adapters()}
    finally:
        assert serve.stop() == 0
    assert set(report.codes) <= ALLOWED, report.summary()
    assert set(report.admin) <= {"OK", "FAILED_PRECONDITION"}, report.summary()
    assert report.codes["OK"] >= 0.75 * requests, report.summary()
    assert after == before  # greedy outputs unchanged by the drops and re-reads
    assert set(report.server_codes) <= {"OK", "CANCELLED"}, report.summary()
    errors = [line for line in serve.log.read_text().splitlines() if " ERROR " in line]
    assert not [line for line in errors if "ExecuteBatchError raised in core" not in line], errors
    misses = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                 if line.startswith("loraplex_adapter_lookups_total{") and 'tier="disk"' in line)
    assert misses >= 20 and sum(a.evictions for a in listed.values()) >= 3, (misses, listed)
