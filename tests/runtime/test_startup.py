"""`loraplex serve`'s start order: the model starts loading before the gRPC server stack is imported
(the session is made while grpc, the servicers and Prometheus import), and a start that fails after
the load began closes the engine it was building."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
from loraplex.runtime.client import Client

from tests.fixtures.serving import ENGINES

SERVER_STACK = ("grpc", "prometheus_client", "loraplex.runtime.server.app", "loraplex.runtime.server.servicers",
                "loraplex.v1.generation_pb2_grpc")
ENGINE_THREADS = ("loraplex-batched", "genai-engine")

# `loraplex serve` that reports, once the model's load has started, which of the server stack's
# modules were imported by then and whether the engine's load thread had started.
RECORDING_SERVE = f"""
import sys, threading
from loraplex.runtime.server import loading

start = loading.start_loading

def recording_start(config):
    load = start(config)
    imported = [name for name in {SERVER_STACK!r} if name in sys.modules]
    loading_engine = load.engine.done() or any(t.name == "loraplex-load-engine" for t in threading.enumerate())
    print("imported when the load started:", ",".join(imported) or "none", flush=True)
    print("engine loading:", loading_engine, flush=True)
    return load

loading.start_loading = recording_start
from loraplex.runtime.app.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("engine", ENGINES)
def test_serve_starts_loading_the_model_before_importing_the_server_stack(recipe_package, engine):
    process = subprocess.Popen(
        [sys.executable, "-c", RECORDING_SERVE, "serve", "--package", str(recipe_package), "--port", "0",
         "--engine", engine],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        imported = process.stdout.readline()
        loading_engine = process.stdout.readline()
        serving = process.stdout.readline()
        assert serving.startswith("loraplex serving on "), imported + loading_engine + serving + process.stderr.read()
        assert imported.strip() == "imported when the load started: none"
        assert loading_engine.strip() == "engine loading: True"
        with Client(serving.split()[-1], timeout=60) as client:  # and the server then serves as before
            assert client.health() == "SERVING"
            assert client.generate("alpha", "hello", max_new_tokens=2, ignore_eos=True).usage.completion_tokens == 2
    finally:
        process.terminate()
        process.wait(30)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_serve_whose_server_stack_cannot_import_closes_the_loading_engine(recipe_package, engine, monkeypatch,
                                                                            capsys):
    """The load starts first: when the server stack then fails to import, the command waits for the
    engine, closes it (its thread ends) and says why it could not start."""
    from loraplex.runtime.app.cli import main

    before = set(threading.enumerate())  # other tests' servers may be running
    monkeypatch.delitem(sys.modules, "loraplex.runtime.server.app", raising=False)
    monkeypatch.setitem(sys.modules, "loraplex.runtime.server.app", None)  # importing it raises ImportError
    assert main(["serve", "--package", str(recipe_package), "--port", "0", "--engine", engine]) == 2
    assert "loraplex serve: " in capsys.readouterr().err
    for thread in threading.enumerate():  # a load still running would start its engine later
        if thread not in before and thread.name.startswith("loraplex-load-"):
            thread.join(60)
    left = [t.name for t in threading.enumerate() if t not in before and t.name in ENGINE_THREADS]
    assert not left, f"the start that failed left its engine running: {left}"
