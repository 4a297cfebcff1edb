"""The client CLI's TLS options and `loraplex serve`'s TLS files, beyond test_tls.py.

- `--tls-server-name NAME`: the name the server's certificate is checked against when the target is
  an address it does not name (README: "when the target is an IP the certificate does not name").
- `--tls`: TLS trusting the default roots (gRPC's; `GRPC_DEFAULT_SSL_ROOTS_FILE_PATH` stands in for
  the system's in a child process, so the test CA can be one of them).
- TLS files `serve` cannot use fail the start, exit status 2, with a message naming the file.

The CLI is a client: its TLS options do not depend on the engine, so the servers here run on the
batched engine only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from loraplex.runtime.app.cli import main
from loraplex.runtime.client import Client, ClientTLS
from loraplex.runtime.server import ServerTLS

from tests.fixtures.tls import make_certificate, make_key

NAME = "loraplex.internal"  # the only name the server certificate holds: not 127.0.0.1, not localhost
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class NamedServer:
    ca: Path
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def named_server_tls(tmp_path_factory) -> NamedServer:
    """A CA and a server certificate it signed that names only `NAME`."""
    from cryptography.hazmat.primitives import serialization

    directory = tmp_path_factory.mktemp("named_tls")
    ca_key, server_key = make_key(), make_key()
    ca = make_certificate("named test CA", ca_key, "named test CA", ca_key, ca=True)
    server = make_certificate(NAME, server_key, "named test CA", ca_key, server=True, dns_names=(NAME,))
    paths = NamedServer(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    paths.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths.cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    return paths


def generate_args(target: str, *tls: str) -> list[str]:
    return ["generate", "--target", target, *tls, "--adapter", "alpha", "--prompt", "The weather today",
            "--max-new-tokens", "4"]


@pytest.mark.parametrize("server_factory", ["batched"], indirect=True)
def test_tls_server_name_checks_the_certificate_against_that_name(server_factory, named_server_tls, capsys):
    tls = named_server_tls
    server = server_factory(tls=ServerTLS(cert=tls.cert, key=tls.key), metrics_port=None)
    target = server.target  # 127.0.0.1:PORT, which the certificate does not name
    with Client(target, tls=ClientTLS(ca=tls.ca, server_name=NAME), timeout=30) as client:
        want = client.generate("alpha", "The weather today", max_new_tokens=4).text

    assert main(generate_args(target, "--tls-ca", str(tls.ca), "--tls-server-name", NAME)) == 0
    assert capsys.readouterr().out == want + "\n"
    localhost = target.replace("127.0.0.1", "localhost")  # nor localhost: the name given is the one checked
    assert main(generate_args(localhost, "--tls-ca", str(tls.ca), "--tls-server-name", NAME)) == 0
    assert capsys.readouterr().out == want + "\n"
    assert main(["adapters", "list", "--target", target, "--tls-ca", str(tls.ca), "--tls-server-name", NAME]) == 0
    assert [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()] == ["alpha", "beta", "gamma"]

    for refused in (["--tls-ca", str(tls.ca)],  # checked against 127.0.0.1: not in the certificate
                    ["--tls-ca", str(tls.ca), "--tls-server-name", "other.internal"]):
        assert main(generate_args(target, *refused)) == 1, refused
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.startswith("error: UNAVAILABLE"), (refused, captured.err)
    # A name without --tls / --tls-ca would mean a plaintext channel: refused before connecting.
    assert main(generate_args(target, "--tls-server-name", NAME)) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: --tls-server-name names the certificate")


@pytest.mark.parametrize("server_factory", ["batched"], indirect=True)
def test_tls_trusts_the_default_roots(server_factory, named_server_tls, capsys):
    tls = named_server_tls
    server = server_factory(tls=ServerTLS(cert=tls.cert, key=tls.key), metrics_port=None)
    with Client(server.target, tls=ClientTLS(ca=tls.ca, server_name=NAME), timeout=30) as client:
        want = client.generate("alpha", "The weather today", max_new_tokens=4).text
    args = generate_args(server.target, "--tls", "--tls-server-name", NAME)

    # The default roots are not the test CA: refused at the handshake.
    assert main(args) == 1
    assert capsys.readouterr().err.startswith("error: UNAVAILABLE")
    # gRPC reads its default roots once per process: a child process whose default roots are the test CA.
    env = {**os.environ, "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(tls.ca)}
    done = subprocess.run([sys.executable, "-m", "loraplex.runtime.app.cli", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (0, want + "\n"), done.stderr


# -- TLS files serve cannot use -----------------------------------------------------------------

def test_a_missing_tls_file_fails_serve_naming_it(recipe_package, tls_files, tmp_path, capsys):
    base = ["serve", "--package", str(recipe_package), "--port", "0"]
    missing = tmp_path / "missing.pem"
    for flags, named in (
        (["--tls-cert", str(missing), "--tls-key", str(tls_files.server_key)], "--tls-cert"),
        (["--tls-cert", str(tls_files.server_cert), "--tls-key", str(missing)], "--tls-key"),
        (["--tls-cert", str(tls_files.server_cert), "--tls-key", str(tls_files.server_key),
          "--tls-client-ca", str(missing)], "--tls-client-ca"),
        (["--tls-cert", str(tmp_path), "--tls-key", str(tls_files.server_key)], "--tls-cert"),  # a directory
    ):
        assert main([*base, *flags]) == 2
        path = missing if str(missing) in flags else tmp_path
        assert capsys.readouterr().err == f"loraplex serve: {named} {path} is not a file: give a PEM file\n"


def serve_until_it_fails(argv: list[str], *, unprivileged: bool = False) -> subprocess.CompletedProcess:
    """`loraplex serve ARGV` in a child process, expected to fail at start. If it starts instead (it
    prints `loraplex serving on ...`), it is stopped and the test fails: no waiting on a clock.

    `unprivileged`: run where file permissions bind, without the capabilities that let root read any
    file (a root test process drops them in the child with setpriv)."""
    command = [sys.executable, "-m", "loraplex.runtime.app.cli", "serve", *argv]
    if unprivileged and os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot make a file unreadable")
        command = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--", *command]
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as child:
        for line in child.stdout:
            if line.startswith("loraplex serving on"):
                child.terminate()
                child.communicate(timeout=60)
                pytest.fail(f"serve started: {line.strip()}")
        stderr = child.stderr.read()
        return subprocess.CompletedProcess(command, child.wait(timeout=60), "", stderr)


def serve_args(package: Path, cert: Path, key: Path) -> list[str]:
    return ["--package", str(package), "--port", "0", "--engine", "batched", "--tls-cert", str(cert),
            "--tls-key", str(key)]


def test_a_key_file_serve_may_not_read_fails_the_start_naming_it(recipe_package, tls_files, tmp_path):
    key = tmp_path / "server.key"
    shutil.copy(tls_files.server_key, key)
    key.chmod(0)
    done = serve_until_it_fails(serve_args(recipe_package, tls_files.server_cert, key), unprivileged=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1] == f"loraplex serve: [Errno 13] Permission denied: '{key}'", done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("broken", ["key-not-pem", "cert-not-pem", "key-of-another-certificate"])
def test_a_tls_file_serve_cannot_use_fails_the_start_naming_it(recipe_package, tls_files, tmp_path, broken):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a PEM file\n")
    cert, key, named = {
        "key-not-pem": (tls_files.server_cert, garbage, garbage),
        "cert-not-pem": (garbage, tls_files.server_key, garbage),
        "key-of-another-certificate": (tls_files.server_cert, tls_files.client_key, tls_files.client_key),
    }[broken]
    done = serve_until_it_fails(serve_args(recipe_package, cert, key))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.splitlines()[-1]
    assert last.startswith("loraplex serve: ") and str(named) in last, done.stderr
