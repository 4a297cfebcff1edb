"""The `genai` engine: onnxruntime-genai, one generator per request, interleaved on the core's thread.

onnxruntime-genai's `generate_next_token` holds the GIL, so threads give no parallelism: the engine
thread (`core.EngineCore`) owns every generator and each step advances the running ones
round-robin, one token each, so concurrent requests progress together and a new request starts
within one step. The asyncio loop stays free between steps (health checks, admin calls). One
generator holds one adapter, so requests for different adapters interleave rather than batch (the
`batched` engine batches them). It runs on every execution provider onnxruntime-genai has.

Adapters are loaded into one `og.Adapters` under a unique key per version, so an old and a new
version of a name coexist while requests on the old one finish. A file that does not bind every
LoRA input at one rank is loaded from a padded copy (see loraplex.adapters.package.adapter_file:
ONNX Runtime's memory planner needs one rank across a run's LoRA inputs), written to a scratch
directory and unlinked once onnxruntime-genai has it open.

An output constraint goes to onnxruntime-genai's own guidance (`GeneratorParams.set_guidance`, the
same llguidance the batched engine masks with, on the same `OutputConstraint.guidance()` form);
when it is complete the generator produces EOS, which the core's finish policy turns into STOP. A
build of onnxruntime-genai without guidance (probed at start) refuses constrained requests with
FAILED_PRECONDITION rather than ignoring their constraint.

An onnxruntime-genai error while starting or stepping a generator is that job's own: its generator
is dropped (so its adapter can unload) and the others keep decoding.

Log-probabilities: before each step the generator's logits (`Generator.get_logits`: the model's raw
scores for the next token, computed then and reused by `generate_next_token`) get the repetition
penalty (onnxruntime-genai's rule, over the same sequence) and, for a constrained job, the constraint's
mask from our own llguidance matcher on the package's tokenizer.json (the masks onnxruntime-genai's
guidance applies: same library, same grammar, same tokenizer), as the batched engine does. A scoring
job (`params.forced`) appends its given tokens (`append_tokens`) instead of generating, reading the
logits before each.
"""

from __future__ import annotations

import itertools
import logging
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from loraplex.adapters.package.adapter_file import AdapterWeights, loadable_file
from loraplex.adapters.package.reader import Package
from loraplex.runtime.engines import devices
from loraplex.runtime.engines.adapter_cache import DISK, HostCache, JobHolds, reread
from loraplex.runtime.engines.base import AdapterHandle, GenerationJob, SamplingParams
from loraplex.runtime.engines.core import EngineCore, Executor, Sample, StepResult
from loraplex.runtime.engines.fairness import FairQueue
from loraplex.runtime.engines.guidance import Guidance, RowConstraint
from loraplex.runtime.engines.logprobs import token_logprobs
from loraplex.runtime.errors import AdapterIncompatible, ConstraintUnsupported, LoraplexError

MAX_QUIET_S = 1.0  # the longest decoding waits for `quiet()` holders (a slow disk must not stall streams)

log = logging.getLogger(__name__)


@dataclass(eq=False)
class GenaiAdapter(AdapterHandle):
    key: str = ""  # its name in the engine's og.Adapters


class FairLock:
    """A lock granted in the order it was asked for."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    def __enter__(self) -> None:
        with self._cv:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._cv.wait_for(lambda: self._serving == ticket)

    def __exit__(self, *exc: object) -> None:
        with self._cv:
            self._serving += 1
            self._cv.notify_all()


@dataclass(eq=False)
class _Running:
    job: GenerationJob
    generator: Any  # og.Generator
    taken: int = 0  # completion tokens so far
    seen: set[int] = field(default_factory=set)  # the sequence's tokens (repetition penalty of logprobs)
    constraint: RowConstraint | None = None  # our matcher (logprobs of a constrained job)


class GenaiExecutor(Executor):
    def __init__(self, package: Package, *, device: str = "cpu", provider: str | None = None, max_batch: int = 8,
                 adapter_cache_bytes: int | None = None):
        import onnxruntime_genai as og

        self._og = og
        self.provider = devices.choose(device, provider)
        config = og.Config(str(package.root))
        devices.apply(config, self.provider)
        self.model = og.Model(config)
        self._vocab_size = package.config.vocab_size
        self._adapters = og.Adapters(self.model)
        self.guidance = self._probe_guidance()
        self._inputs = package.lora_inputs
        self._scratch = Path(tempfile.mkdtemp(prefix="loraplex-genai-"))
        self.max_batch = max(1, max_batch)
        self._keys = itertools.count()
        # One onnxruntime-genai call at a time. First come, first served: with a plain Lock the engine
        # thread, which takes it again right after each token, starved a Load for seconds.
        self._og_lock = FairLock()
        # Per-adapter FIFO queues taken round-robin (`fairness`, as the batched scheduler's; no slots here).
        self._pending = FairQueue(max_new_adapters=self.max_batch)
        self._running: dict[GenerationJob, _Running] = {}
        # An og.Adapters entry is the host tier (memory-mapped from its file on CPU): dropped when the
        # cache is over budget, loaded again when a job needs it.
        self.cache = HostCache(adapter_cache_bytes, reload=self._reload, drop=self._drop)
        self.holds = JobHolds(self.cache)
        self._package_root = package.root
        self._eos_ids = package.config.eos_token_ids
        self._guidance: Future[Guidance] | None = None  # loaded at the first constrained job with logprobs
        self._guidance_lock = threading.Lock()
        self._helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="genai-guidance")
        # `quiet()`: callers holding decoding between steps (see Engine.quiet), and an event the engine
        # thread sets when it waits for them.
        self._quiet = 0
        self._quiet_until = 0.0  # monotonic time after which decoding goes on whatever holds it
        self._quiet_cv = threading.Condition()
        self.waited_quiet = threading.Event()

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
        key, size = self._og_load(name, version, weights)
        handle = GenaiAdapter(name=name, version=version, path=weights.path, key=key)
        self.cache.register(handle, size)
        return handle

    def _og_load(self, name: str, version: str, weights: AdapterWeights) -> tuple[str, int]:
        """Load into og.Adapters under a new key; (key, bytes of the file it maps)."""
        limit = self.provider.adapter_limit
        key = f"{name}@{version}#{next(self._keys)}"
        file = loadable_file(weights, self._inputs, self._scratch)
        try:
            size = file.stat().st_size
            with self._og_lock:
                self._adapters.load(str(file), key)
        except Exception as exc:  # onnxruntime-genai raises a bare RuntimeError
            hint = f" ({limit})" if limit else ""
            raise AdapterIncompatible(f"onnxruntime-genai could not load {weights.path.name}: {exc}{hint}") from exc
        finally:
            if file != weights.path:
                file.unlink(missing_ok=True)  # onnxruntime-genai holds it open (or has read it)
        return key, size

    def unload_adapter(self, handle: AdapterHandle) -> bool:
        assert isinstance(handle, GenaiAdapter)
        if any(run.job.adapter is handle for run in self._running.values()):
            return False
        with self.cache.lock:
            state = self.cache.residency(handle)
            loaded = state is None or state.tier != DISK  # a dropped entry is already unloaded
            self.cache.forget(handle)
        if loaded:
            with self._og_lock:
                self._adapters.unload(handle.key)
        return True

    def _reload(self, handle: AdapterHandle) -> int:
        """(I/O thread) load a dropped adapter into og.Adapters again, under a new key."""
        assert isinstance(handle, GenaiAdapter)
        with self.quiet():
            key, size = self._og_load(handle.name, handle.version, reread(handle, self.cache, self._inputs))
        with self.cache.lock:
            current = self.cache.registered(handle)
            if current:
                handle.key = key
        if not current:  # unloaded meanwhile
            with self._og_lock:
                self._adapters.unload(key)
        return size

    def _drop(self, handle: AdapterHandle):
        """(Under the cache's lock) unload an entry no job holds, once the lock is released."""
        assert isinstance(handle, GenaiAdapter)
        key = handle.key

        def unload() -> None:
            with self._og_lock:
                self._adapters.unload(key)

        return unload

    # -- jobs -----------------------------------------------------------------------------
    def refusal(self, job: GenerationJob) -> LoraplexError | None:
        if (failed := self.holds.refusal(job)) is not None:
            return failed  # type: ignore[return-value]
        if job.params.constraint is not None and self.guidance is not None:
            return ConstraintUnsupported(
                f"this onnxruntime-genai build cannot enforce output constraints ({self.guidance}); use --engine "
                "batched on CPU, a build with guidance, or send the request without `output` (and with "
                "`no_default_output` for an adapter with a default contract)"
            )
        if self._needs_matcher(job) and self._guidance is not None and self._guidance.done() \
                and self._guidance.exception() is not None:
            why = str(self._guidance.exception()).split("\n", 1)[0][:200]
            return ConstraintUnsupported(f"log-probabilities of constrained output need llguidance's view of the "
                                         f"tokenizer, which failed to load ({why}); send the request without logprobs")
        return None

    def prerequisite(self, job: GenerationJob) -> Future | None:
        """A constrained job that asks for log-probabilities waits for llguidance's tokenizer; a job whose
        adapter was dropped from og.Adapters waits for it to be loaded again (`adapter_cache`)."""
        return self.holds.prerequisite(job, self._want_guidance() if self._needs_matcher(job) else None)

    @staticmethod
    def _needs_matcher(job: GenerationJob) -> bool:
        return job.params.constraint is not None and job.params.logprobs is not None

    def _want_guidance(self) -> Future[Guidance]:
        with self._guidance_lock:
            if self._guidance is None:
                self._guidance = self._helper.submit(Guidance, self._package_root / "tokenizer.json",
                                                     self._vocab_size, self._eos_ids)
            return self._guidance

    def add(self, job: GenerationJob) -> None:
        self._pending.append(job)

    @property
    def has_work(self) -> bool:
        return bool(self._pending or self._running)

    def end(self, job: GenerationJob) -> bool:
        run = self._running.pop(job, None)
        if run is None:
            self._pending.remove(job)
        else:
            with self._og_lock:
                run.generator = None  # frees the KV cache and the adapter binding before the sink hears
        self.cache.release_job(job)
        return True

    @contextmanager
    def quiet(self) -> Iterator[None]:
        """Decoding waits between steps (at most `MAX_QUIET_S`) while this is held: onnxruntime-genai holds
        the GIL through each step (a prompt's whole prefill), so an adapter file read beside it got the GIL
        only between steps and every numpy copy cost a step (1.8 s for a Load under load, 14 ms alone)."""
        with self._quiet_cv:
            if not self._quiet:
                self._quiet_until = time.monotonic() + MAX_QUIET_S
            self._quiet += 1
        try:
            yield
        finally:
            with self._quiet_cv:
                self._quiet -= 1
                self._quiet_cv.notify_all()

    def _wait_quiet(self) -> None:
        with self._quiet_cv:
            left = self._quiet_until - time.monotonic()
            if self._quiet and left > 0:
                self.waited_quiet.set()
                self._quiet_cv.wait_for(lambda: not self._quiet, timeout=left)

    def step(self) -> StepResult:
        self._wait_quiet()
        result = StepResult()
        if self._pending and len(self._running) < self.max_batch:
            kept = []
            for job in self._pending.candidates(lambda adapter: True):
                if len(self._running) >= self.max_batch:
                    kept.append(job)
                elif not self._start(job):
                    result.released.append(job)
                    self.cache.release_job(job)
            self._pending.keep(kept)
        result.samples = [self._advance(run) for run in list(self._running.values())]
        return result

    def drop_all(self) -> None:
        self.holds.release([*self._running, *self._pending])
        with self._og_lock:
            self._running.clear()
        self._pending.clear()

    def release_memory(self) -> None:
        """onnxruntime-genai keeps its own arenas: nothing to hand back from here."""

    def close(self) -> None:
        self._helper.shutdown(wait=True)
        shutil.rmtree(self._scratch, ignore_errors=True)

    def _start(self, job: GenerationJob) -> bool:
        """Start a generator for `job`; False (the job failed and holds nothing) if onnxruntime-genai refused."""
        job.mark_started()
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
            run = _Running(job, generator)
            if job.params.logprobs is not None:
                run.seen.update(job.prompt_ids)
                if job.params.constraint is not None:
                    assert self._guidance is not None  # the job's prerequisite
                    run.constraint = self._guidance.result().row(job.params.constraint)
        except Exception as exc:
            log.exception("request %s failed to start", job.request_id)
            generator = run = None  # before the sink hears: the adapter must be free to unload
            job.fail(exc)
            return False
        self._running[job] = run
        return True

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

    def _advance(self, run: _Running) -> Sample:
        params = run.job.params
        try:
            with self._og_lock:
                scores = None
                if params.logprobs is not None:  # the logits the next token is chosen from (computed now)
                    scores = np.array(run.generator.get_logits(), dtype=np.float32).reshape(-1)
                if params.forced:
                    token = params.forced[min(run.taken, len(params.forced) - 1)]
                    if run.taken + 1 < len(params.forced):  # the last one's next logits are never read
                        run.generator.append_tokens([token])
                    done = False
                else:
                    run.generator.generate_next_token()
                    token = int(run.generator.get_next_tokens()[0])
                    done = run.generator.is_done()
            run.taken += 1
            logprobs = None if scores is None else token_logprobs(self._processed(run, scores, token), token,
                                                                  params.logprobs or 0, params.candidates)
        except Exception as exc:
            log.exception("request %s failed while decoding", run.job.request_id)
            return Sample(run.job, exc)
        return Sample(run.job, token, full=done, logprobs=logprobs)

    def _processed(self, run: _Running, scores: np.ndarray, token: int) -> np.ndarray:
        """The scores the generator chose from (see the module doc); our matcher advances past the token."""
        params = run.job.params
        if params.forced:
            return scores
        if params.repetition_penalty != 1.0 and run.seen:
            seen = np.fromiter(run.seen, dtype=np.int64)
            values = scores[seen]
            scores[seen] = np.where(values < 0, values * params.repetition_penalty, values / params.repetition_penalty)
        if run.constraint is not None:
            scores = run.constraint.mask(scores)
            run.constraint.advance(token)
        run.seen.add(token)
        return scores


class GenaiEngine(EngineCore):
    """The core running a `GenaiExecutor`."""

    name = "genai"

    def __init__(self, package: Package, *, device: str = "cpu", provider: str | None = None, max_batch: int = 8,
                 adapter_cache_bytes: int | None = None):
        config = package.config
        executor = GenaiExecutor(package, device=device, provider=provider, max_batch=max_batch,
                                 adapter_cache_bytes=adapter_cache_bytes)
        super().__init__(executor, max_len=config.context_length, vocab_size=config.vocab_size,
                         eos_ids=config.eos_token_ids, thread_name="genai-engine")
