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

# `loraplex serve` with each decoding step slowed (10 ms), so a request is surely in flight at SIGTERM.
SLOW_SERVE = """
import sys, time
from loraplex.runtime.genai_engine import GenaiEngine
step = GenaiEngine._step
def slow_step(self, run):
    time.sleep(0.01)
    step(self, run)
GenaiEngine._step = slow_step
from loraplex.runtime.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def serve_process(tiny_package):
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_SERVE, "serve", "--package", str(tiny_package), "--port", "0"],
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
        stream = client.stream("beta", "The weather today", max_new_tokens=150)  # ~1.5 s of decoding
        first = next(stream)
        assert first.adapter == "beta"
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
    assert sum(len(c.token_ids) for c in chunks) == 150  # the in-flight request finished in full
    assert process.wait(30) == 0
    assert "draining" in process.stderr.read()


def test_sigterm_with_nothing_in_flight_exits_at_once(serve_process):
    process, target = serve_process
    with Client(target) as client:
        assert client.health() == "SERVING"
    os.kill(process.pid, signal.SIGTERM)
    assert process.wait(30) == 0
