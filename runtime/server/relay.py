"""Hands the engine thread's outputs to the event loop without stalling the engine thread.

`loop.call_soon_threadsafe` wakes the loop by writing to its self-pipe, and CPython releases the GIL
around that write. The loop thread, just woken, takes the GIL and processes the output (decode the
text, match stop strings, queue a gRPC message) while the engine thread waits to take it back: each
delivery put the loop's work on the engine's critical path, once per request per step (a single
stream spent ~7% of its engine thread in that write; eight streams paid it eight times a step).

A `LoopRelay` takes the outputs instead: `post` only appends to a queue (no system call that gives
up the GIL, so the engine thread goes straight on to its next step). A relay thread, blocked on the
queue, gets the GIL when the engine thread next gives it up anyway (the session run releases it),
collects everything posted so far and wakes the loop once for all of it. The loop then processes
while the engine computes, and runs the outputs in the order they were posted.

The relay thread exits after `idle_s` without posts and starts again with the next one, so an idle
server (or a test's many short-lived servers) keeps no thread for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

IDLE_S = 1.0  # the relay thread exits after this long without posts


class LoopRelay:
    def __init__(self, loop: asyncio.AbstractEventLoop, *, idle_s: float = IDLE_S):
        self.loop = loop
        self._idle_s = idle_s
        self._queue: queue.SimpleQueue[tuple[Callable[[Any], None], Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards starting and retiring the relay thread
        self._thread: threading.Thread | None = None

    def post(self, fn: Callable[[Any], None], arg: Any) -> None:
        """(Any thread) run `fn(arg)` on the loop, after everything posted before it."""
        self._queue.put((fn, arg))
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._relay, name="loraplex-relay", daemon=True)
                    self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None

    def _relay(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=self._idle_s)
            except queue.Empty:
                with self._lock:  # a post that saw this thread alive has queued its call: keep going
                    if self._queue.empty():
                        self._thread = None
                        return
                continue
            calls = [first]
            while True:
                try:
                    calls.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            with contextlib.suppress(RuntimeError):  # the loop is closed (server stopped): nobody listens
                self.loop.call_soon_threadsafe(_run_all, calls)


def _run_all(calls: list[tuple[Callable[[Any], None], Any]]) -> None:
    """(The loop) run the relayed calls in order; one that raises does not stop the others."""
    for fn, arg in calls:
        try:
            fn(arg)
        except Exception:
            log.exception("processing an engine output failed")
