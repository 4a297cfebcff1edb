"""The one place where the runtime's errors become gRPC statuses, for every RPC.

`ServingInterceptor` wraps each handler (unary or streaming, either way): it checks the bearer
token of guarded methods (`auth`), refuses request bytes that do not decode, then runs the handler;
a `LoraplexError` aborts the call with its status (`errors.py` names it) and its message; anything
else is a server fault, logged with its traceback and sent as INTERNAL. Servicers therefore only
translate messages and never catch errors themselves (`status_of`: the cluster front end maps errors with it too).

Malformed request bytes (truncated, random, a string field that is not UTF-8) would make grpcio's
own deserializer raise, which grpcio reports as UNKNOWN with an ERROR traceback per call. The
interceptor wraps each deserializer so that such bytes become an `Undecodable` marker: the call
ends with INVALID_ARGUMENT and one log line.

Details are bounded (`bounded_details`): they travel in the `grpc-message` trailer, and trailers
over the client's metadata limit turn any status into RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from loraplex.runtime.errors import InvalidRequest, LoraplexError, status_name
from loraplex.runtime.server.auth import BearerAuth

Check = Callable[[Any], None] | None  # raises for the call's metadata, or None for an open method

# grpc-message is percent-encoded: a byte outside printable ASCII costs three. Clients refuse
# trailers over 8 KiB by default (soft limit; 16 KiB hard): stay well below.
MAX_DETAILS_BYTES = 2048
TRUNCATED = " [truncated]"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Undecodable:
    """What a wrapped deserializer returns for bytes that are not a valid message."""

    reason: str


def status_code(error: BaseException) -> grpc.StatusCode:
    """The gRPC status of an error raised while serving (anything unexpected: INTERNAL)."""
    return grpc.StatusCode[status_name(error)]


def bounded_details(message: str, limit: int = MAX_DETAILS_BYTES) -> str:
    """`message` cut so that its percent-encoded form stays within `limit` bytes."""
    message = message.encode("utf-8", "replace").decode("utf-8")
    cost = 0
    for i, ch in enumerate(message):
        cost += 1 if " " <= ch <= "~" and ch != "%" else 3 * len(ch.encode("utf-8"))
        if cost > limit - len(TRUNCATED):
            return message[:i] + TRUNCATED
    return message


def status_of(error: BaseException, method: str) -> tuple[grpc.StatusCode, str]:
    """The status and details a client gets for `error`; a server fault is logged with its traceback."""
    if not isinstance(error, LoraplexError):
        log.error("%s failed", method, exc_info=error)
    return status_code(error), bounded_details(str(error) or type(error).__name__)


async def abort(context: grpc.aio.ServicerContext, error: BaseException, method: str) -> None:
    await context.abort(*status_of(error, method))


def _give_up_if_expired(context: grpc.aio.ServicerContext) -> None:
    """The call's deadline passed while its answer was being made: the client has its
    DEADLINE_EXCEEDED already, and sending would fail in gRPC core, which logs an ERROR with a
    traceback ("ExecuteBatchError raised in core", grpc issue 31043). End the call as cancelled,
    which gRPC logs at debug level."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise asyncio.CancelledError


def _decoding(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf's DecodeError, or whatever hostile bytes make a parser raise
            return Undecodable(f"{type(exc).__name__}: {exc}")

    return decode


def _refuse(method: str, request: Undecodable) -> InvalidRequest:
    log.warning("%s: refused a request whose bytes do not decode (%s)", method, bounded_details(request.reason, 300))
    return InvalidRequest(
        f"the request bytes are not a valid {method.rsplit('/', 1)[-1]} message ({request.reason}); "
        "send a message encoded from the loraplex.v1 protos"
    )


def _checked(request: Any, method: str) -> Any:
    if isinstance(request, Undecodable):
        raise _refuse(method, request)
    return request


async def _checked_stream(requests: AsyncIterator[Any], method: str) -> AsyncIterator[Any]:
    async for request in requests:
        yield _checked(request, method)


def _unary(behavior: Callable[..., Awaitable[Any]], method: str, check: Check, streaming_in: bool
           ) -> Callable[..., Awaitable[Any]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if check is not None:
                check(context.invocation_metadata())
            request = _checked_stream(request, method) if streaming_in else _checked(request, method)
            response = await behavior(request, context)
            _give_up_if_expired(context)
            return response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort(context, exc, method)

    return handle


def _streaming(behavior: Callable[..., AsyncIterator[Any]], method: str, check: Check, streaming_in: bool
               ) -> Callable[..., AsyncIterator[Any]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            if check is not None:
                check(context.invocation_metadata())
            request = _checked_stream(request, method) if streaming_in else _checked(request, method)
            async for response in behavior(request, context):
                yield response
            _give_up_if_expired(context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort(context, exc, method)

    return handle


class ServingInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, auth: BearerAuth | None = None):
        self.auth = auth

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        check = self.auth.check if self.auth is not None and self.auth.guards(method) else None
        streaming_in = handler.request_streaming
        codec = dict(request_deserializer=_decoding(handler.request_deserializer),
                     response_serializer=handler.response_serializer)
        if handler.response_streaming:
            behavior = handler.stream_stream if streaming_in else handler.unary_stream
            make = grpc.stream_stream_rpc_method_handler if streaming_in else grpc.unary_stream_rpc_method_handler
            return make(_streaming(behavior, method, check, streaming_in), **codec)
        behavior = handler.stream_unary if streaming_in else handler.unary_unary
        make = grpc.stream_unary_rpc_method_handler if streaming_in else grpc.unary_unary_rpc_method_handler
        return make(_unary(behavior, method, check, streaming_in), **codec)
