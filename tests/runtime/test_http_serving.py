"""The HTTP port behaves as the gRPC port does, on both engines: a client that goes away frees its
row, the queue and the drain answer 429 and 503, auth and TLS apply, chat without a chat template
is refused, SIGTERM drains both ports."""

from __future__ import annotations

import asyncio
import signal
import ssl
import subprocess
import sys

import httpx2
import openai
import pytest

from tests.fixtures.http import http_url, openai_client
from tests.fixtures.serving import ENGINES, EngineBrake, wait_until
from tests.runtime.test_operations import metric

PROMPT = "The weather today"


def cancelled(server, adapter: str) -> float:
    return metric(server, f'loraplex_requests_total{{adapter="{adapter}",status="CANCELLED"}}')


def test_a_client_that_disconnects_mid_stream_frees_its_row(http_server):
    service, registry = http_server.running.service, http_server.running.registry
    before = cancelled(http_server, "beta")
    with EngineBrake(http_server) as brake, openai_client(http_server) as client:
        brake.hold()  # the job stays in the engine, at its first token, until the test releases it
        stream = client.completions.create(model="beta", prompt=PROMPT, max_tokens=400, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})  # returns once the stream has started
        assert service.in_flight == 1
        stream.close()  # the connection goes away mid-stream
        wait_until(lambda: all(r.job.stopped for r in service._requests),
                   what="the job of the client that went away to be stopped")
        brake.release()
        wait_until(lambda: service.in_flight == 0, what="the abandoned job to leave the engine")
        assert registry.get("beta").leases == 0
    assert cancelled(http_server, "beta") == before + 1  # stopped, not finished


def test_a_client_that_times_out_stops_its_job(http_server):
    """HTTP has no deadline of its own: a client's timeout closes the connection, which cancels."""
    service = http_server.running.service
    before = cancelled(http_server, "gamma")
    with EngineBrake(http_server) as brake, openai_client(http_server, timeout=0.5) as client:
        brake.hold()
        with pytest.raises(openai.APITimeoutError):
            client.chat.completions.create(model="gamma", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=400, temperature=0)
        wait_until(lambda: service.in_flight == 1 and all(r.job.stopped for r in service._requests),
                   what="the job of the client that timed out to be stopped")
        brake.release()
        wait_until(lambda: service.in_flight == 0, what="the stopped job to leave the engine")
    assert http_server.running.registry.get("gamma").leases == 0
    assert cancelled(http_server, "gamma") == before + 1


def test_queue_full_is_429_draining_is_503_and_chat_needs_a_template(server_factory, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret")
    server = server_factory(max_batch=1, max_queue=0, http_port=0, auth_token_file=token, metrics_port=None)
    with openai_client(server) as client:  # scope admin: the HTTP routes are open (it has no admin routes)
        with pytest.raises(openai.BadRequestError) as err:  # the tiny base has no chat template
            client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}])
        assert "no chat template" in err.value.message and err.value.param == "messages"
        with EngineBrake(server) as brake:
            brake.hold()
            stream = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=50, stream=True,
                                               extra_body={"ignore_eos": True})
            with pytest.raises(openai.RateLimitError) as err:  # the only row is taken
                client.completions.create(model="beta", prompt="hi", max_tokens=2)
            assert err.value.status_code == 429 and "--max-queue" in err.value.message
            drained = asyncio.run_coroutine_threadsafe(server.running.drain(30), server.loop)
            wait_until(lambda: server.running.service.draining, what="the drain to start")
            assert httpx2.get(f"{http_url(server)}/health").status_code == 503
            with pytest.raises(openai.InternalServerError) as err:  # draining: 503, retry elsewhere
                client.completions.create(model="beta", prompt="hi", max_tokens=2)
            assert err.value.status_code == 503 and err.value.code == "UNAVAILABLE"
            brake.release()
            text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)  # in flight: finishes
            assert drained.result(30) is True and text


def test_auth_scope_all_and_mutual_tls_guard_the_http_port(server_factory, tls_files, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret")
    from loraplex.runtime.server import ServerTLS

    server = server_factory(http_port=0, auth_token_file=token, auth_scope="all", metrics_port=None,
                            tls=ServerTLS(cert=tls_files.server_cert, key=tls_files.server_key,
                                          client_ca=tls_files.ca))
    assert http_url(server).startswith("https://")
    trusted = ssl.create_default_context(cafile=str(tls_files.ca))
    trusted.load_cert_chain(str(tls_files.client_cert), str(tls_files.client_key))

    def client(api_key: str, verify: ssl.SSLContext = trusted):
        return openai_client(server, api_key=api_key, http_client=openai.DefaultHttpxClient(verify=verify))

    with client(api_key="s3cret") as good:
        assert good.completions.create(model="alpha", prompt="hi", max_tokens=2).usage.completion_tokens == 2
    with client(api_key="wrong") as bad, pytest.raises(openai.AuthenticationError) as err:
        bad.models.list()
    assert "a wrong bearer token" in err.value.message and "--auth-token-file" in err.value.message
    url = http_url(server)
    with httpx2.Client(verify=trusted) as raw:
        missing = raw.post(f"{url}/v1/completions", json={"model": "alpha", "prompt": "hi"})
        assert missing.status_code == 401 and "no bearer token" in missing.json()["error"]["message"]
        twice = raw.get(f"{url}/v1/models", headers=[("authorization", "Bearer s3cret")] * 2)
        assert twice.status_code == 401 and "more than one" in twice.json()["error"]["message"]
        assert twice.headers["www-authenticate"] == "Bearer"
        assert raw.get(f"{url}/health").status_code == 200  # health and metrics stay open
        assert b"loraplex_in_flight" in raw.get(f"{url}/metrics").content
    no_certificate = ssl.create_default_context(cafile=str(tls_files.ca))
    with client("s3cret", verify=no_certificate) as refused, pytest.raises(openai.APIConnectionError):
        refused.models.list()


# `loraplex serve` whose engine takes no job while held: "hold" on stdin holds it (answered "held" on
# stdout), "release" lets the waiting jobs in. A held request is admitted and in flight (counted,
# holding its lease) but waits in front of the engine. Only the engine's `submit` is wrapped, so it
# holds on either engine whatever their token delivery; the start's warm-up runs before any hold.
GATED_SERVE = """
import asyncio, sys, threading
from loraplex.runtime.server import loading

gate = threading.Event()
gate.set()

def control():
    for line in sys.stdin:
        if line.strip() == "hold":
            gate.clear()
            print("held", flush=True)
        elif line.strip() == "release":
            gate.set()

threading.Thread(target=control, daemon=True).start()
waiting = set()
build = loading.build_engine

def gated_engine(*args, **kwargs):
    engine = build(*args, **kwargs)
    submit = engine.submit

    async def submit_when_released(job):
        await asyncio.to_thread(gate.wait)
        submit(job)

    def gated_submit(job):
        if gate.is_set():
            return submit(job)
        task = asyncio.get_running_loop().create_task(submit_when_released(job))
        waiting.add(task)
        task.add_done_callback(waiting.discard)

    engine.submit = gated_submit
    return engine

loading.build_engine = gated_engine
from loraplex.runtime.app.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _tell(process: subprocess.Popen, command: str) -> None:
    process.stdin.write(command + "\n")
    process.stdin.flush()


@pytest.mark.parametrize("engine", ENGINES)
def test_sigterm_drains_the_http_port_too(recipe_package, engine):
    process = subprocess.Popen(
        [sys.executable, "-c", GATED_SERVE, "serve", "--package", str(recipe_package), "--port", "0",
         "--http-port", "0", "--engine", engine],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout.readline().startswith("loraplex serving on ")
        line = process.stdout.readline()
        assert line.startswith("OpenAI-compatible HTTP on "), line + process.stderr.read()
        base_url = line.split()[-1]
        _tell(process, "hold")
        assert process.stdout.readline() == "held\n"
        with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60) as client:
            stream = client.completions.create(model="beta", prompt=PROMPT, max_tokens=150, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True})
            # The stream has started (admitted), and its job cannot run before the release: in flight.
            process.send_signal(signal.SIGTERM)
            wait_until(lambda: httpx2.get(base_url.replace("/v1", "/health")).status_code == 503,
                       what="health to answer 503")
            with pytest.raises(openai.InternalServerError):
                client.completions.create(model="alpha", prompt="hi", max_tokens=2)
            _tell(process, "release")
            chunks = list(stream)
        assert "".join(c.choices[0].text for c in chunks if c.choices)
        assert chunks[-1].choices[0].finish_reason == "length"  # drained in full, not cut
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)


def test_serve_without_the_http_extra_says_how_to_install_it(recipe_package, monkeypatch, capsys):
    from loraplex.runtime.app.cli import main

    monkeypatch.setitem(sys.modules, "loraplex.runtime.http.server", None)  # as if uvicorn were not installed
    assert main(["serve", "--package", str(recipe_package), "--port", "0", "--http-port", "0"]) == 2
    assert "pip install 'loraplex[http]'" in capsys.readouterr().err
