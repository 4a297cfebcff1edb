"""TLS and mutual TLS on the gRPC port and the metrics endpoint, in the client and the CLI, on both
engines, with certificates made at test time (tests/fixtures/tls.py)."""

from __future__ import annotations

import asyncio
import ssl
import urllib.error
import urllib.request

import grpc
import pytest
from loraplex.runtime.app.cli import main
from loraplex.runtime.client import AsyncClient, Client, ClientTLS
from loraplex.runtime.server import ServerTLS


def refused(client: Client) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        client.health()
    return err.value.code()


def metrics_over(url: str, context: ssl.SSLContext | None = None) -> bytes:
    return urllib.request.urlopen(url, timeout=10, context=context).read()


def test_tls_serves_tls_clients_and_refuses_plaintext(server_factory, tls_files, capsys):
    server = server_factory(tls=ServerTLS(cert=tls_files.server_cert, key=tls_files.server_key))
    target = server.target
    with Client(target, tls=ClientTLS(ca=tls_files.ca), timeout=30) as client:
        assert client.health() == "SERVING"
        assert len(client.generate("alpha", "The weather today", max_new_tokens=3).token_ids) == 3
    with Client(target, timeout=10) as plaintext:
        assert refused(plaintext) == grpc.StatusCode.UNAVAILABLE
    with Client(target, tls=ClientTLS(), timeout=10) as untrusting:  # system roots do not know the test CA
        assert refused(untrusting) == grpc.StatusCode.UNAVAILABLE
    with Client(target.replace("127.0.0.1", "localhost"), tls=ClientTLS(ca=tls_files.ca), timeout=30) as by_name:
        assert by_name.health() == "SERVING"

    async def async_health() -> str:
        async with AsyncClient(target, tls=ClientTLS(ca=tls_files.ca), timeout=30) as client:
            return await client.health()

    assert asyncio.run(async_health()) == "SERVING"

    port = server.running.metrics_port
    trusting = ssl.create_default_context(cafile=str(tls_files.ca))
    assert b"loraplex_loaded_adapters" in metrics_over(f"https://127.0.0.1:{port}/metrics", trusting)
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        metrics_over(f"http://127.0.0.1:{port}/metrics")

    assert main(["generate", "--target", target, "--tls-ca", str(tls_files.ca), "--adapter", "alpha",
                 "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    assert main(["adapters", "list", "--target", target, "--tls-ca", str(tls_files.ca)]) == 0
    assert "alpha" in capsys.readouterr().out
    assert main(["adapters", "list", "--target", target]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_mutual_tls_refuses_a_client_without_a_certificate_the_ca_signed(server_factory, tls_files, capsys):
    server = server_factory(tls=ServerTLS(cert=tls_files.server_cert, key=tls_files.server_key,
                                          client_ca=tls_files.ca))
    target = server.target
    signed = ClientTLS(ca=tls_files.ca, cert=tls_files.client_cert, key=tls_files.client_key)
    with Client(target, tls=signed, timeout=30) as client:
        assert client.health() == "SERVING"
        assert len(client.generate("beta", "The weather today", max_new_tokens=3).token_ids) == 3
    for tls in (ClientTLS(ca=tls_files.ca),  # no certificate
                ClientTLS(ca=tls_files.ca, cert=tls_files.rogue_cert, key=tls_files.rogue_key)):  # another CA's
        with Client(target, tls=tls, timeout=10) as client:
            assert refused(client) == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.RpcError):
                client.generate("beta", "hi", max_new_tokens=2)

    port = server.running.metrics_port
    with_cert = ssl.create_default_context(cafile=str(tls_files.ca))
    with_cert.load_cert_chain(str(tls_files.client_cert), str(tls_files.client_key))
    assert b"loraplex_in_flight" in metrics_over(f"https://127.0.0.1:{port}/metrics", with_cert)
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        metrics_over(f"https://127.0.0.1:{port}/metrics", ssl.create_default_context(cafile=str(tls_files.ca)))

    tls_args = ["--tls-ca", str(tls_files.ca), "--tls-cert", str(tls_files.client_cert),
                "--tls-key", str(tls_files.client_key)]
    assert main(["generate", "--target", target, *tls_args, "--adapter", "beta", "--prompt", "hi",
                 "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    assert main(["generate", "--target", target, "--tls-ca", str(tls_files.ca), "--adapter", "beta",
                 "--prompt", "hi"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_serve_refuses_incomplete_tls_flags(recipe_package, tls_files, capsys):
    base = ["serve", "--package", str(recipe_package), "--port", "0"]
    assert main([*base, "--tls-cert", str(tls_files.server_cert)]) == 2
    assert "--tls-key" in capsys.readouterr().err
    assert main([*base, "--tls-client-ca", str(tls_files.ca)]) == 2
    assert "--tls-client-ca needs" in capsys.readouterr().err
    assert main([*base, "--tls-cert", str(tls_files.server_cert), "--tls-key", "/nonexistent.key"]) == 2
    assert "not a file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="both cert and key"):
        ClientTLS(cert=tls_files.client_cert)
