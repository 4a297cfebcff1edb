"""The `batched` engine: continuous batching of requests for different adapters in one batch.

The executor's `step()` is schedule -> run -> postprocess: the scheduler decides (which rows run,
KV rows, adapter slots), the runner computes (one session run, a token per row), the scheduler
post-processes (each row's KV length and last token) and the core (`core.EngineCore`) applies the
finish policy to the samples. Requests join and leave at every step; a joining request stalls the
others for one prefill run. CPU execution provider only: the KV rows are host-memory views.

A failure belongs to the rows that cause it: the sampler reports a row's own error (non-finite
scores) in place of its token, and when a whole session run fails the step is run again row by
row, each row alone on its own KV row, so only the rows that fail alone end (with INTERNAL).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from dataclasses import replace

from loraplex.adapters.package.adapter_file import AdapterWeights
from loraplex.adapters.package.reader import Package
from loraplex.runtime.engines.adapter_cache import HostCache, JobHolds, reread
from loraplex.runtime.engines.base import AdapterHandle, GenerationJob
from loraplex.runtime.engines.batched.prefix_cache import (
    DEFAULT_MIB,
    PrefixCache,
    adapter_namespace,
    weights_digest,
)
from loraplex.runtime.engines.batched.runner import ModelRunner
from loraplex.runtime.engines.batched.scheduler import Batch, BatchedAdapter, Scheduler, prefix_namespace
from loraplex.runtime.engines.batched.session import SessionSettings
from loraplex.runtime.engines.core import EngineCore, Executor, StepResult
from loraplex.runtime.errors import (
    ConstraintUnsupported,
    DeviceUnavailable,
    EngineFailure,
    InvalidRequest,
    LoraplexError,
)

log = logging.getLogger(__name__)

CPU_PROVIDERS = (None, "", "cpu", "CPUExecutionProvider")
MIB = 1 << 20


class BatchedExecutor(Executor):
    """Per-row adapters on onnxruntime's CPU execution provider: a scheduler and a model runner."""

    def __init__(self, package: Package, *, max_batch: int, max_slots: int,
                 session: SessionSettings, prefix_cache_bytes: int = 0, speculation: str = "auto",
                 adapter_cache_bytes: int | None = None):
        config = package.config
        self.prefix = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self._digests: dict[str, int] = {}  # loaded adapter versions per weights digest (their prefixes' namespace)
        self._digests_lock = threading.Lock()  # loads run on the registry's threads, unloads on the engine's
        self.scheduler = Scheduler(max_batch=max_batch, max_slots=max_slots, max_len=config.context_length,
                                   prefix=self.prefix)
        self.runner = ModelRunner(package, max_batch=max_batch, max_slots=max_slots, session=session,
                                  speculation=speculation)
        self._inputs = package.lora_inputs
        self.cache = HostCache(adapter_cache_bytes, reload=self._reload, drop=self._drop)
        self.holds = JobHolds(self.cache)
        self.runner.bank.on_fill = self.cache.in_slot
        self.runner.bank.on_park = self.cache.parked

    # ----- adapters -----

    def load_adapter(self, name: str, version: str, weights: AdapterWeights) -> BatchedAdapter:
        handle = BatchedAdapter(name=name, version=version, path=weights.path, weights=weights,
                                digest=self._digest(weights))
        self.cache.register(handle, weights.nbytes)
        return handle

    def unload_adapter(self, handle: AdapterHandle) -> bool:
        assert isinstance(handle, BatchedAdapter)
        if not self.scheduler.forget(handle):
            return False
        self._forget_prefixes(handle)
        with self.cache.lock:
            handle.weights = None
            self.cache.forget(handle)
        return True

    def _reload(self, handle: AdapterHandle) -> int:
        """(I/O thread) the host copy of an adapter whose copy was dropped, read again from its file."""
        assert isinstance(handle, BatchedAdapter)
        weights = reread(handle, self.cache, self._inputs)
        with self.cache.lock:
            if self.cache.registered(handle) and handle.weights is not None:
                handle.weights = weights
        return weights.nbytes

    def _drop(self, handle: AdapterHandle) -> None:
        """(Under the cache's lock) drop a host copy no job holds: its file has the weights."""
        assert isinstance(handle, BatchedAdapter)
        if handle.weights is not None:
            handle.weights = replace(handle.weights, tensors={})

    def _digest(self, weights: AdapterWeights) -> str:
        """The prefix cache namespace of a version being loaded (none without a cache): its file's sha256,
        which the server verified as it read it, else its tensors' (hashed here: 5-10 ms on SmolLM2)."""
        if self.prefix is None:
            return ""
        digest = weights.sha256 or weights_digest(weights.tensors)
        with self._digests_lock:
            self._digests[digest] = self._digests.get(digest, 0) + 1
        return digest

    def _forget_prefixes(self, handle: BatchedAdapter) -> None:
        """An unloaded version's cached prefixes go, unless another loaded version has the same weights."""
        if self.prefix is None or not handle.digest:
            return
        with self._digests_lock:
            left = self._digests.pop(handle.digest, 1) - 1
            if left:
                self._digests[handle.digest] = left
        if not left:
            self.prefix.drop(adapter_namespace(handle.digest))
        handle.digest = ""

    def _store_prefixes(self, batch: Batch, outcomes: list) -> None:
        """Keep the full prompt blocks of a prefill's rows that ran (the blocks not cached yet), and let go
        of the cached blocks they started from (in their KV rows now)."""
        if self.prefix is None or batch.kind != "prefill":
            return
        for i, (row, outcome) in enumerate(zip(batch.rows, outcomes, strict=True)):
            row.prefix = []
            namespace = prefix_namespace(row.job.adapter)
            if namespace is not None and not isinstance(outcome, Exception):
                self.prefix.store(namespace, row.job.prompt_ids,
                                  lambda a, b, kv_row=batch.start + i: self.runner.kv.read(kv_row, a, b))

    # ----- jobs -----

    def refusal(self, job: GenerationJob) -> LoraplexError | None:
        if (failed := self.holds.refusal(job)) is not None:
            return failed  # type: ignore[return-value]
        if isinstance(job.adapter, BatchedAdapter) and job.adapter.weights is None:
            return InvalidRequest(f"adapter {job.adapter.name}@{job.adapter.version} was unloaded")
        if job.params.constraint is not None and (why := self.runner.guidance_error()):
            return ConstraintUnsupported(f"output constraints cannot be enforced with this package's tokenizer "
                                         f"({why}); send the request without `output` (and with `no_default_output`)")
        return None

    def prerequisite(self, job: GenerationJob) -> Future | None:
        """A constrained job waits for llguidance's tokenizer (loaded when first needed); a job whose
        adapter's host copy was dropped waits for its file to be read again (see `adapter_cache`)."""
        guidance = self.runner.want_guidance() if job.params.constraint is not None else None
        return self.holds.prerequisite(job, guidance)

    def add(self, job: GenerationJob) -> None:
        self.scheduler.add(job)

    def end(self, job: GenerationJob) -> bool:
        if self.scheduler.end(job):
            self.cache.release_job(job)
            return True
        return False

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> StepResult:
        plan = self.scheduler.schedule()
        self.holds.release(plan.released)
        self.runner.compact(plan.moves, idle=plan.idle)
        if plan.batch is None:
            return StepResult([], plan.released)
        outcomes = self._run(plan.batch)
        self._store_prefixes(plan.batch, outcomes)
        return StepResult(self.scheduler.postprocess(plan.batch, outcomes), plan.released)

    def drop_all(self) -> None:
        self.holds.release([row.job for row in self.scheduler.running] + list(self.scheduler.waiting))
        self.scheduler.clear()

    def release_memory(self) -> None:
        self.runner.release_memory()

    def close(self) -> None:
        self.runner.close()
        self.cache.close()

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


class BatchedEngine(EngineCore):
    """Continuous batching with per-row adapters on onnxruntime (CPU execution provider).

    max_batch: rows decoding at once (the KV cache holds this many sequences).
    max_slots: adapters resident in the weight banks at once (default: max_batch, so no request
        waits for a slot). Slots are allocated as adapters arrive, and an adapter's weights live in
        its slot or, once swapped out, in a compact host copy: more slots cost no memory until used;
        a step gathers one slot per row whatever the bank size.
    prefix_cache_bytes: the prefix cache's bound (`prefix_cache`: prompt prefixes' KV kept across requests,
        per adapter version's weights; 0 = off).
    speculation: which drafts decode steps verify (`speculation.MODES`), each kept where the cost model
        says it pays: "on" from the prompt (lookup) and from the output contract, "auto" (the default)
        the same on fp32 packages and none on quantized ones (`speculation.resolve_mode`), "lookup" or
        "contract" from one source only, "off" never (one token per row and step).
    intra_op_threads, allow_spinning, spin_us, memory_arena, session_cache: the onnxruntime session's (see
        `session.SessionSettings`; the cache is made at the first start on a machine).
    """

    name = "batched"

    def __init__(self, package: Package, *, device: str = "cpu", provider: str | None = None, max_batch: int = 16,
                 max_slots: int | None = None, intra_op_threads: int = 0, allow_spinning: bool = True,
                 memory_arena: bool = True, session_cache: bool = True,
                 prefix_cache_bytes: int = DEFAULT_MIB * MIB, adapter_cache_bytes: int | None = None,
                 speculation: str = "auto", spin_us: int | None = None):
        if device not in ("cpu", "") or provider not in CPU_PROVIDERS:
            raise DeviceUnavailable(
                f"the batched engine runs on the CPU execution provider only (asked for device={device!r}, "
                f"provider={provider!r}); use --engine genai for accelerators"
            )
        settings = SessionSettings(intra_op_threads, allow_spinning, memory_arena, session_cache, spin_us)
        executor = BatchedExecutor(package, max_batch=max_batch, max_slots=max_slots or max_batch,
                                   session=settings, prefix_cache_bytes=prefix_cache_bytes, speculation=speculation,
                                   adapter_cache_bytes=adapter_cache_bytes)
        self.scheduler, self.runner = executor.scheduler, executor.runner
        self.prefix_cache = executor.prefix  # None when off
        config = package.config
        super().__init__(executor, max_len=config.context_length, vocab_size=config.vocab_size,
                         eos_ids=config.eos_token_ids, thread_name="loraplex-batched")
