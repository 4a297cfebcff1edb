"""SIGTERM drains a real `loraplex serve` process: NOT_SERVING, in-flight requests finish, exit 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from loraplex.runtime.client import Client
from loraplex.v1 import generation_pb2

from tests.fixtures.serving import ENGINES

# `loraplex serve` whose engine delivers each token 10 ms late (its token sinks wrapped), on either
# engine: a 150-token request takes ~1.5 s, so it is surely still decoding when SIGTERM lands.
SLOW_SERVE = """
import sys, time
from loraplex.runtime.server import app

class SlowSink:
    def __init__(self, sink):
        self.sink = sink
    def on_output(self, output):
        time.sleep(0.01 * len(output.tokens))
        self.sink.on_output(output)

build = app.build_engine

def slow_engine(*args, **kwargs):
    engine = build(*args, **kwargs)
    submit = engine.submit
    def slow_submit(job):
        job.sink = SlowSink(job.sink)
        submit(job)
    engine.submit = slow_submit
    return engine

app.build_engine = slow_engine
from loraplex.runtime.app.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(params=ENGINES)
def serve_process(request, recipe_package):
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_SERVE, "serve", "--package", str(recipe_package), "--port", "0",
         "--engine", request.param],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("loraplex serving on "), line + process.stderr.read()
        yield process, line.split()[-1]
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)


def test_sigterm_drains_in_flight_requests_then_exits(serve_process):
    process, target = serve_process
    with Client(target, timeout=60) as client:
        stream = client.stream("beta", "The weather today", max_new_tokens=150, ignore_eos=True)  # ~1.5 s
        assert next(stream).adapter == "beta"
        before = next(stream)  # a token: the request is decoding
        assert before.token_ids
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while client.health() != "NOT_SERVING":  # health still answers while draining
            assert time.monotonic() < deadline, "health never went NOT_SERVING"
            time.sleep(0.01)
        with pytest.raises(grpc.RpcError) as err:  # no new work while draining
            client.generate("alpha", "hi", max_new_tokens=2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        chunks = list(stream)
    assert chunks[-1].finish_reason == generation_pb2.LENGTH
    after = sum(len(c.token_ids) for c in chunks)
    assert after > 0 and len(before.token_ids) + after == 150  # in flight at the signal, then finished in full
    assert process.wait(30) == 0
    assert "draining" in process.stderr.read()


def test_sigterm_with_nothing_in_flight_exits_at_once(serve_process):
    process, target = serve_process
    with Client(target) as client:
        assert client.health() == "SERVING"
    os.kill(process.pid, signal.SIGTERM)
    assert process.wait(30) == 0


def test_sigterm_repeated_until_the_process_is_gone_still_exits_0(serve_process):
    """A supervisor that repeats SIGTERM: during the drain it changes nothing, and once drained the
    process ignores it while it exits (the default action would end it with -SIGTERM)."""
    process, target = serve_process
    with Client(target) as client:
        assert client.health() == "SERVING"
    deadline = time.monotonic() + 30
    while process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        assert time.monotonic() < deadline, "the server did not exit"
        time.sleep(0.005)
    assert process.returncode == 0
