"""The one place where the runtime's errors become HTTP statuses, in OpenAI's error shape.

Every runtime error carries its canonical status name (`loraplex.runtime.errors`); the HTTP status
is Google's mapping of that name to HTTP (the one gRPC-HTTP gateways use), so a request gets the
same verdict on both ports: INVALID_ARGUMENT 400, UNAUTHENTICATED 401, PERMISSION_DENIED 403,
NOT_FOUND 404, RESOURCE_EXHAUSTED 429, INTERNAL 500, UNAVAILABLE 503. The body is OpenAI's:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature",
               "code": "INVALID_ARGUMENT"}}

`param` names the request field at fault when the error knows it, `code` is the status name the
gRPC port would have sent (and the `status` label of the metrics). Anything that is not a runtime
error is a server fault: logged with its traceback, answered 500 without details.
"""

from __future__ import annotations

import json
import logging

from loraplex.runtime.errors import InvalidRequest, LoraplexError, status_name
from starlette.responses import Response

log = logging.getLogger(__name__)

HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "INTERNAL": 500,
    "UNKNOWN": 500,
    "DATA_LOSS": 500,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}

# OpenAI's `type` by HTTP status (its clients choose the exception class by status alone).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def http_status(error: BaseException) -> int:
    return HTTP_STATUS.get(status_name(error), 500)


def error_body(error: BaseException) -> dict:
    """OpenAI's error object for `error` (the message of a server fault is not shown)."""
    status = http_status(error)
    message = str(error) if isinstance(error, LoraplexError) else "internal server error (the server log has it)"
    param = error.field if isinstance(error, InvalidRequest) else None
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": status_name(error)}}


def error_response(error: BaseException, where: str) -> Response:
    """The error as a response; JSON in ASCII, since a message may quote input that is not valid
    Unicode (a lone surrogate from a JSON escape) and must still be sent."""
    if not isinstance(error, LoraplexError):
        log.error("%s failed", where, exc_info=error)
    status = http_status(error)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return Response(json.dumps(error_body(error)), status_code=status, headers=headers, media_type="application/json")
