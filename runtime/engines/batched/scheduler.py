"""The batched engine's scheduler: which requests run, in which KV row, with which adapter slot.

Pure Python: it never touches a tensor (the runner does), so it is unit-tested without a model.
One `schedule()` per engine step:

1. rows whose job was stopped (cancel, deadline, stop string) finish; queued jobs that were
   stopped end without running;
2. finished rows retire: the last row moves into each hole, so running rows are always KV rows
   `[0, n)` and a step never computes an empty row (the moves are handed to the runner);
3. queued jobs are admitted while there are free rows, the padded prefill stays under
   `max_prefill_tokens`, and their adapter has (or gets) a bank slot; a job whose adapter finds
   every slot busy waits (later jobs may pass it) and one busy slot is drained for it;
4. the step's batch is the admitted jobs' prefill if there are any, else one decode step of
   every running row.

`postprocess` then hands each row its token (or its error) and decides which rows are done.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from loraplex.adapters.package.adapter_file import AdapterWeights
from loraplex.runtime.engines.base import AdapterHandle, FinishReason, GenerationJob
from loraplex.runtime.engines.batched.slots import SlotTable
from loraplex.runtime.errors import EngineFailure

if TYPE_CHECKING:
    from loraplex.runtime.engines.batched.sampling import RowSampler


@dataclass(eq=False)
class BatchedAdapter(AdapterHandle):
    """An adapter version held by the batched engine; `weights` is None once it is unloaded.

    While a bank slot holds the adapter, `weights.tensors` is empty (the slot is its only copy; see
    `bank.WeightBank`); `weights.ranks` always says which modules it adapts at which rank."""

    weights: AdapterWeights | None = None


@dataclass(eq=False)
class Row:
    """A running request: its KV row holds `length` tokens; `last_token` is not in the cache yet."""

    job: GenerationJob
    slot: int
    length: int
    last_token: int = -1
    generated: int = 0
    finish: FinishReason | None = None
    sampler: RowSampler | None = None  # made by the runner at prefill


@dataclass
class Batch:
    kind: Literal["prefill", "decode"]
    rows: list[Row]
    start: int  # KV row of rows[0]: the batch uses KV rows [start, start + len(rows))
    fills: list[tuple[int, BatchedAdapter]] = field(default_factory=list)  # slots to fill before running


@dataclass
class Plan:
    """What one step does: compact the KV rows, end jobs, then run `batch` (if any)."""

    batch: Batch | None
    moves: list[tuple[int, int, int]]  # (source row, destination row, positions to copy), in order
    ended: list[tuple[GenerationJob, FinishReason]]  # to finish once `moves` are applied
    idle: bool  # no row runs after this step's retirement


@dataclass
class SchedulerStats:
    """Counters for metrics and tests (written by the engine thread, read from any)."""

    prefill_runs: int = 0
    decode_steps: int = 0
    tokens: int = 0
    max_rows: int = 0
    waits_for_slot: int = 0


class Scheduler:
    def __init__(self, *, max_batch: int, max_slots: int, max_len: int, eos_ids: frozenset[int],
                 max_prefill_tokens: int = 4096):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1 (got {max_batch})")
        self.max_batch = max_batch
        self.max_len = max_len
        self.eos_ids = eos_ids
        self.max_prefill_tokens = max_prefill_tokens
        self.slots = SlotTable(max_slots)
        self.waiting: deque[GenerationJob] = deque()
        self.running: list[Row] = []
        self.stats = SchedulerStats()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, jobs: list[GenerationJob]) -> None:
        self.waiting.extend(jobs)

    def forget(self, adapter: BatchedAdapter) -> bool:
        """Free an unloaded adapter's slot; False while rows still run on it (try again later)."""
        return self.slots.forget(adapter)

    # -- one step -------------------------------------------------------------------------
    def schedule(self) -> Plan:
        ended = self._end_stopped()
        moves, retired = self._retire()
        ended = retired + ended
        new, fills, more_ended = self._admit()
        ended += more_ended
        if new:
            start = len(self.running)
            self.running.extend(new)
            batch: Batch | None = Batch("prefill", new, start, fills)
            self.stats.prefill_runs += 1
        elif self.running:
            batch = Batch("decode", list(self.running), 0)
            self.stats.decode_steps += 1
        else:
            batch = None
        if batch is not None:
            self.stats.max_rows = max(self.stats.max_rows, batch.start + len(batch.rows))
        return Plan(batch, moves, ended, idle=not self.running)

    def postprocess(self, batch: Batch, outcomes: list[int | Exception]) -> None:
        """Give each row its token (or end it with its error) and mark the rows that are done."""
        for row, outcome in zip(batch.rows, outcomes, strict=True):
            if batch.kind == "decode":
                row.length += 1  # the token fed this step is now in the cache
            job = row.job
            if isinstance(outcome, Exception):
                job.fail(outcome)
                row.finish = FinishReason.CANCELLED
            elif job.stopped:
                row.finish = job.stop_reason or FinishReason.CANCELLED
            elif outcome in self.eos_ids and _constrained(row):
                row.finish = FinishReason.STOP  # the model ended where the constraint may end
            elif outcome in self.eos_ids and not job.params.ignore_eos:
                row.finish = FinishReason.EOS
            else:
                self._emit(row, outcome)

    def fail_all(self, error: Exception) -> list[tuple[GenerationJob, FinishReason]]:
        """End every job after an unexpected engine failure (nothing may be left hanging)."""
        failure = EngineFailure(f"the batched engine failed: {error}")
        for row in self.running:
            row.job.fail(failure)
            row.finish = FinishReason.CANCELLED
        _, ended = self._retire()
        for job in self.waiting:
            job.fail(failure)
            ended.append((job, FinishReason.CANCELLED))
        self.waiting.clear()
        self.running.clear()
        return ended

    # -- internals ------------------------------------------------------------------------
    def _emit(self, row: Row, token: int) -> None:
        row.last_token = token
        row.generated += 1
        self.stats.tokens += 1
        try:
            row.job.sink.on_token(token)
        except Exception as exc:  # the request layer failed: end this row only
            row.job.fail(exc)
            row.finish = FinishReason.CANCELLED
            return
        if row.job.stopped:  # the sink found a stop string
            row.finish = row.job.stop_reason or FinishReason.STOP
        elif _constrained(row) and row.sampler.constraint.complete:  # type: ignore[union-attr]
            row.finish = FinishReason.STOP
        elif row.generated >= row.job.params.max_new_tokens or row.length + 1 >= self.max_len:
            row.finish = FinishReason.LENGTH

    def _end_stopped(self) -> list[tuple[GenerationJob, FinishReason]]:
        for row in self.running:
            if row.job.stopped and row.finish is None:
                row.finish = row.job.stop_reason or FinishReason.CANCELLED
        ended = [(job, job.stop_reason or FinishReason.CANCELLED) for job in self.waiting if job.stopped]
        if ended:
            self.waiting = deque(job for job in self.waiting if not job.stopped)
        return ended

    def _retire(self) -> tuple[list[tuple[int, int, int]], list[tuple[GenerationJob, FinishReason]]]:
        """Remove finished rows (the last row moves into each hole) and free their slots."""
        moves: list[tuple[int, int, int]] = []
        ended: list[tuple[GenerationJob, FinishReason]] = []
        for i in reversed([i for i, row in enumerate(self.running) if row.finish is not None]):
            row = self.running[i]
            last = len(self.running) - 1
            if i != last:
                moved = self.running[last]
                moves.append((last, i, moved.length))
                self.running[i] = moved
            self.running.pop()
            self.slots.release(row.slot)
            ended.append((row.job, row.finish or FinishReason.CANCELLED))
        ended.reverse()
        return moves, ended

    def _admit(self) -> tuple[list[Row], list[tuple[int, BatchedAdapter]], list[tuple[GenerationJob, FinishReason]]]:
        free = self.max_batch - len(self.running)
        new: list[Row] = []
        fills: list[tuple[int, BatchedAdapter]] = []
        ended: list[tuple[GenerationJob, FinishReason]] = []
        if not free or not self.waiting:
            return new, fills, ended
        kept: deque[GenerationJob] = deque()
        longest = 0
        for job in self.waiting:
            adapter = job.adapter
            if isinstance(adapter, BatchedAdapter) and adapter.weights is None:
                job.fail(EngineFailure(f"adapter {adapter.name}@{adapter.version} was unloaded before this "
                                       "request started"))
                ended.append((job, FinishReason.CANCELLED))
                continue
            if job.params.max_new_tokens <= 0:  # nothing to generate: no row, no prefill
                job.mark_started()
                ended.append((job, FinishReason.LENGTH))
                continue
            longest_if = max(longest, len(job.prompt_ids))
            if len(new) >= free or (new and longest_if * (len(new) + 1) > self.max_prefill_tokens):
                kept.append(job)
                continue
            grant = self.slots.acquire(adapter)
            if grant is None:
                self.stats.waits_for_slot += 1
                self.slots.drain_one()
                kept.append(job)
                continue
            if grant.fill:
                assert isinstance(adapter, BatchedAdapter)
                fills.append((grant.slot, adapter))
            longest = longest_if
            job.mark_started()
            new.append(Row(job=job, slot=grant.slot, length=len(job.prompt_ids)))
        self.waiting = kept
        return new, fills, ended


def _constrained(row: Row) -> bool:
    return row.sampler is not None and row.sampler.constraint is not None
