"""`HttpFrontend`: the OpenAI-compatible HTTP port, run by uvicorn inside the server's asyncio loop.

One loop serves both front ends, so they share the engine, the adapter registry, the request
queue, auth, TLS and metrics without any locking. `loraplex.runtime.server.app` drives it:
`open()` right after the gRPC port (routes answer 503 until the model is warm, like gRPC's
NOT_SERVING), `state.service` once the model is warm, `close()` after the drain.

The socket is bound here, not by uvicorn: a port in use fails the start with an OSError (uvicorn
would `sys.exit`), and port 0 tells which port it got. Signals stay with `loraplex serve`, whose
SIGTERM drains both ports: uvicorn's own handlers are not installed. uvicorn leaves logging alone
(no log config), logs warnings and errors only (its start and stop lines would speak of a
"server process" of its own) and writes no access log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Iterator
from typing import TYPE_CHECKING

import uvicorn
from loraplex.runtime.http.routes import HttpState, build_app

if TYPE_CHECKING:
    from loraplex.runtime.server.app import ServerTLS

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 5  # seconds uvicorn waits for connections to close, after the drain emptied them


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: the embedding server owns SIGTERM and SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpFrontend:
    def __init__(self, state: HttpState, host: str, port: int, tls: ServerTLS | None = None):
        self.state = state
        self.host = host.strip("[]")
        self._socket = _bind(self.host, port)
        self.port: int = self._socket.getsockname()[1]
        self.scheme = "http" if tls is None else "https"
        options = {}
        if tls is not None:
            options = dict(ssl_certfile=str(tls.cert), ssl_keyfile=str(tls.key))
            if tls.client_ca is not None:
                options.update(ssl_ca_certs=str(tls.client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(
            build_app(state), lifespan="off", ws="none", log_config=None, log_level="warning", access_log=False,
            timeout_graceful_shutdown=SHUTDOWN_GRACE, **options,
        )
        self._server = _EmbeddedServer(config)
        self._task: asyncio.Task | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    async def open(self) -> None:
        """Serve on the bound socket; returns once connections are accepted."""
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]), name="loraplex-http")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped uvicorn (a TLS file it cannot use, ...)
                raise OSError(f"the HTTP server on {self.url} stopped while starting")
            await asyncio.sleep(0.01)
        log.info("HTTP (OpenAI-compatible) on %s/v1", self.url)

    async def close(self) -> None:
        """Stop accepting, close idle connections, wait (bounded) for the rest."""
        if self._task is None:
            self._socket.close()
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise OSError(f"cannot listen for HTTP on {host}:{port} ({exc.strerror or exc}): port in use?") from exc
