"""`loraplex serve-ray` as a user runs it: join the Ray cluster, deploy its own application next to the
session's, serve clients that name it, and drain on SIGTERM (a stream in flight finishes in full)."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from loraplex.runtime.app.cli import main
from loraplex.runtime.client import Client
from loraplex.v1 import generation_pb2

APP = "second"

pytestmark = pytest.mark.parametrize("cluster", ["batched"], indirect=True)


@pytest.fixture
def serve_ray(ray_serve, cluster, tiny_package):
    """`loraplex serve-ray` in a subprocess, joined to the session's Ray cluster (1 replica, app 'second')."""
    command = [sys.executable, "-m", "loraplex.runtime.app.cli", "serve-ray", "--package", str(tiny_package),
               "--address", ray_serve.gcs_address, "--app-name", APP, "--replicas", "1", "--replica-cpus", "0.5",
               "--max-batch", "2", "--grpc-port", str(ray_serve.grpc), "--http-port", str(ray_serve.http)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith("loraplex cluster serving on "), line + process.stderr.read()
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(60)
        from ray import serve

        if APP in serve.status().applications:  # a failed test must not leave it behind
            serve.delete(APP)


def test_serve_ray_serves_its_application_and_drains_on_sigterm(serve_ray, cluster, capsys):
    target = cluster.target
    assert main(["generate", "--target", target, "--application", APP, "--adapter", "alpha",
                 "--prompt", "The weather today", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()
    # Two applications now share the proxy: a call must name one.
    assert main(["generate", "--target", target, "--adapter", "alpha", "--prompt", "hi"]) == 1
    assert "Application metadata not set" in capsys.readouterr().err
    assert main(["adapters", "list", "--target", target, "--application", APP]) == 0
    assert "alpha\tversion=" in capsys.readouterr().out

    with Client(target, application=APP, timeout=120) as client:
        stream = client.stream("beta", "The weather today", max_new_tokens=300, ignore_eos=True)
        assert next(stream).adapter == "beta"
        before = next(stream)
        serve_ray.send_signal(signal.SIGTERM)
        chunks = list(stream)
    assert chunks[-1].finish_reason == generation_pb2.LENGTH
    assert len(before.token_ids) + sum(len(c.token_ids) for c in chunks) == 300  # drained, not cut
    assert serve_ray.wait(120) == 0
    assert "draining" in serve_ray.stderr.read()
    from ray import serve

    assert APP not in serve.status().applications  # removed; the session's application still serves
    with cluster.client() as client:
        assert client.generate("alpha", "hi", max_new_tokens=2).adapter == "alpha"
