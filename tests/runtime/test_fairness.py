"""Fair admission across adapters (`fairness.FairQueue`, and the batched scheduler with it): FIFO
within an adapter, round-robin across adapters (least recently served first), a bound on adapters
new to the bank per round, and no job waiting forever."""

from __future__ import annotations

from pathlib import Path

import pytest
from loraplex.runtime.engines.base import GenerationJob, SamplingParams
from loraplex.runtime.engines.batched.scheduler import BatchedAdapter, Scheduler
from loraplex.runtime.engines.fairness import FairQueue


class Sink:
    def on_output(self, output) -> None:
        raise AssertionError("nothing is delivered here")


def adapter(name: str) -> BatchedAdapter:
    return BatchedAdapter(name=name, version="1", path=Path(f"{name}.onnx_adapter"), weights=object())  # type: ignore[arg-type]


def job(name: str, handle=None, max_new_tokens: int = 8) -> GenerationJob:
    return GenerationJob(name, [1, 2, 3], SamplingParams(max_new_tokens=max_new_tokens), handle, Sink())


def round_of(queue: FairQueue, admit: int, resident=lambda a: True) -> list[str]:
    """One round in which the first `admit` candidates are admitted (marked started)."""
    admitted, kept = [], []
    for candidate in queue.candidates(resident):
        if len(admitted) < admit:
            candidate.mark_started()
            admitted.append(candidate.request_id)
        else:
            kept.append(candidate)
    queue.keep(kept)
    return admitted


def test_fifo_within_an_adapter_round_robin_across_adapters():
    hot, cold, warm = adapter("hot"), adapter("cold"), adapter("warm")
    queue = FairQueue(max_new_adapters=4)
    for i in range(4):
        queue.append(job(f"h{i}", hot))
    queue.append(job("c0", cold))
    queue.append(job("w0", warm))
    queue.append(job("w1", warm))
    assert [j.request_id for j in queue] == ["h0", "h1", "h2", "h3", "c0", "w0", "w1"]  # arrival order
    assert round_of(queue, 1) == ["h0"]  # the oldest head first
    assert round_of(queue, 2) == ["c0", "w0"]  # hot was just served: the others go first
    assert round_of(queue, 3) == ["h1", "w1", "h2"]  # one of each, then the second of each
    assert round_of(queue, 5) == ["h3"] and not queue


def test_a_burst_on_one_adapter_does_not_delay_a_cold_request():
    hot, cold = adapter("hot"), adapter("cold")
    queue = FairQueue(max_new_adapters=2)
    for i in range(50):
        queue.append(job(f"h{i}", hot))
    round_of(queue, 1)
    queue.append(job("cold", cold))  # arrives behind 49 queued hot requests
    assert round_of(queue, 1) == ["cold"]  # the next free row is its


def test_adapters_new_to_the_bank_are_bounded_per_round_and_keep_their_turn():
    resident = {adapter("r")}
    queue = FairQueue(max_new_adapters=2)
    cold = [adapter(f"c{i}") for i in range(5)]
    for i, handle in enumerate(cold):
        queue.append(job(f"c{i}", handle))
    queue.append(job("r", next(iter(resident))))
    assert round_of(queue, 8, resident=lambda a: a in resident) == ["c0", "c1", "r"]  # two copies at most
    assert round_of(queue, 8, resident=lambda a: a in resident) == ["c2", "c3"]
    assert [j.request_id for j in queue] == ["c4"]


def test_no_job_waits_longer_than_the_bound():
    a, b = adapter("a"), adapter("b")
    queue = FairQueue(max_new_adapters=1, max_wait_rounds=3)
    starved = job("starved", b)
    queue.append(starved)
    queue.append(job("a0", a))
    for round_number in range(10):  # a scheduler that admits only a's jobs (b never gets a slot)
        admitted, kept = [], []
        for candidate in queue.candidates(lambda h: True):
            if candidate.adapter is a and not admitted:
                candidate.mark_started()
                admitted.append(candidate)
            else:
                kept.append(candidate)
        queue.keep(kept)
        queue.append(job(f"a{round_number + 1}", a))
        if round_number >= 2:
            assert next(iter(queue.candidates(lambda h: True))) is starved  # overdue: offered first
            queue.keep(list(queue))
            queue.round -= 1  # that peek was not a round
    assert queue.round == 10


def test_remove_clear_and_bad_bounds():
    a = adapter("a")
    queue = FairQueue(max_new_adapters=1)
    first, second = job("1", a), job("2", a)
    queue.append(first)
    queue.append(second)
    queue.remove(first)
    assert queue[0] is second and len(queue) == 1
    with pytest.raises(KeyError):
        queue.remove(first)
    queue.clear()
    assert not queue
    with pytest.raises(ValueError):
        FairQueue(max_new_adapters=0)


def test_the_scheduler_admits_a_cold_request_within_one_step_of_a_hot_burst():
    """max_batch 4: a burst of 40 requests on one adapter fills every row; a cold adapter's request
    arriving behind them takes the first row that frees, not a row after the whole burst."""
    hot, cold = adapter("hot"), adapter("cold")
    s = Scheduler(max_batch=4, max_slots=4, max_len=64)
    for i in range(40):
        s.add(job(f"h{i}", hot, max_new_tokens=2))
    late = job("cold", cold, max_new_tokens=2)
    steps = 0
    while late.started_at is None:
        plan = s.schedule()
        steps += 1
        if steps == 1:
            s.add(late)  # arrives once the burst holds every row
        s.postprocess(plan.batch, [7] * len(plan.batch.rows))
        for row in plan.batch.rows:  # each hot request ends after its first decoded token
            if plan.batch.kind == "decode":
                s.end(row.job)
    assert steps <= 3  # prefill of the burst, a decode step that ends its rows, then the cold one joins
    assert sum(1 for j in s.waiting if j.adapter is hot) >= 30


def test_the_scheduler_bounds_the_slots_a_step_takes_from_other_adapters():
    """max_slots 4 (bound 2): four resident idle adapters; four cold ones arrive at once. Filling
    never-filled slots is free; taking resident adapters' slots goes two per step."""
    s = Scheduler(max_batch=8, max_slots=4, max_len=64)
    warm = [adapter(f"w{i}") for i in range(4)]
    for i, handle in enumerate(warm):
        s.add(job(f"w{i}", handle, max_new_tokens=1))
    plan = s.schedule()
    assert len(plan.batch.fills) == 4  # never-filled slots: all at once
    s.postprocess(plan.batch, [7] * 4)
    for row in plan.batch.rows:
        s.end(row.job)
    cold = [adapter(f"c{i}") for i in range(4)]
    for i, handle in enumerate(cold):
        s.add(job(f"c{i}", handle))
    plan = s.schedule()
    assert [h for _, h in plan.batch.fills] == cold[:2]
    s.postprocess(plan.batch, [7, 7])
    plan = s.schedule()
    assert [h for _, h in plan.batch.fills] == cold[2:]


class _FirstTokens:
    """A proxy of a server's engine that records the order in which requests get their first token."""

    def __init__(self, engine):
        self._engine, self.order = engine, []

    def submit(self, job) -> None:
        sink, order = job.sink, self.order

        class Recording:
            def on_output(self, output) -> None:
                if output.tokens and job.request_id not in order:
                    order.append(job.request_id)
                sink.on_output(output)

        job.sink = Recording()
        self._engine.submit(job)

    def __getattr__(self, name: str):
        return getattr(self._engine, name)


def test_a_cold_request_behind_a_hot_burst_gets_the_next_free_row(server_factory):
    """Both engines, 2 rows: 2 hot requests run, 8 more queue, then a cold one. It decodes right after
    the 2 running ones, not after the 8 queued before it."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.fixtures.serving import EngineBrake, wait_until

    server = server_factory(max_batch=2, max_queue=32, metrics_port=None)
    service = server.running.service
    with EngineBrake(server) as brake, ThreadPoolExecutor(11) as pool, server.client() as client:
        recorder = _FirstTokens(service.engine)
        service.engine = recorder
        brake.hold()

        def generate(adapter: str, rid: str):
            return client.generate(adapter, "The weather today", max_new_tokens=3, ignore_eos=True, request_id=rid)

        replies = [pool.submit(generate, "alpha", f"hot{i}") for i in range(2)]
        wait_until(lambda: service.in_flight == 2, what="two hot requests running")
        replies += [pool.submit(generate, "alpha", f"hot{i}") for i in range(2, 10)]
        wait_until(lambda: service.in_flight == 10, what="eight hot requests queued")
        replies.append(pool.submit(generate, "beta", "cold"))
        wait_until(lambda: service.in_flight == 11, what="the cold request queued")
        brake.release()
        assert all(len(r.result(60).token_ids) == 3 for r in replies)
        service.engine = recorder._engine
    assert set(recorder.order[:2]) == {"hot0", "hot1"}
    assert recorder.order.index("cold") <= 3, recorder.order  # a FIFO would make it the 11th
