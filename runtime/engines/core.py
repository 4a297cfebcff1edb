"""The engine core: one loop for every engine; what decodes underneath is an `Executor`.

The core owns what both engines share, so each invariant of the engine contract (`base`) is kept
in exactly one place:
- the engine thread, its inbox (jobs, adapter unloads), close and fail-all;
- what `submit` refuses (a prompt the model cannot take, a job the executor cannot run);
- jobs that wait for something before they may queue (`Executor.prerequisite`, e.g. the batched
  engine's llguidance tokenizer), off the executor's queue, so running rows keep decoding;
- the per-token finish policy (`finish_reason`): error, stop request, EOS, output contract complete,
  length; and the count of tokens each job has produced;
- a step may yield several tokens of one job (the batched engine's speculative decoding): one
  `Sample` each, in order, the policy applied to each; those after the one that ends the job are
  dropped (an EOS, a stop, the length reached inside an accepted run);
- delivery: once per step per job, one `StepOutput` with the job's new tokens and, once its
  resources are free, its finish reason. A sink that raises ends its own job only.

An executor (`genai.GenaiExecutor`, `batched.executor.BatchedExecutor`) only runs jobs: it queues
them, runs one step and reports a `Sample` per running job, frees the jobs the core ends, and never
decides when a job is done nor calls a sink.
"""

from __future__ import annotations

import abc
import logging
import threading
import time
from collections.abc import Iterable
from concurrent import futures
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

from loraplex.adapters.package.adapter_file import AdapterWeights
from loraplex.runtime.engines.base import (
    AdapterHandle,
    Engine,
    FinishReason,
    GenerationJob,
    StepOutput,
    TokenLogprobs,
    check_prompt,
)
from loraplex.runtime.engines.process_pages import drop_start_up_code
from loraplex.runtime.errors import EngineFailure, LoraplexError, ShuttingDown

log = logging.getLogger(__name__)

RELEASE_AFTER_IDLE_S = 0.5  # idle this long, the executor hands its free memory back to the system
RETRY_WAIT_S = 0.01  # work queued but nothing could run (a slot being freed): wait this long for news


@dataclass(frozen=True)
class Sample:
    """What one step produced for one running job: a token, or the job's own error."""

    job: GenerationJob
    token: int | Exception
    complete: bool = False  # the job's output constraint allows nothing after this token
    full: bool = False  # no room for another token (context, or the generator's length)
    logprobs: TokenLogprobs | None = None  # the token's, when the job asked for them (`params.logprobs`)


@dataclass
class StepResult:
    samples: list[Sample] = field(default_factory=list)
    released: list[GenerationJob] = field(default_factory=list)  # ended jobs whose resources are now free


class Executor(abc.ABC):
    """Runs jobs for the core. Every method except the adapter ones, `refusal` and `prerequisite`
    is called on the engine thread only."""

    @abc.abstractmethod
    def load_adapter(self, name: str, version: str, weights: AdapterWeights) -> AdapterHandle:
        """(Any thread) take a checked adapter file; raise AdapterIncompatible if it cannot be used."""

    @abc.abstractmethod
    def unload_adapter(self, handle: AdapterHandle) -> bool:
        """Free an adapter version; False while jobs still use it (the core retries after a step)."""

    def refusal(self, job: GenerationJob) -> LoraplexError | None:
        """(Any thread) why this job cannot run here, or None. Asked at submit and again when queued."""
        return None

    def prerequisite(self, job: GenerationJob) -> Future | None:
        """(Any thread) what the job must wait for before it queues (None: nothing)."""
        return None

    @abc.abstractmethod
    def add(self, job: GenerationJob) -> None:
        """Queue a job; it calls `job.mark_started()` when the job leaves the queue."""

    @abc.abstractmethod
    def end(self, job: GenerationJob) -> bool:
        """Stop running or queueing `job`; True when its resources are free now, False when it will be
        in a later step's `released`."""

    @abc.abstractmethod
    def step(self) -> StepResult:
        """Run one step of the jobs that are ready (a job may have several samples: its tokens in order)."""

    @property
    @abc.abstractmethod
    def has_work(self) -> bool:
        """Jobs queued, running or waiting to be released."""

    @abc.abstractmethod
    def drop_all(self) -> None:
        """After an unexpected failure: forget every job (the core fails and finishes them)."""

    @abc.abstractmethod
    def release_memory(self) -> None:
        """Nothing has run for a while: hand free memory back to the system."""

    def quiet(self) -> AbstractContextManager:
        """See `Engine.quiet` (default: nothing to hold)."""
        return nullcontext()

    @abc.abstractmethod
    def close(self) -> None:
        """The engine thread has ended: free what the executor holds."""


def finish_reason(sample: Sample, eos_ids: frozenset[int], produced: int) -> tuple[bool, FinishReason | None]:
    """The finish policy of every engine: (whether the sample's token is output, how the job ends).

    `produced`: the job's completion tokens before this one. EOS is never output: it ends the job
    with STOP under an output constraint (the model ended where the constraint may end), else with
    EOS unless `ignore_eos`.
    """
    job, token = sample.job, sample.token
    if isinstance(token, Exception):
        return False, FinishReason.CANCELLED
    if job.stopped:
        return False, job.stop_reason or FinishReason.CANCELLED
    if token in eos_ids:
        if job.params.constraint is not None:
            return False, FinishReason.STOP
        if not job.params.ignore_eos:
            return False, FinishReason.EOS
    if sample.complete:
        return True, FinishReason.STOP
    if produced + 1 >= job.params.max_new_tokens or sample.full:
        return True, FinishReason.LENGTH
    return True, None


class EngineCore(Engine):
    """An `Engine` made of the shared loop and one executor."""

    def __init__(self, executor: Executor, *, max_len: int, vocab_size: int, eos_ids: Iterable[int], thread_name: str):
        self.executor = executor
        self.max_len = max_len
        self.vocab_size = vocab_size
        self.eos_ids = frozenset(eos_ids)
        self._cv = threading.Condition()
        self._inbox: list[GenerationJob] = []
        self._held: list[GenerationJob] = []  # waiting for their prerequisite
        self._unloads: list[tuple[AdapterHandle, Future]] = []
        self._closing = False
        self._stopped = False  # the loop has ended
        self._produced: dict[GenerationJob, int] = {}  # the executor's jobs -> completion tokens so far
        self._ending: dict[GenerationJob, FinishReason] = {}  # ended by the core, not yet released
        self._logprobs: dict[GenerationJob, list[TokenLogprobs]] = {}  # of the tokens not delivered yet
        self._release_at: float | None = None
        self._thread = threading.Thread(target=self._loop, name=thread_name, daemon=True)
        self._thread.start()

    # ----- Engine interface (any thread) -----

    def load_adapter(self, name: str, version: str, weights: AdapterWeights) -> AdapterHandle:
        return self.executor.load_adapter(name, version, weights)

    def quiet(self) -> AbstractContextManager:
        return self.executor.quiet()

    def unload_adapter(self, handle: AdapterHandle) -> None:
        """Free an adapter version on the engine thread; returns once it is freed (raises what the
        executor raised). Jobs still on it keep it until they end."""
        done: Future = Future()
        with self._cv:
            if self._stopped:
                return  # the engine is closed: it holds nothing any more
            self._unloads.append((handle, done))
            self._cv.notify()
        while True:
            try:
                return done.result(timeout=1.0)
            except futures.TimeoutError:  # (TimeoutError itself from Python 3.11 on)
                if not self._thread.is_alive():  # the engine thread is gone: nothing will free it, nor use it
                    return

    def submit(self, job: GenerationJob) -> None:
        check_prompt(job.prompt_ids, self.max_len, self.vocab_size)
        if (why := self.executor.refusal(job)) is not None:
            raise why
        with self._cv:
            if self._closing:
                raise ShuttingDown("the engine is closing and takes no new requests")
            pending = self.executor.prerequisite(job)
            if pending is not None and not pending.done():
                self._held.append(job)
                pending.add_done_callback(lambda _: self._unhold(job))
                return
            self._inbox.append(job)
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join()
        self.executor.close()

    def healthy(self) -> bool:
        return self._thread.is_alive()

    def _unhold(self, job: GenerationJob) -> None:
        """(Whatever thread completed the prerequisite) the job may queue now."""
        with self._cv:
            self._held.remove(job)
            self._inbox.append(job)
            self._cv.notify()

    # ----- the engine thread -----

    def _loop(self) -> None:
        while True:
            with self._cv:
                if self._wait_for_work():
                    release = True
                else:
                    release = False
                    jobs, self._inbox = self._inbox, []
                    unloads, self._unloads = self._unloads, []
                    if self._closing and not (jobs or unloads or self._held or self._produced):
                        self._stopped = True
                        return
            if release:
                self.executor.release_memory()
                drop_start_up_code()  # once per process: what only start-up ran leaves RSS
                continue
            try:
                self._admit(jobs)
                self._unload(unloads)
                if self._produced and not self._step():
                    with self._cv:  # nothing could run (a slot is being freed): wait for news
                        self._cv.wait(timeout=RETRY_WAIT_S)
            except Exception as exc:  # a bug here must not leave every client hanging
                log.exception("engine loop failed; ending all jobs")
                self._fail_all(exc)

    def _wait_for_work(self) -> bool:
        """Under `_cv`: wait until there is work; True instead when the engine has been idle long enough
        to hand its free memory back (not after every request, so a client sending one request after
        another never waits for it)."""
        while not (self._inbox or self._unloads or self._produced or (self._closing and not self._held)):
            if self._release_at is None:
                self._cv.wait()
                continue
            left = self._release_at - time.monotonic()
            if left <= 0:
                self._release_at = None
                return True
            self._cv.wait(timeout=left)
        return False

    def _admit(self, jobs: list[GenerationJob]) -> None:
        for job in jobs:
            if (why := self.executor.refusal(job)) is not None:  # e.g. its prerequisite failed meanwhile
                job.fail(why)
                self._deliver(job, [], FinishReason.CANCELLED)
            elif job.params.max_new_tokens <= 0:  # nothing to generate: no row, no prefill
                job.mark_started()
                self._deliver(job, [], FinishReason.LENGTH)
            else:
                self._produced[job] = 0
                self.executor.add(job)

    def _unload(self, unloads: list[tuple[AdapterHandle, Future]]) -> None:
        waiting = []
        for handle, done in unloads:
            try:
                if self.executor.unload_adapter(handle):
                    done.set_result(None)
                else:
                    waiting.append((handle, done))
            except Exception as exc:
                done.set_exception(exc)
        if waiting:  # the registry unloads only unused versions; should jobs still use one, retry later
            log.debug("adapter(s) %s unloaded while in use; freeing them when their jobs finish",
                        ", ".join(f"{h.name}@{h.version}" for h, _ in waiting))
            with self._cv:
                self._unloads.extend(waiting)

    def _step(self) -> bool:
        """End the stopped jobs, run one executor step, apply the finish policy, deliver; False when
        nothing happened."""
        for job in list(self._produced):
            if job.stopped and job not in self._ending:
                self._end(job, job.stop_reason or FinishReason.CANCELLED, [])
        result = self.executor.step()
        tokens: dict[GenerationJob, list[int]] = {}
        for job in result.released:
            self._finish(job, [])
        for sample in result.samples:
            job = sample.job
            if job in self._ending:  # a later token of the same step (speculative decoding): never output
                continue
            output, reason = finish_reason(sample, self.eos_ids, self._produced[job])
            new = tokens.setdefault(job, [])
            if output:
                new.append(sample.token)  # type: ignore[arg-type]
                self._produced[job] += 1
                if sample.logprobs is not None:
                    self._logprobs.setdefault(job, []).append(sample.logprobs)
            if isinstance(sample.token, Exception):
                log.error("request %s failed: %s", job.request_id, sample.token)
                job.fail(sample.token)
            if reason is not None:
                self._end(job, reason, tokens.pop(job))
        for job, new in tokens.items():
            if new:
                self._deliver(job, new, None)
        if not self.executor.has_work:
            self._release_at = time.monotonic() + RELEASE_AFTER_IDLE_S
        return bool(result.samples or result.released)

    def _end(self, job: GenerationJob, reason: FinishReason, tokens: list[int]) -> None:
        """The core decided `job` ends: deliver its last tokens, and its finish once it is released."""
        self._ending[job] = reason
        if self.executor.end(job):
            self._finish(job, tokens)
        elif tokens:
            self._deliver(job, tokens, None)

    def _finish(self, job: GenerationJob, tokens: list[int]) -> None:
        """The executor let go of `job`: its one finish (after its last tokens)."""
        self._produced.pop(job, None)
        reason = self._ending.pop(job, FinishReason.CANCELLED)  # released unasked: the executor failed it
        self._deliver(job, tokens, reason)

    def _deliver(self, job: GenerationJob, tokens: list[int], finish: FinishReason | None) -> None:
        try:
            logprobs = tuple(self._logprobs.pop(job, ()))
            job.sink.on_output(StepOutput(tuple(tokens), finish, time.monotonic(), logprobs))
        except Exception as exc:  # the request layer failed: end this job only
            log.exception("the output sink of request %s raised", job.request_id)
            if finish is None and job not in self._ending:
                job.fail(exc)
                self._end(job, FinishReason.CANCELLED, [])

    def _fail_all(self, error: Exception) -> None:
        failure = EngineFailure(f"the {self.name} engine failed: {error}")
        try:
            self.executor.drop_all()
        except Exception:
            log.exception("freeing the executor's jobs failed")
        with self._cv:
            jobs = [*self._produced, *self._inbox]
            self._inbox = []
        self._produced.clear()
        self._ending.clear()
        self._logprobs.clear()
        for job in jobs:
            job.fail(failure)
            self._deliver(job, [], FinishReason.CANCELLED)
