"""The prefix cache through the server, on both engines: greedy tokens equal a cache-off server's (mixed
adapters, concurrent), the second request of a template reuses its KV (metrics), a replaced adapter
never starts from the old version's prefixes and an unloaded one's are dropped. The genai engine has
no prefix cache: a size given to it is ignored with a logged note, and it exports no prefix metrics."""

from __future__ import annotations

import json
import logging
import urllib.request

from loraplex.runtime.api import LLM

from tests.fixtures import serving
from tests.fixtures.serving import wait_until

TEMPLATE = ("Instructions: read the text below with care, keep every name as written, answer in one short line "
            "and never add facts that the text does not state. ")
NAMES = ("", "alpha", "beta", "gamma")  # "" = the base model


def metric(server, name: str) -> float | None:
    return server.running.metrics.registry.get_sample_value(name)


def generate_all(server, requests, max_new_tokens: int = 8) -> list[list[int]]:
    return serving.generate_all(server, requests, max_new_tokens)


def test_tokens_equal_a_cache_off_server_and_a_template_s_second_request_reuses_its_prefix(server_factory, caplog):
    caplog.set_level(logging.INFO, logger="loraplex.runtime.engines")
    on = server_factory(prefix_cache_mib=16, warmup=False)
    off = server_factory(prefix_cache_mib=0, warmup=False)
    with on.client() as client:
        assert len(client.tokenize("", TEMPLATE)) >= 32  # two blocks at least
    first = [(name, TEMPLATE + f"Text {i}: the river runs north.") for i, name in enumerate(NAMES)]
    assert generate_all(on, first) == generate_all(off, first)
    second = [(name, TEMPLATE + f"Text {i}: a bird sang at noon, then twice more.") for i, name in enumerate(NAMES)]
    second.append(("alpha", "Another task entirely, no shared words at all here."))
    assert generate_all(on, second) == generate_all(off, second)
    if on.config.engine == "batched":
        assert metric(on, "loraplex_prefix_cache_lookups_total") == 9
        assert metric(on, "loraplex_prefix_cache_hits_total") == 4  # the template's second requests
        assert metric(on, "loraplex_prefix_cache_reused_tokens_total") >= 4 * 32
        assert metric(on, "loraplex_prefix_cache_hit_rate") == 4 / 9
        assert 0 < metric(on, "loraplex_prefix_cache_bytes") <= metric(on, "loraplex_prefix_cache_capacity_bytes")
        assert metric(on, "loraplex_prefix_cache_capacity_bytes") == 16 * 2**20
        assert metric(off, "loraplex_prefix_cache_lookups_total") is None  # off: no cache, no metrics
    else:
        assert metric(on, "loraplex_prefix_cache_lookups_total") is None
        assert any("no prefix cache" in r.getMessage() and "ignored" in r.getMessage() for r in caplog.records)


def test_a_replaced_adapter_never_starts_from_the_old_version_s_prefixes_and_unloading_drops_them(
        server_factory, adapter_root):
    on = server_factory(adapter_root=adapter_root, prefix_cache_mib=16, warmup=False)
    off = server_factory(adapter_root=adapter_root, prefix_cache_mib=0, warmup=False)
    batched = on.config.engine == "batched"
    prompt = TEMPLATE + "Text: the lamp was left on all night."
    with on.client() as a, off.client() as b:
        old = a.generate("alpha", prompt, max_new_tokens=8, ignore_eos=True).token_ids
        hits = metric(on, "loraplex_prefix_cache_hits_total")
        # The same name, other weights (alpha's scaled by a half): its own prefixes only.
        for client in (a, b):
            assert client.load_adapter("alpha", "alpha_half.onnx_adapter", version="v2").version == "v2"
        new = a.generate("alpha", prompt, max_new_tokens=8, ignore_eos=True)
        assert new.adapter_version == "v2"
        want = b.generate("alpha", prompt, max_new_tokens=8, ignore_eos=True).token_ids
        assert list(new.token_ids) == list(want) and list(want) != list(old)  # the versions differ
        if batched:
            assert metric(on, "loraplex_prefix_cache_hits_total") == hits  # v1's blocks were not used
            wait_until(lambda: metric(on, "loraplex_prefix_cache_dropped_blocks_total") > 0,
                       what="v1's blocks dropped once it is unloaded")
            dropped = metric(on, "loraplex_prefix_cache_dropped_blocks_total")
        again = a.generate("alpha", prompt, max_new_tokens=8, ignore_eos=True).token_ids
        assert list(again) == list(want)
        if batched:
            assert metric(on, "loraplex_prefix_cache_hits_total") == hits + 1  # v2's own prefix
        a.unload_adapter("alpha")
        if batched:
            assert metric(on, "loraplex_prefix_cache_dropped_blocks_total") > dropped


def test_the_http_port_serves_from_the_same_prefix_cache(server_factory):
    on = server_factory(prefix_cache_mib=16, http_port=0, warmup=False)
    off = server_factory(prefix_cache_mib=0, http_port=0, warmup=False)

    def complete(server, text: str) -> str:
        body = {"model": "beta", "prompt": TEMPLATE + text, "max_tokens": 8, "temperature": 0}
        request = urllib.request.Request(f"{server.running.http.url}/v1/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(request, timeout=60).read())["choices"][0]["text"]

    for text in ("Text: one.", "Text: two."):
        assert complete(on, text) == complete(off, text)
    if on.config.engine == "batched":
        assert metric(on, "loraplex_prefix_cache_hits_total") == 1
        scraped = urllib.request.urlopen(f"{on.running.http.url}/metrics", timeout=10).read().decode()
        assert "loraplex_prefix_cache_reused_tokens_total" in scraped
    else:
        assert metric(on, "loraplex_prefix_cache_hits_total") is None


def test_the_in_process_api_takes_the_prefix_cache_size(recipe_package):
    prompt = TEMPLATE + "Text: two boats."
    with LLM(recipe_package, engine="batched", prefix_cache_mib=0) as off:
        assert off._core.engine.prefix_cache is None
        want = [off.generate(prompt, adapter="beta", max_new_tokens=8).token_ids for _ in range(2)]
    with LLM(recipe_package, engine="batched", prefix_cache_mib=4) as on:
        cache = on._core.engine.prefix_cache
        assert cache.max_bytes == 4 * 2**20
        got = [on.generate(prompt, adapter="beta", max_new_tokens=8).token_ids for _ in range(2)]
        assert cache.stats.hits == 1
    assert got == want


def test_serve_flags_set_the_prefix_cache(recipe_package):
    from loraplex.runtime.app.cli import build_parser
    from loraplex.runtime.app.commands import server_config

    def config(*flags: str):
        return server_config(build_parser().parse_args(["serve", "--package", str(recipe_package), *flags]))

    assert config().prefix_cache_mib is None  # the engine's default (64 MiB on the batched engine)
    assert config("--prefix-cache-mib", "8").prefix_cache_mib == 8
    assert config("--no-prefix-cache").prefix_cache_mib == 0
    assert config("--no-prefix-cache").engine_options()["prefix_cache_bytes"] == 0
    assert config("--prefix-cache-mib", "0.5").engine_options()["prefix_cache_bytes"] == 2**19
