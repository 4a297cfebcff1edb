"""The runtime's errors, and the ONE place that maps them to gRPC status codes.

Library code raises these (never grpc errors); the servicers translate them with `status_code`.
Messages name the fault and the fix, and are sent to clients as the status details.
"""

from __future__ import annotations

import grpc


class LoraplexError(Exception):
    """Base of every error a client may see."""

    code = grpc.StatusCode.INTERNAL


class InvalidRequest(LoraplexError):
    """A parameter is out of range, a template field is missing, the prompt is too long."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class AdapterNotFound(LoraplexError):
    """The request names an adapter that is not loaded."""

    code = grpc.StatusCode.NOT_FOUND


class AdapterFileNotFound(LoraplexError):
    """Load names a file that does not exist under the adapter root."""

    code = grpc.StatusCode.NOT_FOUND


class AdapterIncompatible(LoraplexError):
    """The adapter file does not fit the package's graph (names, shapes, ranks)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class AdapterBusy(LoraplexError):
    """Unload without waiting while requests are in flight on the adapter."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(LoraplexError):
    """An adapter path escapes the adapter root (traversal or symlink)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(LoraplexError):
    """An admin call without the right bearer token while auth is on."""

    code = grpc.StatusCode.UNAUTHENTICATED


class Overloaded(LoraplexError):
    """The bounded queue is full: retry later or raise --max-queue."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ShuttingDown(LoraplexError):
    """The server is draining and takes no new requests."""

    code = grpc.StatusCode.UNAVAILABLE


class DeviceUnavailable(LoraplexError):
    """The requested device or execution provider is not present on this machine (raised at start)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class EngineFailure(LoraplexError):
    """The engine failed while decoding (an ONNX Runtime error): a server-side fault."""

    code = grpc.StatusCode.INTERNAL


def status_code(error: BaseException) -> grpc.StatusCode:
    """The gRPC status for an error raised while serving; anything unexpected is INTERNAL."""
    if isinstance(error, LoraplexError):
        return error.code
    return grpc.StatusCode.INTERNAL
