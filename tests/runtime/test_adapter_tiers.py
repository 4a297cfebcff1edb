"""The adapters' host tier: copies beyond the budget are dropped (least recently used, never one a
request holds, never a pinned one) and read again from their file on next use, with the same greedy
tokens as the adapter alone. On both engines (batched: bank slots <- host <- disk; genai: og.Adapters
entries <- disk)."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from loraplex.runtime.server.registry import residency

from tests.fixtures.reference import genai_reference
from tests.fixtures.serving import EngineBrake, record_digest, wait_until

PROMPT = "Review: the movie was great\nSentiment:"


def tier(server, name: str):
    registry = server.running.registry
    return residency(registry.engine, registry.get(name))


def reference(recipe_package, file, ids, n=6):
    return genai_reference(recipe_package, file, ids, n)


def test_host_copies_are_dropped_and_read_again_with_requests_in_flight(server_factory, recipe_package,
                                                                        adapter_root):
    server = server_factory(adapter_root=adapter_root, adapter_cache_mib=0, max_slots=1, max_batch=4,
                            metrics_port=None)
    files = {n: recipe_package / "adapters" / f"{n}.onnx_adapter" for n in ("alpha", "beta", "gamma")}
    files["delta"] = adapter_root / "alpha_half.onnx_adapter"
    with server.client() as client:
        ids = tuple(client.tokenize("alpha", PROMPT))
        want = {n: reference(recipe_package, f, ids) for n, f in files.items()}
        with EngineBrake(server) as brake:
            brake.hold()
            stream = client.stream("alpha", PROMPT, max_new_tokens=6)
            next(stream)  # alpha is in flight, its engine held at its first token
            assert brake.held.wait(30), "alpha's first token never reached the brake"  # its prefill ran
            wait_until(lambda: server.running.registry.get("alpha").leases == 1, what="alpha in flight")
            # Its file read again if it was on disk (off the engine), then held at its first token.
            wait_until(lambda: tier(server, "alpha").tier != "disk", what="alpha in memory")
            client.load_adapter("delta", "alpha_half.onnx_adapter")  # over budget: unheld copies go
            assert tier(server, "alpha").tier != "disk"  # held by the request in flight
            assert {tier(server, n).tier for n in ("beta", "gamma", "delta")} == {"disk"}
            brake.release()
            assert [t for chunk in stream for t in chunk.token_ids] == want["alpha"]
        evicted = {n: tier(server, n).evictions for n in files}
        with ThreadPoolExecutor(8) as pool:  # every adapter read again, mixed in one batch
            replies = {(n, i): pool.submit(client.generate, n, PROMPT, max_new_tokens=6)
                       for i in range(2) for n in files}
            for (name, _), reply in replies.items():
                assert list(reply.result(60).token_ids) == want[name], name
    for name in ("beta", "gamma", "delta"):
        state = tier(server, name)
        assert evicted[name] >= 1 and state.loads >= 2 and state.misses >= 1, (name, state)
    assert server.running.registry.engine.executor.cache.bytes == 0  # nothing held: nothing kept


def test_a_pinned_adapter_is_never_evicted(server_factory, adapter_root):
    server = server_factory(adapter_root=adapter_root, adapter_cache_mib=0, max_slots=1, pin=["beta"],
                            metrics_port=None)
    with server.client() as client:
        for name in ("alpha", "gamma", "alpha", "beta", "gamma"):
            client.generate(name, PROMPT, max_new_tokens=2)
        client.load_adapter("delta", "alpha_half.onnx_adapter")
        client.generate("delta", PROMPT, max_new_tokens=2)
    beta, alpha = tier(server, "beta"), tier(server, "alpha")
    assert beta.pinned and beta.evictions == 0 and beta.tier != "disk" and beta.loads == 1 and beta.misses == 0
    assert alpha.evictions >= 1 and alpha.tier == "disk"


def test_a_budget_keeps_the_most_recently_used_copies(server_factory):
    server = server_factory(max_slots=1, metrics_port=None)
    cache = server.running.registry.engine.executor.cache
    size = {n: tier(server, n).nbytes for n in ("alpha", "beta", "gamma")}
    assert size["beta"] > size["alpha"]
    cache.budget = size["alpha"] + size["gamma"]  # room for the two most recently used, not for beta too
    with server.client() as client:
        for name in ("alpha", "beta", "gamma", "alpha"):  # beta, gamma, alpha: least recent first
            client.generate(name, PROMPT, max_new_tokens=2)
    assert tier(server, "beta").tier == "disk" and tier(server, "beta").evictions >= 1
    assert cache.bytes <= cache.budget
    assert {tier(server, "gamma").tier, tier(server, "alpha").tier} <= {"host", "slot"}


def test_a_file_changed_after_its_copy_was_dropped_fails_only_its_request(server_factory, recipe_package,
                                                                         tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(recipe_package / "adapters" / "alpha.onnx_adapter", store / "delta.onnx_adapter")
    record_digest(store / "delta.onnx_adapter")
    server = server_factory(adapter_stores=[store], adapter_cache_mib=0, max_slots=1, metrics_port=None)
    with server.client() as client:
        client.generate("delta", PROMPT, max_new_tokens=2)
        client.generate("beta", PROMPT, max_new_tokens=2)  # delta leaves the slot, its copy is dropped
        wait_until(lambda: tier(server, "delta").tier == "disk", what="delta dropped")
        shutil.copy(recipe_package / "adapters" / "beta.onnx_adapter", store / "delta.onnx_adapter")
        with pytest.raises(grpc.RpcError) as err:
            client.generate("delta", PROMPT, max_new_tokens=2)
        assert "changed since it was loaded" in err.value.details()
        assert len(client.generate("alpha", PROMPT, max_new_tokens=2).token_ids) == 2


def test_list_models_and_metrics_show_each_adapters_tier(server_factory, adapter_root):
    import json
    import urllib.request

    server = server_factory(adapter_root=adapter_root, adapter_cache_mib=0, max_slots=1, http_port=0)
    with server.client() as client:
        client.generate("alpha", PROMPT, max_new_tokens=2)
        client.generate("beta", PROMPT, max_new_tokens=2)  # alpha leaves the slot and is dropped
        client.generate("alpha", PROMPT, max_new_tokens=2)  # a miss: read again
        pinned = client.load_adapter("delta", "alpha_half.onnx_adapter", pin=True)
        listed = {a.name: a for a in client.list_adapters()}
    assert pinned.pinned and pinned.tier == "host" and pinned.loads == 1 and pinned.host_bytes > 0
    alpha, beta = listed["alpha"], listed["beta"]
    assert alpha.loads >= 2 and alpha.evictions >= 1 and alpha.misses >= 1 and alpha.host_bytes > 0
    assert beta.tier == "disk" and beta.evictions >= 1 and not beta.pinned
    if server.config.engine == "batched":
        assert alpha.tier == "slot"
    with urllib.request.urlopen(f"{server.running.http.url}/v1/models", timeout=30) as response:
        cards = {card["id"]: card for card in json.load(response)["data"]}
    assert cards["beta"]["residency"] == {"tier": "disk", "host_bytes": beta.host_bytes, "loads": beta.loads,
                                          "evictions": beta.evictions, "pinned": False}
    assert cards["delta"]["residency"]["pinned"] is True
    with urllib.request.urlopen(f"http://127.0.0.1:{server.running.metrics_port}/metrics", timeout=30) as response:
        text = response.read().decode()
    assert f'loraplex_adapter_lookups_total{{adapter="alpha",tier="disk"}} {float(alpha.misses)}' in text
    assert f'loraplex_adapter_evictions_total{{adapter="beta"}} {float(beta.evictions)}' in text
    assert "loraplex_adapter_cache_budget_bytes 0.0" in text


def test_a_replaced_version_leaves_the_cache_after_its_last_request(server_factory, adapter_root):
    server = server_factory(adapter_root=adapter_root, adapter_cache_mib=0, metrics_port=None)
    registry = server.running.registry
    cache = registry.engine.executor.cache
    with EngineBrake(server) as brake, server.client() as client:
        client.load_adapter("delta", "alpha_half.onnx_adapter")
        old = registry.get("delta").handle
        brake.hold()
        stream = client.stream("delta", PROMPT, max_new_tokens=4)
        next(stream)
        wait_until(lambda: registry.get("delta").leases == 1, what="delta in flight")
        wait_until(lambda: cache.residency(old).tier != "disk", what="delta read again for its request")
        client.load_adapter("delta", "alpha.onnx_adapter", version="v2")
        assert cache.registered(old) and cache.residency(old).tier != "disk"  # held by its request
        brake.release()
        assert len([t for chunk in stream for t in chunk.token_ids]) == 4
        wait_until(lambda: not cache.registered(old), what="the old version freed")
        assert client.generate("delta", PROMPT, max_new_tokens=2).adapter_version == "v2"


def test_the_cli_flags_and_adapters_commands(server_factory, adapter_root, recipe_package, capsys):
    from loraplex.runtime.app.cli import build_parser, main
    from loraplex.runtime.app.commands import server_config

    config = server_config(build_parser(serving_only=True).parse_args(
        ["serve", "--package", str(recipe_package), "--adapter-store", str(adapter_root), "--adapter-store", "/tmp",
         "--adapter-cache-mib", "1.5", "--pin", "beta", "--pin", "gamma"]))
    assert config.adapter_stores == [adapter_root, Path("/tmp")] and config.adapter_cache_mib == 1.5
    assert config.pin == ["beta", "gamma"] and config.engine_options()["adapter_cache_bytes"] == 3 << 19
    live = server_factory(adapter_root=adapter_root, adapter_cache_mib=0, metrics_port=None)
    target = ["--target", live.target]
    assert main(["adapters", "load", *target, "delta", "alpha_half.onnx_adapter", "--pin"]) == 0
    capsys.readouterr()
    assert main(["adapters", "list", *target]) == 0
    rows = {line.split("\t")[0]: line.split("\t") for line in capsys.readouterr().out.splitlines()}
    assert "tier=host" in rows["delta"] and rows["delta"][-1] == "pinned"
    assert "tier=disk" in rows["beta"] or "tier=slot" in rows["beta"]
