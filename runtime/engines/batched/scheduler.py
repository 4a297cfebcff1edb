"""The batched engine's scheduler: which requests run, in which KV row, with which adapter slot.

Pure Python: it never touches a tensor (the runner does), so it is unit-tested without a model.
One `schedule()` per engine step:

1. rows the engine core ended (`end`: its finish policy, a cancel, a deadline) retire: the last
   row moves into each hole, so running rows are always KV rows
   `[0, n)` and a step never computes an empty row (the moves are handed to the runner);
2. queued jobs are admitted, in `fairness.FairQueue`'s order, while there are free rows, the padded prefill stays under
   `max_prefill_tokens`, and their adapter has (or gets) a bank slot; a job whose adapter finds
   every slot busy waits (later jobs may pass it) and one busy slot is drained for it; with a
   prefix cache (`prefix_cache`), a job whose prompt begins with cached blocks of its adapter's
   namespace starts from them (`Row.cached` tokens, which its prefill does not compute);
3. the step's batch is the admitted jobs' prefill if there are any (those without a cached prefix
   first, so they share one run), else one decode step of every running row.

`postprocess` then records each row's token in the row (its KV length, the token to feed next;
several tokens when a decode step verified drafts) and returns the step's samples; deciding which
jobs are done is the core's (`core.finish_reason`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from loraplex.adapters.package.adapter_file import AdapterWeights
from loraplex.runtime.engines.base import AdapterHandle, GenerationJob
from loraplex.runtime.engines.batched.prefix_cache import BASE, PrefixCache, adapter_namespace
from loraplex.runtime.engines.batched.slots import SlotTable
from loraplex.runtime.engines.core import Sample
from loraplex.runtime.engines.fairness import FairQueue
from loraplex.runtime.errors import EngineFailure

if TYPE_CHECKING:
    from loraplex.runtime.engines.batched.sampling import RowSampler
    from loraplex.runtime.engines.batched.speculation import RowDrafter


@dataclass(eq=False)
class BatchedAdapter(AdapterHandle):
    """An adapter version held by the batched engine; `weights` is None once it is unloaded.

    While a bank slot holds the adapter, `weights.tensors` is empty (the slot is its only copy; see
    `bank.WeightBank`); `weights.ranks` always says which modules it adapts at which rank."""

    weights: AdapterWeights | None = None
    digest: str = ""  # sha256 of its weights: its prefix cache namespace ("": none, nothing cached)


def prefix_namespace(adapter: AdapterHandle | None) -> str | None:
    """A job's prefix cache namespace: the base model's, or its adapter's weights' (never a name);
    None when the adapter has no digest (its prompts are not cached)."""
    if adapter is None:
        return BASE
    digest = getattr(adapter, "digest", "")
    return adapter_namespace(digest) if digest else None


@dataclass(eq=False)
class Row:
    """A running request: its KV row holds `length` tokens; `last_token` is not in the cache yet."""

    job: GenerationJob
    slot: int
    length: int
    last_token: int = -1
    ending: bool = False  # the core ended its job: retire at the next schedule
    sampler: RowSampler | None = None  # made by the runner at prefill
    drafter: RowDrafter | None = None  # its speculative drafts (`speculation`), made with the sampler
    generated: int = 0  # tokens chosen so far
    cached: int = 0  # prompt tokens a cached prefix puts in the KV row before its prefill
    prefix: list = field(default_factory=list)  # that prefix's blocks (`prefix_cache`), copied by the runner


@dataclass
class Batch:
    kind: Literal["prefill", "decode"]
    rows: list[Row]
    start: int  # KV row of rows[0]: the batch uses KV rows [start, start + len(rows))
    fills: list[tuple[int, BatchedAdapter]] = field(default_factory=list)  # slots to fill before running


@dataclass
class Plan:
    """What one step does: compact the KV rows, release jobs, then run `batch` (if any)."""

    batch: Batch | None
    moves: list[tuple[int, int, int]]  # (source row, destination row, positions to copy), in order
    released: list[GenerationJob]  # rows retired (free once `moves` are applied), jobs dropped from the queue
    idle: bool  # no row runs after this step's retirement


@dataclass
class SchedulerStats:
    """Counters for metrics and tests (written by the engine thread, read from any)."""

    prefill_runs: int = 0
    decode_steps: int = 0
    max_rows: int = 0
    waits_for_slot: int = 0


class Scheduler:
    def __init__(self, *, max_batch: int, max_slots: int, max_len: int, max_prefill_tokens: int = 4096,
                 prefix: PrefixCache | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1 (got {max_batch})")
        self.max_batch = max_batch
        self.max_len = max_len
        self.max_prefill_tokens = max_prefill_tokens
        self.slots = SlotTable(max_slots)
        # Per-adapter FIFO queues taken round-robin (`fairness`): a hot adapter cannot starve a cold one.
        self.waiting = FairQueue(max_new_adapters=max(2, max_slots // 2))
        self.running: list[Row] = []
        self.stats = SchedulerStats()
        self.prefix = prefix

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, job: GenerationJob) -> None:
        self.waiting.append(job)

    def end(self, job: GenerationJob) -> bool:
        """Drop `job`: True if it was only queued (nothing to free), False if its row retires at the next
        schedule (its job is then in `Plan.released`)."""
        for row in self.running:
            if row.job is job:
                row.ending = True
                return False
        self.waiting.remove(job)
        return True

    def forget(self, adapter: BatchedAdapter) -> bool:
        """Free an unloaded adapter's slot; False while rows still run on it (try again later)."""
        return self.slots.forget(adapter)

    # -- one step -------------------------------------------------------------------------
    def schedule(self) -> Plan:
        moves, released = self._retire()
        new, fills, dropped = self._admit()
        if new:
            new.sort(key=lambda row: row.cached > 0)  # rows without a past share one prefill run
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
        return Plan(batch, moves, released + dropped, idle=not self.running)

    def postprocess(self, batch: Batch, outcomes: list[int | list[int] | Exception]) -> list[Sample]:
        """Record each row's tokens (the last is the next one to feed) and return the step's samples:
        one per token, in order. A decode row's outcome may be a run of several tokens (speculative
        decoding: the accepted drafts, which were fed with its last token, then the model's)."""
        samples = []
        for row, outcome in zip(batch.rows, outcomes, strict=True):
            run = outcome if isinstance(outcome, list) else [outcome]
            constraint = row.sampler.constraint if row.sampler is not None else None
            for j, token in enumerate(run):
                if batch.kind == "decode":
                    row.length += 1  # the token fed before this one is now in the cache
                if isinstance(token, int):
                    row.last_token = token
                    row.generated += 1
                last = j == len(run) - 1
                logprobs = None
                if row.sampler is not None and isinstance(token, int):  # a run carries its tokens' own
                    logprobs = outcome.logprobs[j] if getattr(outcome, "logprobs", None) else \
                        row.sampler.logprobs if last else None
                samples.append(Sample(row.job, token, complete=last and constraint is not None and constraint.complete,
                                      full=row.length + 1 >= self.max_len, logprobs=logprobs))
        return samples

    def clear(self) -> None:
        """Forget every job and free their slots (after an unexpected failure: the core ends them)."""
        for row in self.running:
            row.ending = True
        self._retire()
        self.waiting.clear()

    # -- internals ------------------------------------------------------------------------
    def _retire(self) -> tuple[list[tuple[int, int, int]], list[GenerationJob]]:
        """Remove ended rows (the last row moves into each hole) and free their slots."""
        moves: list[tuple[int, int, int]] = []
        ended: list[GenerationJob] = []
        for i in reversed([i for i, row in enumerate(self.running) if row.ending]):
            row = self.running[i]
            last = len(self.running) - 1
            if i != last:
                moved = self.running[last]
                moves.append((last, i, moved.length))
                self.running[i] = moved
            self.running.pop()
            self.slots.release(row.slot)
            ended.append(row.job)
        ended.reverse()
        return moves, ended

    def _admit(self) -> tuple[list[Row], list[tuple[int, BatchedAdapter]], list[GenerationJob]]:
        """Rows for the queued jobs that fit, their slot fills, and the jobs dropped (failed) instead."""
        free = self.max_batch - len(self.running)
        new: list[Row] = []
        fills: list[tuple[int, BatchedAdapter]] = []
        ended: list[GenerationJob] = []
        if not free or not self.waiting:
            return new, fills, ended
        kept: deque[GenerationJob] = deque()
        longest = 0
        for job in self.waiting.candidates(self.slots.evicts_none):
            adapter = job.adapter
            if isinstance(adapter, BatchedAdapter) and adapter.weights is None:
                job.fail(EngineFailure(f"adapter {adapter.name}@{adapter.version} was unloaded before this "
                                       "request started"))
                ended.append(job)
                continue
            cached, prefix = self._cached_prefix(job)
            longest_if = max(longest, len(job.prompt_ids) - cached)
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
            new.append(Row(job=job, slot=grant.slot, length=len(job.prompt_ids), cached=cached, prefix=prefix))
            if self.prefix is not None:
                self.prefix.record(len(job.prompt_ids), cached)
        self.waiting.keep(kept)
        return new, fills, ended

    def _cached_prefix(self, job: GenerationJob) -> tuple[int, list]:
        """How many prompt tokens the prefix cache holds for `job` and the payloads of the blocks that
        hold them. At most all but the last two: the prefill must compute the last token's logits, and
        a run of one token rounds otherwise than a prefill over the same positions (logits up to 0.5
        apart on SmolLM2 int4), so the first token would not be the cache-off one."""
        namespace = prefix_namespace(job.adapter) if self.prefix is not None else None
        if namespace is None:
            return 0, []
        blocks = self.prefix.match(namespace, job.prompt_ids)  # type: ignore[union-attr]
        size = self.prefix.block_tokens  # type: ignore[union-attr]
        cached = min(len(blocks) * size, len(job.prompt_ids) - 2)
        if cached <= 0:
            return 0, []
        return cached, [block.payload for block in blocks[: -(-cached // size)]]
