"""Per-request measurements, the statistics every scenario reports, and its time budget."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger("bench")


@dataclass(frozen=True)
class Prompt:
    """One bench prompt: its text (what a gRPC client sends) and its token ids (in-process peers)."""

    text: str
    ids: list[int]


@dataclass
class RequestResult:
    """One request as its client saw it."""

    latency_s: float
    ttft_s: float | None
    tokens: int  # completion tokens received
    ok: bool = True
    error: str = ""
    start_s: float = 0.0  # relative to the start of its scenario (for closed-loop replays)
    token_ids: list[int] | None = None  # completion, where the system returns it (agreement check)
    server_total_s: float | None = None  # the server's own timing (loraplex): latency minus this = RPC overhead


def failure_line(exc: BaseException, limit: int = 160) -> str:
    """What failed, in one line for a table cell or a log line: the error's type (a gRPC status code
    for an RPC error) and the first line of its message."""
    if callable(getattr(exc, "code", None)) and callable(getattr(exc, "details", None)):  # grpc.RpcError
        kind, message = exc.code().name, exc.details() or ""  # type: ignore[attr-defined]
    else:
        kind, message = type(exc).__name__, str(exc)
    lines = message.strip().splitlines()
    return f"{kind}: {lines[0] if lines else ''}"[:limit]


def guarded(name: str, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | Exception:
    """Run one measurement of system `name`; a failure is logged in one line and returned, so one
    system failing never costs the others their numbers (the traceback is logged at debug level)."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        log.error("%s failed in %s: %s", name, what, failure_line(exc))
        log.debug("%s failed in %s", name, what, exc_info=True)
        return exc


def over(deadline: float | None) -> bool:
    """True once a scenario has used up its time budget."""
    return deadline is not None and time.perf_counter() > deadline


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list: an observed value, not an interpolation."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def median(values: list[float]) -> float:
    return statistics.median(values)


def summarize_load(results: list[RequestResult], wall_s: float) -> dict:
    """Throughput and latency percentiles of one concurrent run."""
    ok = [r for r in results if r.ok]
    latencies = [r.latency_s for r in ok]
    server = [r.server_total_s for r in ok if r.server_total_s is not None]
    return {
        "requests": len(results),
        "failed": len(results) - len(ok),
        "tokens": sum(r.tokens for r in ok),
        "wall_s": wall_s,
        "tokens_per_s": sum(r.tokens for r in ok) / wall_s if wall_s > 0 else 0.0,
        "p50_s": percentile(latencies, 50) if latencies else None,
        "p99_s": percentile(latencies, 99) if latencies else None,
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "server_total_p50_s": percentile(server, 50) if server else None,
    }


def replay_serial_queue(
    service_s: list[float], tokens: list[int], clients: int, n_requests: int
) -> tuple[list[RequestResult], float]:
    """Latencies a FIFO server that runs one request at a time gives `clients` closed-loop clients.

    Serial in-process peers (onnxruntime-genai, PEFT set_adapter) have no request queue of
    their own: their service times are measured one request at a time and replayed here, which
    is exactly what such a server does with concurrent clients (each client sends its next
    request when its previous one returns; the server serves arrivals in order).
    """
    results: list[RequestResult] = []
    clock = 0.0
    ready = [0.0] * clients  # when each client sends its next request
    for i in range(n_requests):
        client = min(range(clients), key=lambda c: ready[c])
        arrival = ready[client]
        start = max(clock, arrival)
        service = service_s[i % len(service_s)]
        clock = start + service
        results.append(
            RequestResult(latency_s=clock - arrival, ttft_s=None, tokens=tokens[i % len(tokens)], start_s=arrival)
        )
        ready[client] = clock
    return results, clock
