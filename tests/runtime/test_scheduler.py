"""The batched engine's scheduler and slot table, without a model: admission order, slot LRU,
starvation freedom (drain), retirement of ended rows and KV compaction, per-row samples."""

from __future__ import annotations

from pathlib import Path

import pytest
from loraplex.runtime.engines.base import GenerationJob, SamplingParams
from loraplex.runtime.engines.batched.scheduler import BatchedAdapter, Scheduler
from loraplex.runtime.engines.batched.slots import BASE_SLOT, SlotTable


class Sink:
    def on_output(self, output) -> None:  # the engine core calls it; the scheduler never does
        raise AssertionError("the scheduler must hand samples and released jobs back, not deliver them")


def adapter(name: str) -> BatchedAdapter:
    return BatchedAdapter(name=name, version="1", path=Path(f"{name}.onnx_adapter"), weights=object())  # type: ignore[arg-type]


def job(name: str, handle: BatchedAdapter | None = None, prompt: int = 4, max_new_tokens: int = 8) -> GenerationJob:
    return GenerationJob(name, list(range(1, prompt + 1)), SamplingParams(max_new_tokens=max_new_tokens), handle,
                         Sink())


def scheduler(**kwargs) -> Scheduler:
    options = dict(max_batch=4, max_slots=2, max_len=64)
    options.update(kwargs)
    return Scheduler(**options)


def add(s: Scheduler, *jobs: GenerationJob) -> None:
    for j in jobs:
        s.add(j)


def ids(rows) -> list[str]:
    return [row.job.request_id for row in rows]


def test_jobs_are_admitted_in_arrival_order_up_to_max_batch_then_decode_together():
    s = scheduler(max_batch=3)
    add(s, *[job(f"r{i}") for i in range(5)])
    plan = s.schedule()
    assert plan.batch.kind == "prefill" and ids(plan.batch.rows) == ["r0", "r1", "r2"] and plan.batch.start == 0
    assert [j.request_id for j in s.waiting] == ["r3", "r4"]
    assert all(r.job.started_at is not None for r in plan.batch.rows)
    s.postprocess(plan.batch, [7, 7, 7])
    plan = s.schedule()  # no free row: a decode step of the three
    assert plan.batch.kind == "decode" and ids(plan.batch.rows) == ["r0", "r1", "r2"]


def test_a_prefill_stays_under_the_padded_token_budget():
    s = scheduler(max_batch=8, max_prefill_tokens=20)
    add(s, job("a", prompt=8), job("b", prompt=8), job("c", prompt=8))
    plan = s.schedule()
    assert ids(plan.batch.rows) == ["a", "b"]  # a third 8-token prompt would pad to 24 > 20
    s.postprocess(plan.batch, [5, 5])
    plan = s.schedule()
    assert plan.batch.kind == "prefill" and ids(plan.batch.rows) == ["c"] and plan.batch.start == 2


def test_slots_fill_once_and_the_least_recently_used_idle_slot_is_evicted():
    a, b, c = adapter("a"), adapter("b"), adapter("c")
    s = scheduler(max_slots=2)
    add(s, job("1", a), job("2", b), job("3", None))
    plan = s.schedule()
    assert [slot for slot, _ in plan.batch.fills] == [1, 2] and [h for _, h in plan.batch.fills] == [a, b]
    assert plan.batch.rows[2].slot == BASE_SLOT
    s.postprocess(plan.batch, [1, 1, 1])
    for row in plan.batch.rows:
        assert not s.end(row.job)  # running: retired at the next schedule
    s.schedule()  # retire: a's slot went idle before b's
    add(s, job("4", a))
    plan = s.schedule()
    assert plan.batch.fills == []  # still resident: no copy
    add(s, job("5", c))
    s.postprocess(plan.batch, [1])
    plan = s.schedule()
    assert plan.batch.fills == [(2, c)]  # b was the least recently used idle slot
    assert s.slots.resident() == {1: a, 2: c} and s.slots.fills == 3


def test_a_request_waiting_for_a_slot_is_not_starved_by_a_resident_adapter():
    a, b = adapter("a"), adapter("b")
    s = scheduler(max_batch=4, max_slots=1)
    add(s, job("first", a, max_new_tokens=2))
    first = s.schedule().batch
    add(s, job("waiting", b), job("later", a))  # `later` could join a's busy slot, but b came first
    plan = s.schedule()
    assert plan.batch.kind == "decode" and ids(plan.batch.rows) == ["first"]
    assert [j.request_id for j in s.waiting] == ["waiting", "later"] and s.stats.waits_for_slot == 2
    assert s.slots.draining == 1  # a's slot takes no new rows
    s.postprocess(first, [5])
    s.postprocess(plan.batch, [6])
    s.end(first.rows[0].job)  # the core's finish policy: `first` reached max_new_tokens
    plan = s.schedule()
    assert ids(plan.batch.rows) == ["waiting"] and plan.batch.fills == [(1, b)]
    assert [j.request_id for j in s.waiting] == ["later"]


def test_ended_rows_and_queued_jobs_retire_and_the_last_row_fills_each_hole():
    s = scheduler(max_batch=4)
    add(s, *[job(f"r{i}", prompt=3 + i) for i in range(4)])
    batch = s.schedule().batch
    s.postprocess(batch, [9, 9, 9, 9])
    add(s, job("queued"))
    assert not s.end(s.running[1].job) and not s.end(s.running[2].job)  # running: released at the next step
    assert s.end(s.waiting[0])  # only queued: nothing to free
    plan = s.schedule()
    assert plan.moves == [(3, 2, 6), (2, 1, 6)]  # r3 (6 tokens) into r2's row, then into r1's
    assert ids(s.running) == ["r0", "r3"]  # r3 moved into the holes: rows stay [0, n)
    assert [j.request_id for j in plan.released] == ["r1", "r2"] and not s.waiting
    assert plan.batch.kind == "decode" and not plan.idle


def test_retiring_every_row_leaves_the_runner_idle():
    s = scheduler()
    only = job("only", max_new_tokens=1)
    add(s, only)
    batch = s.schedule().batch
    s.postprocess(batch, [4])
    s.end(only)
    plan = s.schedule()
    assert plan.batch is None and plan.idle and plan.released == [only]


def test_postprocess_records_each_rows_token_and_reports_its_own_outcome():
    s = scheduler(max_batch=4, max_len=7)
    jobs = [job("error"), job("context", prompt=6), job("ok")]
    add(s, *jobs)
    batch = s.schedule().batch
    error = RuntimeError("bad row")
    samples = s.postprocess(batch, [error, 3, 5])
    assert [(x.job, x.token, x.full, x.complete) for x in samples] == [
        (jobs[0], error, False, False), (jobs[1], 3, True, False), (jobs[2], 5, False, False)]
    assert [row.last_token for row in s.running] == [-1, 3, 5] and [row.length for row in s.running] == [4, 6, 4]
    plan = s.schedule()  # a decode step: the token fed is now in the cache
    s.postprocess(plan.batch, [1, 1, 1])
    assert [row.length for row in s.running] == [5, 7, 5]


def test_unloaded_adapters_fail_at_admission():
    gone = adapter("gone")
    gone.weights = None
    s = scheduler()
    add(s, job("orphan", gone))
    plan = s.schedule()
    assert plan.batch is None and [j.request_id for j in plan.released] == ["orphan"]
    assert "unloaded" in str(plan.released[0].error)


def test_clear_forgets_every_job_and_frees_the_slots():
    a = adapter("a")
    s = scheduler(max_batch=1)
    add(s, job("running", a), job("waiting"))
    s.schedule()
    s.clear()
    assert not s.has_work and s.slots.forget(a)


def test_slot_table_never_evicts_a_slot_in_use_and_forgets_only_idle_adapters():
    a, b = adapter("a"), adapter("b")
    table = SlotTable(1)
    assert table.acquire(a).fill
    assert table.acquire(b) is None  # a's only slot is in use
    assert not table.forget(a)  # rows still on it
    table.release(1)
    assert table.forget(a) and table.resident() == {}
    assert table.acquire(b).slot == 1
    with pytest.raises(ValueError, match="max_slots"):
        SlotTable(0)
