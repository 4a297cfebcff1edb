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

# `loraplex serve` whose engine the test can hold through the process's stdin, on either engine:
# after "hold", the engine thread stops after delivering a job's next tokens until "release" (its
# token sinks wrapped), so a request is surely still decoding when SIGTERM lands, however fast the
# machine.
GATED_SERVE = """
import sys, threading
from loraplex.runtime.server import loading

gate = threading.Event()
gate.set()

def control():
    for line in sys.stdin:
        (gate.clear if line.strip() == "hold" else gate.set)()
        print(line.strip() + "-done", flush=True)  # the test waits for it: no race with its next step

threading.Thread(target=control, daemon=True).start()

class GatedSink:
    def __init__(self, sink):
        self.sink = sink
    def on_output(self, output):
        self.sink.on_output(output)
        if output.tokens:
            gate.wait()

build = loading.build_engine

def gated_engine(*args, **kwargs):
    engine = build(*args, **kwargs)
    submit = engine.submit
    def gated_submit(job):
        job.sink = GatedSink(job.sink)
        submit(job)
    engine.submit = gated_submit
    return engine

loading.build_engine = gated_engine
from loraplex.runtime.app.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(params=ENGINES)
def serve_process(request, recipe_package):
    process = subprocess.Popen(
        [sys.executable, "-c", GATED_SERVE, "serve", "--package", str(recipe_package), "--port", "0",
         "--engine", request.param],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = process.stdout.readline()
        assert line.startswith("loraplex serving on "), line + process.stderr.read()
        yield process, line.split()[-1]
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)


def control(process, word: str) -> None:
    """Hold or release the server's engine; returns once the server has done it."""
    process.stdin.write(word + "\n")
    process.stdin.flush()
    assert process.stdout.readline().strip() == f"{word}-done"


def test_sigterm_drains_in_flight_requests_then_exits(serve_process):
    process, target = serve_process
    with Client(target, timeout=60) as client:
        control(process, "hold")
        stream = client.stream("beta", "The weather today", max_new_tokens=150, ignore_eos=True)
        assert next(stream).adapter == "beta"
        before = next(stream)  # a token: the request is decoding, and its engine is held
        assert before.token_ids
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while client.health() != "NOT_SERVING":  # health still answers while draining
            assert time.monotonic() < deadline, "health never went NOT_SERVING"
            time.sleep(0.01)
        with pytest.raises(grpc.RpcError) as err:  # no new work while draining
            client.generate("alpha", "hi", max_new_tokens=2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        control(process, "release")
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
