"""The `genai` engine: onnxruntime-genai, one generator per request, interleaved on one thread.

onnxruntime-genai's `generate_next_token` holds the GIL, so threads give no parallelism: a single
worker thread owns every generator and steps the running ones round-robin, one token each per
round, so concurrent requests progress together and a new request starts within one round. The
asyncio loop stays free between steps (health checks, admin calls). One generator holds one
adapter, so requests for different adapters interleave rather than batch (the `batched` engine
batches them). It runs on every execution provider onnxruntime-genai has.

Adapters are loaded into one `og.Adapters` under a unique key per version, so an old and a new
version of a name coexist while requests on the old one finish. A file that does not bind every
LoRA input at one rank is loaded from a padded copy (see loraplex.adapters.package.adapter_file:
ONNX Runtime's memory planner needs one rank across a run's LoRA inputs), written to a scratch
directory and unlinked once onnxruntime-genai has it open.

An output constraint goes to onnxruntime-genai's own guidance (`GeneratorParams.set_guidance`, the
same llguidance the batched engine masks with, on the same `OutputConstraint.guidance()` form);
when it is complete the generator produces EOS, which ends the job with STOP. A build of
onnxruntime-genai without guidance (probed at start) refuses constrained requests with
FAILED_PRECONDITION rather than ignoring their constraint.

A failure belongs to its job: an onnxruntime-genai error while starting or stepping a generator,
or a token sink that raises, ends that job only (its generator dropped first, so its adapter can
unload); the others keep decoding.
"""

from __future__ import annotations

import itertools
import logging
import random
import shutil
import tempfile
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.adapters.package.adapter_file import AdapterWeights, loadable_file
from loraplex.adapters.package.reader import Package
from loraplex.runtime.engines import devices
from loraplex.runtime.engines.base import (
    AdapterHandle,
    Engine,
    FinishReason,
    GenerationJob,
    SamplingParams,
    check_prompt,
)
from loraplex.runtime.errors import AdapterIncompatible, ConstraintUnsupported, EngineFailure, ShuttingDown

log = logging.getLogger(__name__)


@dataclass(eq=False)
class GenaiAdapter(AdapterHandle):
    key: str = ""  # its name in the engine's og.Adapters


@dataclass(eq=False)
class _Running:
    job: GenerationJob
    generator: Any  # og.Generator
    produced: int = 0


class GenaiEngine(Engine):
    name = "genai"

    def __init__(self, package: Package, *, device: str = "cpu", provider: str | None = None, max_batch: int = 8):
        import onnxruntime_genai as og

        self._og = og
        self.provider = devices.choose(device, provider)
        config = og.Config(str(package.root))
        devices.apply(config, self.provider)
        self.model = og.Model(config)
        self._eos = set(package.config.eos_token_ids)
        self._vocab_size = package.config.vocab_size
        self._max_len = package.config.context_length
        self._adapters = og.Adapters(self.model)
        self.guidance = self._probe_guidance()
        self._inputs = package.lora_inputs
        self._scratch = Path(tempfile.mkdtemp(prefix="loraplex-genai-"))
        self.max_batch = max(1, max_batch)
        self._keys = itertools.count()
        self._og_lock = threading.Lock()  # one onnxruntime-genai call at a time
        self._cond = threading.Condition()
        self._pending: deque[GenerationJob] = deque()
        self._running: list[_Running] = []
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="genai-engine", daemon=True)
        self._thread.start()

    def _probe_guidance(self) -> str | None:
        """None when this onnxruntime-genai build enforces output constraints, else why not."""
        try:
            params = self._og.GeneratorParams(self.model)
            params.set_search_options(max_length=2, batch_size=1)
            params.set_guidance("regex", "a")
            self._og.Generator(self.model, params)
        except Exception as exc:  # a build without guidance (onnxruntime-genai's USE_GUIDANCE off)
            return str(exc).split("\n", 1)[0][:200]
        return None

    # -- adapters -------------------------------------------------------------------------
    def load_adapter(self, name: str, version: str, weights: AdapterWeights) -> GenaiAdapter:
        limit = self.provider.adapter_limit
        if self.provider.name == "dml":
            raise AdapterIncompatible(limit)
        key = f"{name}@{version}#{next(self._keys)}"
        file = loadable_file(weights, self._inputs, self._scratch)
        try:
            with self._og_lock:
                self._adapters.load(str(file), key)
        except Exception as exc:  # onnxruntime-genai raises a bare RuntimeError
            hint = f" ({limit})" if limit else ""
            raise AdapterIncompatible(f"onnxruntime-genai could not load {weights.path.name}: {exc}{hint}") from exc
        finally:
            if file != weights.path:
                file.unlink(missing_ok=True)  # onnxruntime-genai holds it open (or has read it)
        return GenaiAdapter(name=name, version=version, path=weights.path, key=key)

    def unload_adapter(self, handle: AdapterHandle) -> None:
        assert isinstance(handle, GenaiAdapter)
        with self._og_lock:
            self._adapters.unload(handle.key)

    # -- jobs -----------------------------------------------------------------------------
    def submit(self, job: GenerationJob) -> None:
        check_prompt(job.prompt_ids, self._max_len, self._vocab_size)
        if job.params.constraint is not None and self.guidance is not None:
            raise ConstraintUnsupported(
                f"this onnxruntime-genai build cannot enforce output constraints ({self.guidance}); use --engine "
                "batched on CPU, a build with guidance, or send the request without `output` (and with "
                "`no_default_output` for an adapter with a default contract)"
            )
        with self._cond:
            if self._closing:
                raise ShuttingDown("the engine is closing and takes no new requests")
            self._pending.append(job)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()
        shutil.rmtree(self._scratch, ignore_errors=True)

    def healthy(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._pending or self._running or self._closing):
                    self._cond.wait()
                if self._closing and not (self._pending or self._running):
                    return
                starting = []
                while self._pending and len(self._running) + len(starting) < self.max_batch:
                    starting.append(self._pending.popleft())
                cancelled = [j for j in self._pending if j.stopped]
                for job in cancelled:
                    self._pending.remove(job)
            try:
                for job in cancelled:
                    _finish_job(job, job.stop_reason or FinishReason.CANCELLED)
                while starting:
                    self._start(starting.pop(0))
                for run in list(self._running):
                    self._step(run)
            except Exception as exc:  # a bug here must not leave every client hanging
                log.exception("genai engine loop failed; ending all jobs")
                self._fail_all(exc, starting)

    def _fail_all(self, error: Exception, unstarted: list[GenerationJob]) -> None:
        failure = EngineFailure(f"the genai engine failed: {error}")
        with self._cond:
            pending, self._pending = [*unstarted, *self._pending], deque()
        for run in list(self._running):
            run.job.fail(failure)
            self._finish(run, FinishReason.CANCELLED)
        for job in pending:
            job.fail(failure)
            _finish_job(job, FinishReason.CANCELLED)

    def _start(self, job: GenerationJob) -> None:
        job.mark_started()
        if job.stopped:
            _finish_job(job, job.stop_reason or FinishReason.CANCELLED)
            return
        try:
            with self._og_lock:
                params = self._og.GeneratorParams(self.model)
                params.set_search_options(**self._search_options(job))
                if job.params.constraint is not None:
                    params.set_guidance(*job.params.constraint.guidance())
                generator = self._og.Generator(self.model, params)
                if isinstance(job.adapter, GenaiAdapter):
                    generator.set_active_adapter(self._adapters, job.adapter.key)
                generator.append_tokens(job.prompt_ids)
        except Exception as exc:
            log.exception("request %s failed to start", job.request_id)
            generator = None  # before the sink hears: the adapter must be free to unload
            job.fail(exc)
            _finish_job(job, FinishReason.CANCELLED)
            return
        self._running.append(_Running(job, generator))

    def _search_options(self, job: GenerationJob) -> dict[str, Any]:
        p: SamplingParams = job.params
        max_length = len(job.prompt_ids) + p.max_new_tokens
        options: dict[str, Any] = dict(
            max_length=max_length,
            do_sample=p.temperature > 0,
            repetition_penalty=p.repetition_penalty,
            batch_size=1,
        )
        if p.temperature > 0:
            seed = p.seed if p.seed is not None else random.getrandbits(31)
            options.update(
                temperature=p.temperature,
                top_p=p.top_p,
                # genai_config's default top_k is 50: 0 (no cut) must be said as the vocab size.
                top_k=min(p.top_k, self._vocab_size) if p.top_k else self._vocab_size,
                random_seed=int(seed % (2**31 - 1)),
            )
        if p.ignore_eos and p.constraint is None:  # a complete constraint ends the job whatever ignore_eos says
            options["min_length"] = max_length
        return options

    def _step(self, run: _Running) -> None:
        job = run.job
        if job.stopped:
            self._finish(run, job.stop_reason or FinishReason.CANCELLED)
            return
        try:
            with self._og_lock:
                run.generator.generate_next_token()
                token = int(run.generator.get_next_tokens()[0])
                done = run.generator.is_done()
        except Exception as exc:
            log.exception("request %s failed while decoding", job.request_id)
            job.fail(exc)
            self._finish(run, FinishReason.CANCELLED)
            return
        if token in self._eos and job.params.constraint is not None:
            self._finish(run, FinishReason.STOP)  # the constraint is complete (guidance allows only EOS then)
            return
        if token in self._eos and not job.params.ignore_eos:
            self._finish(run, FinishReason.EOS)
            return
        run.produced += 1
        try:
            job.sink.on_token(token)
        except Exception as exc:  # the request layer failed: end this job only
            log.exception("token sink of request %s raised", job.request_id)
            job.fail(exc)
            self._finish(run, FinishReason.CANCELLED)
            return
        if job.stopped:  # the sink found a stop string
            self._finish(run, job.stop_reason or FinishReason.STOP)
        elif done or run.produced >= job.params.max_new_tokens:
            self._finish(run, FinishReason.LENGTH)

    def _finish(self, run: _Running, reason: FinishReason) -> None:
        self._running.remove(run)
        with self._og_lock:
            run.generator = None  # frees the KV cache and the adapter binding before the sink hears
        _finish_job(run.job, reason)


def _finish_job(job: GenerationJob, reason: FinishReason) -> None:
    try:
        job.sink.on_finish(reason)
    except Exception:
        log.exception("finish sink of request %s raised", job.request_id)
