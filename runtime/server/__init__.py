"""The gRPC server: requests in, events out, adapters loaded and replaced while serving.

- `config`: `ServerConfig` (+ `ServerTLS`), importable without grpc (`loraplex serve` starts loading the
  model before it imports the server stack); `loading`: the engine and tokenizer loaded in threads;
- `app`: `start_server`, `RunningServer`, `serve` (the SIGTERM-draining loop);
- `servicers`: proto <-> library translation, one servicer per service;
- `status` (+ `auth`): the one place errors become statuses and tokens are checked;
- `generation` (+ `request_state`, `validation`): the request path shared by every engine;
- `registry`: adapter versions, leases, atomic replace, path confinement;
- `tokenizer`, `detokenizer`: text <-> ids, UTF-8 safe streaming, stop strings;
- `metrics`: Prometheus.

The names below are imported from their module on first use, so importing `config` (or any light
submodule) does not import the server stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loraplex.runtime.server.app import RunningServer, serve, start_server
    from loraplex.runtime.server.config import ServerConfig, ServerTLS

_EXPORTS = {"RunningServer": "app", "serve": "app", "start_server": "app", "ServerConfig": "config",
            "ServerTLS": "config"}
__all__ = ["RunningServer", "ServerConfig", "ServerTLS", "serve", "start_server"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
