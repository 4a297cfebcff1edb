"""The gRPC server: requests in, events out, adapters loaded and replaced while serving.

- `app`: `ServerConfig` (+ `ServerTLS`), `start_server`, `RunningServer`, `serve` (the SIGTERM-draining loop);
- `servicers`: proto <-> library translation, one servicer per service;
- `status` (+ `auth`): the one place errors become statuses and tokens are checked;
- `generation` (+ `request_state`, `validation`): the request path shared by every engine;
- `registry`: adapter versions, leases, atomic replace, path confinement;
- `tokenizer`, `detokenizer`: text <-> ids, UTF-8 safe streaming, stop strings;
- `metrics`: Prometheus.
"""

from loraplex.runtime.server.app import RunningServer, ServerConfig, ServerTLS, serve, start_server

__all__ = ["RunningServer", "ServerConfig", "ServerTLS", "serve", "start_server"]
