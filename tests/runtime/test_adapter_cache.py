"""The adapters' host tier without a model (`engines.adapter_cache.HostCache`): LRU by bytes, holds,
pins, one shared re-read per dropped adapter, holds that let go when their job is garbage."""

from __future__ import annotations

import gc
import threading
from pathlib import Path

from loraplex.runtime.engines.adapter_cache import HostCache
from loraplex.runtime.engines.base import AdapterHandle, GenerationJob, SamplingParams


class Sink:
    def on_output(self, output) -> None:
        pass


def handle(name: str) -> AdapterHandle:
    return AdapterHandle(name=name, version="1", path=Path(f"{name}.onnx_adapter"))


def job(adapter: AdapterHandle) -> GenerationJob:
    return GenerationJob("r", [1], SamplingParams(), adapter, Sink())


class Engine:
    """Drops and re-reads by the book; a re-read waits for `gate`."""

    def __init__(self, budget: int):
        self.gate = threading.Event()
        self.gate.set()
        self.reads: list[str] = []
        self.dropped: list[str] = []
        self.cache = HostCache(budget, reload=self.reload, drop=self.drop)

    def reload(self, h: AdapterHandle) -> int:
        self.gate.wait(30)
        self.reads.append(h.name)
        return 40

    def drop(self, h: AdapterHandle):
        self.dropped.append(h.name)


def tiers(cache: HostCache, *handles: AdapterHandle) -> list[str]:
    return [cache.residency(h).tier for h in handles]


def test_least_recently_used_unheld_copies_go_first_and_pins_stay():
    engine = Engine(budget=100)
    cache = engine.cache
    a, b, c, d, e = (handle(n) for n in "abcde")
    cache.register(a, 40)
    cache.register(b, 40)
    cache.register(c, 40)  # 120 > 100: a, the least recently used, goes
    assert engine.dropped == ["a"] and tiers(cache, a, b, c) == ["disk", "host", "host"] and cache.bytes == 80
    held = job(b)
    assert cache.hold_job(held) is None  # in host memory: nothing to wait for; b is now the most recent
    cache.register(d, 40)
    assert engine.dropped == ["a", "c"]
    cache.pin(d)
    cache.register(e, 40)  # b held, d pinned: e itself goes
    assert engine.dropped == ["a", "c", "e"] and cache.bytes == 80
    cache.release_job(held)  # b is free now, but within budget: stays
    assert tiers(cache, b, d) == ["host", "host"]
    state = cache.residency(a)
    assert (state.evictions, state.loads) == (1, 1)


def test_a_dropped_adapter_is_read_once_for_concurrent_jobs():
    engine = Engine(budget=0)
    cache = engine.cache
    a = handle("a")
    cache.register(a, 40)
    engine.gate.clear()
    first, second = job(a), job(a)
    f1, f2 = cache.hold_job(first), cache.hold_job(second)
    assert f1 is f2 and not f1.done()
    engine.gate.set()
    f1.result(30)
    state = cache.residency(a)
    assert engine.reads == ["a"] and state.tier == "host" and state.loads == 2 and state.misses == 2
    cache.release_job(first)
    assert cache.residency(a).tier == "host"  # still held by the second
    cache.release_job(second)
    assert cache.residency(a).tier == "disk" and cache.bytes == 0


def test_a_hold_lets_go_when_its_job_is_garbage():
    engine = Engine(budget=0)
    cache = engine.cache
    a = handle("a")
    cache.register(a, 40)
    lost = job(a)
    cache.hold_job(lost).result(30)
    del lost
    gc.collect()
    cache.register(handle("b"), 40)  # any later event enforces the budget
    assert cache.residency(a).tier == "disk"


def test_in_slot_and_parked_move_an_adapter_between_tiers():
    engine = Engine(budget=50)
    cache = engine.cache
    a, b = handle("a"), handle("b")
    cache.register(a, 40)
    cache.in_slot(a)
    assert cache.residency(a).tier == "slot" and cache.bytes == 0
    cache.register(b, 40)
    cache.parked(a, 30)  # a leaves its slot: a host copy, the most recent; b goes
    assert tiers(cache, a, b) == ["host", "disk"] and cache.bytes == 30
    cache.forget(a)
    assert not cache.registered(a) and cache.bytes == 0
