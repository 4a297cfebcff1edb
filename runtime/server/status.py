"""The one place where the runtime's errors become gRPC statuses, for every RPC.

`ServingInterceptor` wraps each unary and server-streaming handler: it checks the bearer token
of guarded methods (`auth`), then runs the handler; a `LoraplexError` aborts the call with its
status (`errors.py` names it) and its message; anything else is a server fault, logged with its
traceback and sent as INTERNAL (`status_of`; the cluster front end maps errors with it too).
Servicers therefore only translate messages and never catch errors themselves.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from loraplex.runtime.errors import LoraplexError, status_name
from loraplex.runtime.server.auth import BearerAuth

Check = Callable[[Any], None] | None  # raises for the call's metadata, or None for an open method

log = logging.getLogger(__name__)


def status_code(error: BaseException) -> grpc.StatusCode:
    """The gRPC status of an error raised while serving (anything unexpected: INTERNAL)."""
    return grpc.StatusCode[status_name(error)]


def status_of(error: BaseException, method: str) -> tuple[grpc.StatusCode, str]:
    """The status and details a client gets for `error`; a server fault is logged with its traceback."""
    if not isinstance(error, LoraplexError):
        log.error("%s failed", method, exc_info=error)
    return status_code(error), str(error) or type(error).__name__


async def abort(context: grpc.aio.ServicerContext, error: BaseException, method: str) -> None:
    await context.abort(*status_of(error, method))


def _unary(behavior: Callable[..., Awaitable[Any]], method: str, check: Check) -> Callable[..., Awaitable[Any]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if check is not None:
                check(context.invocation_metadata())
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort(context, exc, method)

    return handle


def _streaming(behavior: Callable[..., AsyncIterator[Any]], method: str, check: Check
               ) -> Callable[..., AsyncIterator[Any]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            if check is not None:
                check(context.invocation_metadata())
            async for response in behavior(request, context):
                yield response
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
        if handler is None or handler.request_streaming:
            return handler
        method = handler_call_details.method
        check = self.auth.check if self.auth is not None and self.auth.guards(method) else None
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                _streaming(handler.unary_stream, method, check),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_unary_rpc_method_handler(
            _unary(handler.unary_unary, method, check),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
