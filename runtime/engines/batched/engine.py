"""The `batched` engine: continuous batching of requests for different adapters in one batch.

One thread loops over `step()`: the scheduler decides (which rows run, KV rows, adapter slots),
the runner computes (one session run, a token per row), the scheduler post-processes (tokens to
the sinks, finished rows). Requests join and leave at every step; a joining request stalls the
others for one prefill run. CPU execution provider only: the KV rows are host-memory views.
"""

from __future__ import annotations

import logging
import threading

from loraplex.adapters.package.adapter_file import AdapterWeights
from loraplex.adapters.package.reader import Package
from loraplex.runtime.engines.base import AdapterHandle, Engine, FinishReason, GenerationJob
from loraplex.runtime.engines.batched.runner import ModelRunner
from loraplex.runtime.engines.batched.scheduler import BatchedAdapter, Scheduler
from loraplex.runtime.errors import DeviceUnavailable, InvalidRequest, ShuttingDown

log = logging.getLogger(__name__)

CPU_PROVIDERS = (None, "", "cpu", "CPUExecutionProvider")


class BatchedEngine(Engine):
    """Continuous batching with per-row adapters on onnxruntime (CPU execution provider).

    max_batch: rows decoding at once (the KV cache holds this many sequences).
    max_slots: adapters resident in the weight banks at once (default: max_batch, so no request
        waits for a slot; slots cost host memory only, a step gathers one slot per row whatever
        the bank size); fewer saves memory, and requests then wait for an LRU swap.
    intra_op_threads: onnxruntime's intra-op threads (0 = one per physical core).
    """

    name = "batched"

    def __init__(self, package: Package, *, device: str = "cpu", provider: str | None = None, max_batch: int = 16,
                 max_slots: int | None = None, intra_op_threads: int = 0):
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
        self.runner = ModelRunner(package, max_batch=max_batch, max_slots=max_slots or max_batch,
                                  intra_op_threads=intra_op_threads)
        self._cv = threading.Condition()
        self._incoming: list[GenerationJob] = []
        self._forget: list[BatchedAdapter] = []
        self._deferred: set[BatchedAdapter] = set()  # unloads waiting for their rows to finish
        self._closing = False
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
        prompt = job.prompt_ids
        if not prompt:
            raise InvalidRequest("the prompt is empty: send at least one token")
        if len(prompt) >= self.max_len:
            raise InvalidRequest(
                f"the prompt has {len(prompt)} tokens; the batched engine's context holds {self.max_len} "
                "(prompt + completion): shorten the prompt"
            )
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise InvalidRequest(f"prompt token ids must lie in [0, {self.vocab_size})")
        if isinstance(job.adapter, BatchedAdapter) and job.adapter.weights is None:
            raise InvalidRequest(f"adapter {job.adapter.name}@{job.adapter.version} was unloaded")
        with self._cv:
            if self._closing:
                raise ShuttingDown("the engine is closing and takes no new requests")
            self._incoming.append(job)
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join()

    def healthy(self) -> bool:
        return self._thread.is_alive()

    # ----- the engine thread -----

    def step(self) -> None:
        """One iteration: schedule -> run -> postprocess."""
        plan = self.scheduler.schedule()
        self.runner.compact(plan.moves, idle=plan.idle)
        _finish(plan.ended)  # after the runner let go of their rows
        if plan.batch is None:
            return
        try:
            outcomes = self.runner.run(plan.batch)
        except Exception as exc:  # an ONNX Runtime failure ends this batch's rows, not the server
            log.exception("batched engine step failed for %d rows", len(plan.batch.rows))
            outcomes = [exc] * len(plan.batch.rows)
        self.scheduler.postprocess(plan.batch, outcomes)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._incoming or self._forget or self.scheduler.has_work or self._closing):
                    self._cv.wait()
                self.scheduler.add(self._incoming)
                self._incoming = []
                forget, self._forget = self._forget, []
                if self._closing and not self.scheduler.has_work:
                    break
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


def _finish(ended: list[tuple[GenerationJob, FinishReason]]) -> None:
    for job, reason in ended:
        try:
            job.sink.on_finish(reason)
        except Exception:
            log.exception("finish sink of request %s raised", job.request_id)
