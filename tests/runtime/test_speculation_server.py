"""Speculative decoding through the server, on both engines: greedy tokens equal a speculation-off
server's (mixed adapters, concurrent) and the batched engine exports its drafted and accepted tokens
per adapter. The genai engine cannot verify drafts: `lookup` / `contract` given to it are ignored
with a logged note, and it exports no draft metrics. The in-process API takes the same switch."""

from __future__ import annotations

import logging

import pytest
from loraplex.runtime.api import LLM
from loraplex.runtime.server import ServerConfig

from tests.fixtures import serving
from tests.runtime.test_speculative_decoding import eager

NAMES = ("", "alpha", "beta", "gamma")  # "" = the base model
TEXT = "the river runs north and the river runs south and the river runs north again, "


def generate_all(server, requests, max_new_tokens: int = 16) -> list[list[int]]:
    return serving.generate_all(server, requests, max_new_tokens)


def metric(server, name: str, adapter: str) -> float | None:
    return server.running.metrics.registry.get_sample_value(name, {"adapter": adapter})


def test_tokens_equal_a_speculation_off_server_and_drafts_are_counted_per_adapter(server_factory, caplog):
    caplog.set_level(logging.INFO, logger="loraplex.runtime.engines")
    on = server_factory(speculation="lookup", warmup=False)
    off = server_factory(speculation="off", warmup=False)
    batched = on.config.engine == "batched"
    if batched:  # drafts from single tokens on: the random model's replies then meet its prompt often
        eager(on.running.engine.runner.speculator)
    requests = [(name, TEXT * 3 + f"({i})") for i, name in enumerate(NAMES)]
    assert generate_all(on, requests) == generate_all(off, requests)
    if batched:
        drafted = {name: metric(on, "loraplex_draft_tokens_total", name) for name in NAMES}
        assert sum(v or 0 for v in drafted.values()) == on.running.engine.runner.speculator.drafted > 0
        accepted = sum(metric(on, "loraplex_draft_accepted_tokens_total", n) or 0 for n in NAMES)
        assert accepted == on.running.engine.runner.speculator.accepted
        assert metric(off, "loraplex_draft_tokens_total", "alpha") is None  # off: nothing drafted
    else:
        assert metric(on, "loraplex_draft_tokens_total", "alpha") is None
        assert any("cannot verify drafted tokens" in r.getMessage() and "ignored" in r.getMessage()
                   for r in caplog.records)


def test_the_switch_is_checked_and_the_in_process_api_takes_it(recipe_package):
    with pytest.raises(ValueError, match="speculation must be one of"):
        ServerConfig(package=recipe_package, speculation="always")
    with LLM(recipe_package, engine="batched", speculation="off") as off, \
            LLM(recipe_package, engine="batched", speculation="auto") as auto:
        assert off._core.engine.runner.speculator.mode == "off"
        assert auto._core.engine.runner.speculator.mode == "auto"
        prompt = TEXT * 2
        assert off.generate(prompt, adapter="beta", max_new_tokens=12).token_ids == \
            auto.generate(prompt, adapter="beta", max_new_tokens=12).token_ids


def test_serve_flag_sets_speculation(recipe_package):
    from loraplex.runtime.app.cli import build_parser
    from loraplex.runtime.app.commands import server_config

    def config(*flags: str):
        return server_config(build_parser().parse_args(["serve", "--package", str(recipe_package), *flags]))

    assert config().speculation == "auto" and config().engine_options()["speculation"] == "auto"
    for mode in ("off", "lookup", "contract"):
        assert config("--speculation", mode).engine_options()["speculation"] == mode
    with pytest.raises(SystemExit):
        config("--speculation", "always")
