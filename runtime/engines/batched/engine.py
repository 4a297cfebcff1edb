"""The `batched` engine: continuous batching of requests for different adapters in one batch.

One thread loops over `step()`: the scheduler decides (which rows run, KV rows, adapter slots),
the runner computes (one session run, a token per row), the scheduler post-processes (tokens to
the sinks, finished rows). Requests join and leave at every step; a joining request stalls the
others for one prefill run. CPU execution provider only: the KV rows are host-memory views.

A failure belongs to the rows that cause it: the sampler reports a row's own error (non-finite
scores) in place of its token, and when a whole session run fails the step is run again row by
row, each row alone on its own KV row, so only the rows that fail alone end (with INTERNAL).
"""

from __future__ import annotations

import logging
import threading
import time

from loraplex.adapters.package.adapter_file import AdapterWeights
from loraplex.adapters.package.reader import Package
from loraplex.runtime.engines.base import AdapterHandle, Engine, FinishReason, GenerationJob, check_prompt
from loraplex.runtime.engines.batched.runner import ModelRunner
from loraplex.runtime.engines.batched.scheduler import Batch, BatchedAdapter, Scheduler
from loraplex.runtime.engines.batched.session import SessionSettings
from loraplex.runtime.errors import (
    ConstraintUnsupported,
    DeviceUnavailable,
    EngineFailure,
    InvalidRequest,
    ShuttingDown,
)

log = logging.getLogger(__name__)

CPU_PROVIDERS = (None, "", "cpu", "CPUExecutionProvider")
RELEASE_AFTER_IDLE_S = 0.5  # idle this long, the engine hands its free heap back to the system


class BatchedEngine(Engine):
    """Continuous batching with per-row adapters on onnxruntime (CPU execution provider).

    max_batch: rows decoding at once (the KV cache holds this many sequences).
    max_slots: adapters resident in the weight banks at once (default: max_batch, so no request
        waits for a slot). Slots are allocated as adapters arrive, and an adapter's weights live in
        its slot or, once swapped out, in a compact host copy: more slots cost no memory until used;
        a step gathers one slot per row whatever the bank size.
    intra_op_threads, allow_spinning, memory_arena, session_cache: the onnxruntime session's (see
        `session.SessionSettings`; the cache is made at the first start on a machine).
    """

    name = "batched"

    def __init__(self, package: Package, *, device: str = "cpu", provider: str | None = None, max_batch: int = 16,
                 max_slots: int | None = None, intra_op_threads: int = 0, allow_spinning: bool = True,
                 memory_arena: bool = True, session_cache: bool = True):
        if device not in ("cpu", "") or provider not in CPU_PROVIDERS:
            raise DeviceUnavailable(
                f"the batched engine runs on the CPU execution provider only (asked for device={device!r}, "
                f"provider={provider!r}); use --engine genai for accelerators"
            )
        config = package.config
        self.max_len = config.context_length
        self.vocab_size = config.vocab_size
        self.scheduler = Scheduler(max_batch=max_batch, max_slots=max_slots or max_batch, max_len=self.max_len,
                                   eos_ids=frozenset(config.eos_token_ids))
        settings = SessionSettings(intra_op_threads, allow_spinning, memory_arena, session_cache)
        self.runner = ModelRunner(package, max_batch=max_batch, max_slots=max_slots or max_batch, session=settings)
        self._cv = threading.Condition()
        self._incoming: list[GenerationJob] = []
        self._held: list[GenerationJob] = []  # constrained, until the runner's guidance has loaded
        self._forget: list[BatchedAdapter] = []
        self._deferred: set[BatchedAdapter] = set()  # unloads waiting for their rows to finish
        self._closing = False
        self._release_at: float | None = None  # when to give free memory back, if still idle then
        self._thread = threading.Thread(target=self._loop, name="loraplex-batched", daemon=True)
        self._thread.start()

    # ----- Engine interface (any thread) -----

    def load_adapter(self, name: str, version: str, weights: AdapterWeights) -> BatchedAdapter:
        return BatchedAdapter(name=name, version=version, path=weights.path, weights=weights)

    def unload_adapter(self, handle: AdapterHandle) -> None:
        assert isinstance(handle, BatchedAdapter)
        with self._cv:
            self._forget.append(handle)
            self._cv.notify()

    def submit(self, job: GenerationJob) -> None:
        check_prompt(job.prompt_ids, self.max_len, self.vocab_size)
        if isinstance(job.adapter, BatchedAdapter) and job.adapter.weights is None:
            raise InvalidRequest(f"adapter {job.adapter.name}@{job.adapter.version} was unloaded")
        if job.params.constraint is not None and (why := self.runner.guidance_error()):
            raise _unsupported(why)
        with self._cv:
            if self._closing:
                raise ShuttingDown("the engine is closing and takes no new requests")
            if job.params.constraint is not None and not (guidance := self.runner.want_guidance()).done():
                self._held.append(job)
                if len(self._held) == 1:  # the first to wait: woken (all of them) once the tokenizer is ready
                    guidance.add_done_callback(self._release_held)
                return
            self._incoming.append(job)
            self._cv.notify()

    def _release_held(self, _done) -> None:
        """(The helper thread) the tokenizer has loaded or failed: the constrained requests waiting for
        it go to the engine thread, which refuses them if it failed."""
        with self._cv:
            self._incoming.extend(self._held)
            self._held = []
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join()
        self.runner.close()

    def healthy(self) -> bool:
        return self._thread.is_alive()

    # ----- the engine thread -----

    def step(self) -> None:
        """One iteration: schedule -> run -> postprocess."""
        plan = self.scheduler.schedule()
        self.runner.compact(plan.moves, idle=plan.idle)
        _finish(plan.ended)  # after the runner let go of their rows
        if plan.idle and plan.batch is None:
            self._release_at = time.monotonic() + RELEASE_AFTER_IDLE_S
        if plan.batch is None:
            return
        self.scheduler.postprocess(plan.batch, self._run(plan.batch))

    def _run(self, batch: Batch) -> list[int | Exception]:
        """A token (or the row's error) per row. If the session run fails for the whole batch, each
        row runs alone (KV rows [i, i+1), its fills only): only the rows that fail alone get the error.
        Re-running is exact: a row's cache positions are rewritten with the same values."""
        try:
            return self.runner.run(batch)
        except Exception as exc:
            if len(batch.rows) == 1:
                log.exception("request %s failed in the batched engine", batch.rows[0].job.request_id)
                return [EngineFailure(f"decoding failed: {exc}")]
            log.warning("a %s step of %d rows failed (%s); running its rows one by one", batch.kind,
                        len(batch.rows), exc)
        outcomes: list[int | Exception] = []
        for i, row in enumerate(batch.rows):
            alone = Batch(batch.kind, [row], batch.start + i, [f for f in batch.fills if f[0] == row.slot])
            # The cache rows that must survive a growth: those filled so far (a prefill fills its rows
            # one by one here), or every row of a decode step.
            keep = batch.start + (i if batch.kind == "prefill" else len(batch.rows))
            try:
                outcomes.extend(self.runner.run(alone, keep=keep))
            except Exception as exc:
                log.exception("request %s failed in the batched engine", row.job.request_id)
                outcomes.append(EngineFailure(f"decoding failed: {exc}"))
        return outcomes

    def _wait_for_work(self) -> bool:
        """Under `_cv`: wait until there is work; True instead when the engine has been idle long enough
        to hand its free heap back (see `runtime.engines.heap`): not after every request, so a client sending one
        request after another never waits for it."""
        while not (self._incoming or self._forget or self.scheduler.has_work or (self._closing and not self._held)):
            if self._release_at is None:
                self._cv.wait()
                continue
            left = self._release_at - time.monotonic()
            if left <= 0:
                self._release_at = None
                return True
            self._cv.wait(timeout=left)
        return False

    def _loop(self) -> None:
        while True:
            with self._cv:
                release = self._wait_for_work()
            if release:
                self.runner.release_memory()
                continue
            with self._cv:
                incoming, self._incoming = self._incoming, []
                forget, self._forget = self._forget, []
                if self._closing and not (incoming or self._held or self.scheduler.has_work):
                    break
            self.scheduler.add(self._refuse_unenforceable(incoming))
            try:
                for handle in forget:
                    self._unload(handle)
                self.step()
                if self.scheduler.waiting and not self.scheduler.running:
                    with self._cv:  # only while an unloaded version's slot is being freed
                        self._cv.wait(timeout=0.01)
            except Exception as exc:  # a bug here must not leave every client hanging
                log.exception("batched engine loop failed; ending all jobs")
                _finish(self.scheduler.fail_all(exc))

    def _refuse_unenforceable(self, jobs: list[GenerationJob]) -> list[GenerationJob]:
        """`jobs` minus the constrained ones when the tokenizer could not be loaded for llguidance
        (those end here with ConstraintUnsupported: they waited for it to load)."""
        why = self.runner.guidance_error()
        if why is None:
            return jobs
        refused = [job for job in jobs if job.params.constraint is not None]
        for job in refused:
            job.fail(_unsupported(why))
        _finish([(job, FinishReason.CANCELLED) for job in refused])
        return [job for job in jobs if job.params.constraint is None]

    def _unload(self, handle: BatchedAdapter) -> None:
        if self.scheduler.forget(handle):
            handle.weights = None
            self._deferred.discard(handle)
            return
        # The registry unloads only unused versions; should rows still use it, wait for them.
        if handle not in self._deferred:
            self._deferred.add(handle)
            log.warning("adapter %s@%s unloaded while in use; freeing it when its rows finish",
                        handle.name, handle.version)
        with self._cv:
            self._forget.append(handle)


def _unsupported(why: str) -> ConstraintUnsupported:
    return ConstraintUnsupported(f"output constraints cannot be enforced with this package's tokenizer ({why}); "
                                 "send the request without `output` (and with `no_default_output`)")


def _finish(ended: list[tuple[GenerationJob, FinishReason]]) -> None:
    for job, reason in ended:
        try:
            job.sink.on_finish(reason)
        except Exception:
            log.exception("finish sink of request %s raised", job.request_id)
