"""Bearer-token authentication of RPCs: which calls need the token, checked in constant time
(by `status.ServingInterceptor`, before the handler runs).

With `--auth-token-file`, the admin calls (`Adapters.Load`, `Adapters.Unload`) need metadata
`authorization: Bearer <token>`; with scope `all`, every `loraplex.v1` call does (health checks
and reflection stay open, so load balancers and tools keep working). A call carrying more than one
authorization header is refused: which of several values wins must never decide access.

The HTTP front end (`--http-port`) checks the same token the same way (its headers are the
metadata): with scope `all` every `/v1/` route needs it; health and metrics stay open, as on the
gRPC side. With scope `admin` its routes are open: it has no admin routes (adapters are managed
over gRPC only).
"""

from __future__ import annotations

import hmac
from typing import Any, Literal

from loraplex.runtime.errors import Unauthenticated

AuthScope = Literal["admin", "all"]
ADMIN_METHODS = ("/loraplex.v1.Adapters/Load", "/loraplex.v1.Adapters/Unload")
CONTRACT_PREFIX = "/loraplex.v1."
HTTP_CONTRACT_PREFIX = "/v1/"


class BearerAuth:
    def __init__(self, token: str, scope: AuthScope = "admin"):
        if scope not in ("admin", "all"):
            raise ValueError(f"auth scope {scope!r} is unknown; choose admin or all")
        self._expected = f"Bearer {token}".encode()
        self.scope = scope

    def guards(self, method: str) -> bool:
        if self.scope == "all":
            return method.startswith(CONTRACT_PREFIX)
        return method in ADMIN_METHODS

    def guards_route(self, path: str) -> bool:
        """Whether an HTTP route needs the token (the HTTP front end has no admin routes)."""
        return self.scope == "all" and path.startswith(HTTP_CONTRACT_PREFIX)

    def check(self, metadata: Any) -> None:
        """Raise Unauthenticated unless the metadata carries exactly one, correct, bearer token."""
        given = [value for key, value in (metadata or ()) if key == "authorization"]
        if len(given) > 1:
            raise Unauthenticated("the call carries more than one authorization header; send exactly one")
        value = given[0] if given else ""
        value = value.encode() if isinstance(value, str) else bytes(value)
        if not hmac.compare_digest(value, self._expected):
            what = "no bearer token" if not given else "a wrong bearer token"
            raise Unauthenticated(
                f"call with {what}: send 'authorization: Bearer <token>' (gRPC metadata or HTTP header) with the "
                "token in the server's --auth-token-file"
            )
