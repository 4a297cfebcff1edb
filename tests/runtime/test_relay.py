"""The engine's outputs reach the event loop through `LoopRelay`: in order, on the loop, never from the
engine's own thread (whose write to the loop's self-pipe would hand the GIL to the loop mid-step)."""

from __future__ import annotations

import asyncio
import threading

import pytest
from loraplex.runtime.server.relay import LoopRelay

from tests.fixtures.serving import wait_until


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-loop", daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def test_posts_from_threads_run_on_the_loop_in_order(loop):
    relay = LoopRelay(loop)
    seen: list[tuple[str, int]] = []
    done = threading.Event()

    def record(i: int) -> None:
        seen.append((threading.current_thread().name, i))
        if i == 999:
            done.set()

    def producer() -> None:
        for i in range(1000):
            relay.post(record, i)

    worker = threading.Thread(target=producer, name="producer")
    worker.start()
    worker.join()
    assert done.wait(30)
    assert [i for _, i in seen] == list(range(1000))
    assert {name for name, _ in seen} == {"test-loop"}


def test_a_call_that_raises_does_not_stop_the_ones_after_it(loop):
    relay = LoopRelay(loop)
    seen: list[int] = []
    done = threading.Event()

    def fail(_: object) -> None:
        raise ValueError("boom")

    relay.post(fail, None)
    relay.post(seen.append, 1)
    relay.post(lambda _: done.set(), None)
    assert done.wait(30)
    assert seen == [1]


def test_the_relay_thread_leaves_when_idle_and_comes_back_with_the_next_post(loop):
    relay = LoopRelay(loop, idle_s=0.05)
    first, second = threading.Event(), threading.Event()
    relay.post(lambda _: first.set(), None)
    assert first.wait(30)
    wait_until(lambda: not relay.running, what="the idle relay thread to exit")
    relay.post(lambda _: second.set(), None)
    assert second.wait(30)


def test_a_post_after_the_loop_closed_is_dropped_quietly():
    loop = asyncio.new_event_loop()
    loop.close()
    relay = LoopRelay(loop, idle_s=0.05)
    relay.post(print, "never")
    wait_until(lambda: not relay.running, what="the relay thread to exit")


def test_the_engine_thread_never_wakes_the_loop_itself(server):
    """Every token a request gets comes to the loop through the relay, not from the engine's thread."""
    callers: list[threading.Thread] = []
    loop = server.loop
    wake = loop.call_soon_threadsafe

    def recording(*args, **kwargs):
        callers.append(threading.current_thread())
        return wake(*args, **kwargs)

    loop.call_soon_threadsafe = recording
    try:
        with server.client() as client:
            streamed = [piece for piece in client.stream("alpha", "Review: fine\nSentiment:", max_new_tokens=8,
                                                         ignore_eos=True)]
            reply = client.generate("beta", "Reverse: stone\nOutput:", max_new_tokens=8, ignore_eos=True)
    finally:
        del loop.call_soon_threadsafe
    assert streamed and len(reply.token_ids) == 8
    engine_thread = server.running.engine._thread
    assert callers, "no output reached the loop from another thread"
    assert engine_thread not in callers
    assert "loraplex-relay" in {t.name for t in callers}
