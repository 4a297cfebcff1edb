"""The OpenAI-compatible HTTP front end (`loraplex serve --http-port`), beside gRPC.

It serves the same `GenerationService`, adapter registry, engine, auth, TLS and metrics as the
gRPC port, on the same asyncio loop:
- `server`: `HttpFrontend`, uvicorn embedded in the server's loop (started and drained by
  `loraplex.runtime.server.app`);
- `routes`: the Starlette app (routes, bearer token, body, disconnect watching);
- `translation`: OpenAI request bodies -> `GenerationRequest`; events -> OpenAI responses and chunks;
- `errors`: the one place runtime errors become HTTP statuses in OpenAI's error shape.

Optional (`pip install loraplex[http]`): nothing here is imported unless an HTTP port is asked
for, so a gRPC-only server needs neither Starlette nor uvicorn. This file imports nothing.
"""
