"""The runtime's errors: what a client may see, one type per cause.

Engines, the registry and the request layer raise these (never grpc errors). Each carries its
canonical status name (`code`, Google's canonical error codes, the names gRPC's StatusCode uses),
which metrics record; each front end turns it into its protocol's status in exactly one place
(gRPC: `loraplex.runtime.server.status`). Messages name the fault and the fix; they reach
clients as the status details.
"""

from __future__ import annotations


class LoraplexError(Exception):
    """Base of every error a client may see."""

    code = "INTERNAL"


class InvalidRequest(LoraplexError):
    """A parameter is out of range, a template field is missing, the prompt is too long.

    `field` names the request field at fault when there is one (as the front end spells it), so a
    front end whose error format has a place for it (OpenAI's `param`) can fill it in.
    """

    code = "INVALID_ARGUMENT"

    def __init__(self, message: str = "", *, field: str | None = None):
        super().__init__(message)
        self.field = field


class AdapterNotFound(LoraplexError):
    """The request names an adapter that is not loaded."""

    code = "NOT_FOUND"


class AdapterFileNotFound(LoraplexError):
    """Load names a file that does not exist under the adapter root."""

    code = "NOT_FOUND"


class AdapterIncompatible(LoraplexError):
    """The adapter file does not fit the package's graph (names, shapes, dtype, values)."""

    code = "FAILED_PRECONDITION"


class AdapterFileUnusable(LoraplexError):
    """The adapter file cannot be read, or its bytes do not match the sha256 recorded for it."""

    code = "FAILED_PRECONDITION"


class AdapterBusy(LoraplexError):
    """Unload without waiting while requests are in flight on the adapter."""

    code = "FAILED_PRECONDITION"


class PermissionDenied(LoraplexError):
    """An adapter path escapes the adapter root (traversal or symlink)."""

    code = "PERMISSION_DENIED"


class Unauthenticated(LoraplexError):
    """A call without the right bearer token while auth is on."""

    code = "UNAUTHENTICATED"


class Overloaded(LoraplexError):
    """The bounded queue is full: retry later or raise --max-queue."""

    code = "RESOURCE_EXHAUSTED"


class ShuttingDown(LoraplexError):
    """The server is loading, draining or closing, and takes no new requests."""

    code = "UNAVAILABLE"


class ReplicaLost(LoraplexError):
    """Cluster: the replica serving a request stopped (killed, crashed, scaled down) before answering."""

    code = "UNAVAILABLE"


class ClusterBehind(LoraplexError):
    """Cluster: an adapter change is recorded, but not every replica confirmed it in time."""

    code = "UNAVAILABLE"


class DeviceUnavailable(LoraplexError):
    """The requested device or execution provider is not present on this machine (raised at start)."""

    code = "FAILED_PRECONDITION"


class ConstraintUnsupported(LoraplexError):
    """The engine (an onnxruntime-genai build without guidance) cannot enforce an output constraint."""

    code = "FAILED_PRECONDITION"


class EngineFailure(LoraplexError):
    """The engine failed while decoding (an ONNX Runtime error): a server-side fault."""

    code = "INTERNAL"


MAX_QUOTED = 200  # characters of user input a message may echo


def quoted(value: object, limit: int = MAX_QUOTED) -> str:
    """User input as an error message may echo it: repr'd, cut to `limit` characters (the length said).

    A message becomes the status details, sent back in the response trailers: an input echoed whole
    (a 20,000-character adapter name) would make the trailers exceed gRPC's metadata limit and the
    client would see RESOURCE_EXHAUSTED instead of the status that explains the fault.
    """
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def status_name(error: BaseException) -> str:
    """The canonical status name of an error raised while serving (anything unexpected: INTERNAL)."""
    return error.code if isinstance(error, LoraplexError) else "INTERNAL"
