"""Fair admission across adapters: the batched scheduler's queue of jobs waiting for a row.

A plain FIFO lets a burst on one adapter hold every free row until the burst is through, and a
burst of requests for many cold adapters copy each into a bank slot in one step (thrashing the slots
other queued requests were about to use). `FairQueue` keeps one FIFO per adapter and offers the
scheduler its jobs (`candidates`) in this order, one admission round per step with free rows:

1. overdue jobs first, oldest first: a job that has waited `max_wait_rounds` rounds goes ahead of
   everything, so none waits forever whatever the mix;
2. then the adapters' queues round-robin, the least recently served adapter first (ties: the
   oldest head job): the first job of each, then the second of each, ... (FIFO within an adapter);
3. at most `max_new_adapters` adapters that would take another adapter's bank slot are admitted per
   round (overdue jobs aside): the others wait a round, their turn kept. An adapter already in a
   slot, or one that finds a never-filled slot, costs no other adapter anything and is not counted.

Which candidates are admitted is the scheduler's (free rows, prefill budget, a slot): it marks a job
started when it admits it, then calls `keep` with the jobs it left queued. Pure Python, no model.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass

from loraplex.runtime.engines.base import GenerationJob

MAX_WAIT_ROUNDS = 32  # default: admission rounds a job may wait before it goes first


@dataclass(eq=False)
class _Entry:
    job: GenerationJob
    seq: int  # arrival order
    round: int  # the admission round when it arrived


class FairQueue:
    def __init__(self, *, max_new_adapters: int, max_wait_rounds: int = MAX_WAIT_ROUNDS):
        if max_new_adapters < 1 or max_wait_rounds < 1:
            raise ValueError("max_new_adapters and max_wait_rounds must be at least 1")
        self.max_new_adapters = max_new_adapters
        self.max_wait_rounds = max_wait_rounds
        self._queues: dict[Hashable, deque[_Entry]] = {}  # adapter (None: base) -> its jobs, FIFO
        self._entries: dict[GenerationJob, _Entry] = {}
        self._served: dict[Hashable, int] = {}  # adapter -> the last round it had a job admitted
        self._seq = itertools.count()
        self._offered: list[GenerationJob] = []
        self.round = 0

    # -- a deque's face (arrival order) -----------------------------------------------------
    def append(self, job: GenerationJob) -> None:
        entry = _Entry(job, next(self._seq), self.round)
        self._entries[job] = entry
        self._queues.setdefault(job.adapter, deque()).append(entry)

    def remove(self, job: GenerationJob) -> None:
        entry = self._entries.pop(job)  # KeyError, as deque.remove's ValueError, for a job not queued
        queue = self._queues[job.adapter]
        queue.remove(entry)
        if not queue:
            del self._queues[job.adapter]
            self._served.pop(job.adapter, None)

    def clear(self) -> None:
        self._queues.clear()
        self._entries.clear()
        self._served.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __iter__(self) -> Iterator[GenerationJob]:
        return iter([e.job for e in sorted(self._entries.values(), key=lambda e: e.seq)])

    def __getitem__(self, index: int) -> GenerationJob:
        return list(self)[index]

    # -- admission ----------------------------------------------------------------------------
    def candidates(self, resident: Callable[[Hashable], bool]) -> Iterator[GenerationJob]:
        """One admission round: the jobs in fair order (see the module). `resident(adapter)`: whether a
        row for the adapter would leave every other adapter's slot alone (asked as the round goes). A
        job the scheduler admits is marked started before it asks for the next candidate."""
        self.round += 1
        self._offered = []
        fresh: set[Hashable] = set()  # adapters that took another's slot this round
        for entry, overdue in self._order():
            adapter = entry.job.adapter
            new = adapter is not None and adapter not in fresh and not resident(adapter)
            if new and not overdue and len(fresh) >= self.max_new_adapters:
                continue  # waits for a later round, its turn kept
            self._offered.append(entry.job)
            yield entry.job
            if entry.job.started_at is not None:
                self._served[adapter] = self.round
                if new:
                    fresh.add(adapter)

    def keep(self, kept: Iterable[GenerationJob]) -> None:
        """End the round: offered jobs not in `kept` (admitted or dropped) leave the queue."""
        stay = set(kept)
        for job in self._offered:
            if job not in stay and job in self._entries:
                self.remove(job)
        self._offered = []

    def _order(self) -> Iterator[tuple[_Entry, bool]]:
        due = self.round - self.max_wait_rounds
        overdue = sorted((e for e in self._entries.values() if e.round <= due), key=lambda e: e.seq)
        yield from ((e, True) for e in overdue)
        late = {id(e) for e in overdue}
        turns = sorted(self._queues.items(), key=lambda kv: (self._served.get(kv[0], -1), kv[1][0].seq))
        queues = [[e for e in queue if id(e) not in late] for _, queue in turns]
        depth = max((len(q) for q in queues), default=0)
        for i in range(depth):
            for queue in queues:
                if i < len(queue):
                    yield queue[i], False
