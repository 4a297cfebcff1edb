"""`--profile`: presets fill only the options left out; explicit options win; bad values are refused."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest
from loraplex.runtime.app.cli import build_parser
from loraplex.runtime.app.commands import server_config
from loraplex.runtime.server import ServerConfig
from loraplex.runtime.server.profiles import PROFILES


def _config(*argv: str) -> ServerConfig:
    return server_config(build_parser().parse_args(["serve", "--package", "pkg", *argv]))


def test_default_profile_keeps_the_server_defaults():
    config = _config()
    assert (config.max_batch, config.max_queue, config.intra_op_threads) == (8, 64, 0)
    assert config.allow_spinning and config.memory_arena and config.warm_adapters and config.session_cache
    assert config.spin_us == 20 and config.engine_options()["spin_us"] == 20  # threads spin briefly, then sleep


def test_edge_profile_sets_the_options_left_out():
    config = _config("--profile", "edge")
    edge = PROFILES["edge"]
    assert (config.max_batch, config.max_queue) == (edge.max_batch, edge.max_queue) == (4, 16)
    assert config.allow_spinning and config.spin_us == 20 and not config.memory_arena and not config.warm_adapters
    assert (config.malloc_arenas, _config().malloc_arenas) == (1, 0)
    options = config.engine_options()
    assert (options["max_batch"], options["allow_spinning"], options["memory_arena"]) == (4, True, False)
    # The batched engine's prefix cache is smaller on edge; the genai engine has none to size.
    assert (options["prefix_cache_bytes"], _config().engine_options()["prefix_cache_bytes"]) == (16 * 2**20, None)
    assert _config("--profile", "edge", "--engine", "genai").prefix_cache_mib is None


def test_explicit_options_override_the_profile():
    config = _config("--profile", "edge", "--max-batch", "2", "--spin", "--arena", "--threads", "1",
                     "--no-session-cache", "--prefix-cache-mib", "64")
    assert (config.max_batch, config.max_queue, config.intra_op_threads) == (2, 16, 1)
    assert config.allow_spinning and config.memory_arena and not config.session_cache
    assert (config.prefix_cache_mib, _config("--profile", "edge", "--no-prefix-cache").prefix_cache_mib) == (64, 0)
    assert _config("--no-spin", "--no-arena").memory_arena is False
    # --spin: as long as onnxruntime likes (no bound); --no-spin: not at all.
    assert (config.spin_us, config.engine_options()["spin_us"]) == (None, None)
    assert _config("--no-spin").allow_spinning is False


def test_bad_profile_and_thread_counts_are_refused():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--package", "pkg", "--profile", "phone"])
    with pytest.raises(ValueError, match="profile 'phone' is unknown"):
        ServerConfig(package=Path("pkg"), profile="phone")
    with pytest.raises(ValueError, match="intra_op_threads"):
        ServerConfig(package=Path("pkg"), intra_op_threads=-1)
    with pytest.raises(ValueError, match="max_batch"):
        ServerConfig(package=Path("pkg"), profile="edge", max_batch=0)


def test_heap_arenas_can_be_limited_and_free_heap_released():
    """Real glibc calls, in a fresh interpreter (they change the process's allocator)."""
    code = ("from loraplex.runtime.engines.heap import limit_heap_arenas, release_free_heap\n"
            "release_free_heap()\n"
            "print(limit_heap_arenas(1))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ("True" if platform.libc_ver()[0] == "glibc" else "False")


def test_an_edge_server_answers_as_a_default_one(server_factory):
    """Both engines: `--profile edge` (base-only warm-up, no arena, no spinning) serves every adapter
    with the same greedy tokens as the default profile. (Its malloc arena limit is left out here: it
    would hold for the rest of the test process; the call itself is tested above in a subprocess.)"""
    edge = server_factory(profile="edge", max_batch=None, max_queue=None, metrics_port=None, malloc_arenas=0)
    default = server_factory(metrics_port=None)
    assert edge.running.config.max_batch == 4 and not edge.running.config.warm_adapters
    with edge.client() as ours, default.client() as theirs:
        for adapter in ("", "alpha", "beta", "gamma"):
            got = ours.generate(adapter, "The weather today", max_new_tokens=8).token_ids
            assert got == theirs.generate(adapter, "The weather today", max_new_tokens=8).token_ids, adapter


def test_the_spin_bound_reaches_onnxruntimes_session_options():
    from loraplex.runtime.engines.batched.session import SessionSettings

    key = "session.intra_op.spin_duration_us"
    options = SessionSettings(allow_spinning=True, spin_us=20).options()
    assert options.get_session_config_entry(key) == "20"
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    for settings in (SessionSettings(allow_spinning=True), SessionSettings(allow_spinning=False, spin_us=20)):
        with pytest.raises(Exception):  # noqa: B017 (onnxruntime raises a bare error for a missing key)
            settings.options().get_session_config_entry(key)
