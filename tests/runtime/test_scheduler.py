"""The batched engine's scheduler and slot table, without a model: admission order, slot LRU,
starvation freedom (drain), retirement of cancelled rows and KV compaction, per-row outcomes."""

from __future__ import annotations

from pathlib import Path

import pytest
from loraplex.runtime.engines.base import FinishReason, GenerationJob, SamplingParams
from loraplex.runtime.engines.batched.scheduler import BatchedAdapter, Scheduler
from loraplex.runtime.engines.batched.slots import BASE_SLOT, SlotTable

EOS = 0


class Sink:
    def __init__(self) -> None:
        self.tokens: list[int] = []

    def on_token(self, token: int) -> None:
        self.tokens.append(token)

    def on_finish(self, reason: FinishReason) -> None:  # the engine calls it; the scheduler never does
        raise AssertionError("the scheduler must hand ended jobs back, not finish them itself")


def adapter(name: str) -> BatchedAdapter:
    return BatchedAdapter(name=name, version="1", path=Path(f"{name}.onnx_adapter"), weights=object())  # type: ignore[arg-type]


def job(name: str, handle: BatchedAdapter | None = None, prompt: int = 4, max_new_tokens: int = 8) -> GenerationJob:
    return GenerationJob(name, list(range(1, prompt + 1)), SamplingParams(max_new_tokens=max_new_tokens), handle,
                         Sink())


def scheduler(**kwargs) -> Scheduler:
    options = dict(max_batch=4, max_slots=2, max_len=64, eos_ids=frozenset({EOS}))
    options.update(kwargs)
    return Scheduler(**options)


def ids(rows) -> list[str]:
    return [row.job.request_id for row in rows]


def test_jobs_are_admitted_in_arrival_order_up_to_max_batch_then_decode_together():
    s = scheduler(max_batch=3)
    s.add([job(f"r{i}") for i in range(5)])
    plan = s.schedule()
    assert plan.batch.kind == "prefill" and ids(plan.batch.rows) == ["r0", "r1", "r2"] and plan.batch.start == 0
    assert [j.request_id for j in s.waiting] == ["r3", "r4"]
    assert all(r.job.started_at is not None for r in plan.batch.rows)
    s.postprocess(plan.batch, [7, 7, 7])
    plan = s.schedule()  # no free row: a decode step of the three
    assert plan.batch.kind == "decode" and ids(plan.batch.rows) == ["r0", "r1", "r2"]


def test_a_prefill_stays_under_the_padded_token_budget():
    s = scheduler(max_batch=8, max_prefill_tokens=20)
    s.add([job("a", prompt=8), job("b", prompt=8), job("c", prompt=8)])
    plan = s.schedule()
    assert ids(plan.batch.rows) == ["a", "b"]  # a third 8-token prompt would pad to 24 > 20
    s.postprocess(plan.batch, [5, 5])
    plan = s.schedule()
    assert plan.batch.kind == "prefill" and ids(plan.batch.rows) == ["c"] and plan.batch.start == 2


def test_slots_fill_once_and_the_least_recently_used_idle_slot_is_evicted():
    a, b, c = adapter("a"), adapter("b"), adapter("c")
    s = scheduler(max_slots=2)
    s.add([job("1", a), job("2", b), job("3", None)])
    plan = s.schedule()
    assert [slot for slot, _ in plan.batch.fills] == [1, 2] and [h for _, h in plan.batch.fills] == [a, b]
    assert plan.batch.rows[2].slot == BASE_SLOT
    for row in plan.batch.rows:
        row.job.stop()
    s.postprocess(plan.batch, [1, 1, 1])
    s.schedule()  # retire: a's slot went idle before b's
    s.add([job("4", a)])
    plan = s.schedule()
    assert plan.batch.fills == []  # still resident: no copy
    s.add([job("5", c)])
    s.postprocess(plan.batch, [1])
    plan = s.schedule()
    assert plan.batch.fills == [(2, c)]  # b was the least recently used idle slot
    assert s.slots.resident() == {1: a, 2: c} and s.slots.fills == 3


def test_a_request_waiting_for_a_slot_is_not_starved_by_a_resident_adapter():
    a, b = adapter("a"), adapter("b")
    s = scheduler(max_batch=4, max_slots=1)
    s.add([job("first", a, max_new_tokens=2)])
    first = s.schedule().batch
    s.add([job("waiting", b), job("later", a)])  # `later` could join a's busy slot, but b came first
    plan = s.schedule()
    assert plan.batch.kind == "decode" and ids(plan.batch.rows) == ["first"]
    assert [j.request_id for j in s.waiting] == ["waiting", "later"] and s.stats.waits_for_slot == 2
    assert s.slots.draining == 1  # a's slot takes no new rows
    s.postprocess(first, [5])
    s.postprocess(plan.batch, [6])  # `first` reaches max_new_tokens
    plan = s.schedule()
    assert ids(plan.batch.rows) == ["waiting"] and plan.batch.fills == [(1, b)]
    assert [j.request_id for j in s.waiting] == ["later"]


def test_cancelled_rows_and_queued_jobs_retire_and_the_last_row_fills_each_hole():
    s = scheduler(max_batch=4)
    s.add([job(f"r{i}", prompt=3 + i) for i in range(4)])
    batch = s.schedule().batch
    s.postprocess(batch, [9, 9, 9, 9])
    s.add([job("queued")])
    s.running[1].job.stop()  # a client cancel
    s.running[2].job.stop(FinishReason.STOP)  # a stop string
    s.waiting[0].stop()  # cancelled before it ran
    plan = s.schedule()
    assert plan.moves == [(3, 2, 6), (2, 1, 6)]  # r3 (6 tokens) into r2's row, then into r1's
    assert ids(s.running) == ["r0", "r3"]  # r3 moved into the holes: rows stay [0, n)
    assert sorted((j.request_id, r) for j, r in plan.ended) == [
        ("queued", FinishReason.CANCELLED), ("r1", FinishReason.CANCELLED), ("r2", FinishReason.STOP)]
    assert plan.batch.kind == "decode" and not plan.idle


def test_retiring_every_row_leaves_the_runner_idle():
    s = scheduler()
    s.add([job("only", max_new_tokens=1)])
    batch = s.schedule().batch
    s.postprocess(batch, [4])
    plan = s.schedule()
    assert plan.batch is None and plan.idle and plan.ended[0][1] is FinishReason.LENGTH


def test_postprocess_ends_each_row_for_its_own_reason_and_isolates_errors():
    s = scheduler(max_batch=4, max_len=7)
    jobs = [job("eos"), job("error"), job("context", prompt=6), job("ok")]
    jobs[1].params = SamplingParams(max_new_tokens=8)
    s.add(jobs)
    batch = s.schedule().batch
    sinks = [j.sink for j in jobs]
    s.postprocess(batch, [EOS, RuntimeError("bad row"), 3, 3])
    finish = {row.job.request_id: row.finish for row in s.running}
    assert finish == {"eos": FinishReason.EOS, "error": FinishReason.CANCELLED, "context": FinishReason.LENGTH,
                      "ok": None}
    assert isinstance(jobs[1].error, RuntimeError)
    assert [sink.tokens for sink in sinks] == [[], [], [3], [3]]  # EOS is never emitted


def test_max_new_tokens_zero_ends_without_a_row_and_unloaded_adapters_fail():
    gone = adapter("gone")
    gone.weights = None
    s = scheduler()
    s.add([job("nothing", max_new_tokens=0), job("orphan", gone)])
    plan = s.schedule()
    assert plan.batch is None
    assert [(j.request_id, r) for j, r in plan.ended] == [("nothing", FinishReason.LENGTH),
                                                          ("orphan", FinishReason.CANCELLED)]
    assert "unloaded" in str(plan.ended[1][0].error)


def test_fail_all_ends_every_job():
    s = scheduler(max_batch=1)
    s.add([job("running"), job("waiting")])
    s.schedule()
    ended = s.fail_all(RuntimeError("boom"))
    assert [j.request_id for j, _ in ended] == ["running", "waiting"]
    assert all("boom" in str(j.error) for j, _ in ended) and not s.has_work


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
