"""The `batched` engine: continuous batching of requests for different adapters in one batch.

One onnxruntime.InferenceSession runs the package's banked graph (loraplex.adapters.lora_bank:
every LoRA input is a bank of adapter slots, `adapter_slot [batch]` picks one per row). One
thread loops:

1. drop rows that finished or were stopped (cancel, deadline, stop string: `job.stopped`),
   compacting the KV cache, and end queued jobs that were cancelled;
2. admit queued jobs while there are free rows and their adapter has (or gets) a bank slot;
   a job whose adapter finds every slot busy waits, later jobs may pass it;
3. prefill the admitted jobs together (right-padded to the longest prompt, written straight
   into their rows of the shared KV buffer) and sample each one's first token;
4. one decode step for every running row, each with its own length, adapter and sampling.

So requests join and leave at every step, and a joining request stalls the others for one
prefill run. InferenceSession.run releases the GIL: the asyncio server keeps serving while a
step runs. See batched_kv.py for the KV layout and why padding cannot change any row's result.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from loraplex.adapters.lora_bank import LOGITS_INDEX_INPUT, SLOT_INPUT, ensure_batched_model
from loraplex.runtime.batched_graph import bank_shapes, model_file_and_rank, read_genai_config
from loraplex.runtime.batched_kv import KVCache
from loraplex.runtime.batched_sampling import RowSampler, choose_tokens
from loraplex.runtime.batched_slots import AdapterBanks, read_adapter_weights
from loraplex.runtime.engine import AdapterHandle, Engine, FinishReason, GenerationJob
from loraplex.runtime.errors import DeviceUnavailable, EngineFailure, InvalidRequest, ShuttingDown

log = logging.getLogger(__name__)

CPU_PROVIDERS = (None, "", "cpu", "CPUExecutionProvider")


@dataclass(eq=False)
class _Row:
    """A running request: its KV row holds `length` tokens; `last_token` is not in the cache yet."""

    job: GenerationJob
    slot: int
    sampler: RowSampler
    length: int
    last_token: int = -1
    generated: int = 0
    finish: FinishReason | None = None


@dataclass
class BatchedStats:
    """Counters for metrics and tests (read from any thread; written by the engine thread)."""

    prefill_runs: int = 0
    decode_steps: int = 0
    tokens: int = 0
    max_rows: int = 0
    waits_for_slot: int = 0
    row_steps: list[int] = field(default_factory=list)  # running rows per decode step (last 1024)


class BatchedEngine(Engine):
    """Continuous batching with per-row adapters on onnxruntime (CPU execution provider).

    max_batch: rows decoding at once (the KV cache holds this many sequences).
    max_slots: adapters resident in the weight banks at once (default: max_batch, so no request
        waits for a slot); fewer saves host memory, and requests then wait for an LRU swap.
    max_seq_len: cap on prompt + completion (default and maximum: the package's context length).
    max_prefill_tokens: padded prompt tokens one prefill run may take (bounds a join's stall).
    intra_op_threads: onnxruntime's intra-op threads (0 = one per physical core).
    """

    name = "batched"

    def __init__(
        self,
        package_dir: str | Path,
        *,
        device: str = "cpu",
        provider: str | None = None,
        max_batch: int = 16,
        max_slots: int | None = None,
        max_seq_len: int | None = None,
        max_prefill_tokens: int = 4096,
        intra_op_threads: int = 0,
    ):
        if device not in ("cpu", "") or provider not in CPU_PROVIDERS:
            raise DeviceUnavailable(
                f"the batched engine runs on the CPU execution provider only (asked for device={device!r}, "
                f"provider={provider!r}); use --engine genai for accelerators"
            )
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1 (got {max_batch})")
        self.package_dir = Path(package_dir)
        config = read_genai_config(self.package_dir)
        decoder = config["decoder"]
        self.vocab_size = int(config["vocab_size"])
        eos = config.get("eos_token_id", [])
        self.eos_ids = frozenset(eos if isinstance(eos, list) else [eos])
        self.pad_id = int(config.get("pad_token_id", 0))
        context = int(config["context_length"])
        self.max_len = min(max_seq_len or context, context)
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        names = decoder["inputs"], decoder["outputs"]
        layers = int(decoder["num_hidden_layers"])
        self._kv_names = [
            (
                names[0]["past_key_names"] % i,
                names[0]["past_value_names"] % i,
                names[1]["present_key_names"] % i,
                names[1]["present_value_names"] % i,
            )
            for i in range(layers)
        ]

        model_file, rank = model_file_and_rank(self.package_dir, decoder)
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.log_severity_level = 3
        banked = ensure_batched_model(self.package_dir / model_file)
        self.session = ort.InferenceSession(str(banked), options, providers=["CPUExecutionProvider"])
        self._lora_shapes = bank_shapes(self.session)
        # Slots cost host memory only (a step gathers one slot per row whatever the bank size), so
        # by default there is one per row: no request then ever waits for a slot.
        self.banks = AdapterBanks(self._lora_shapes, max_slots or max_batch, rank)
        self.kv = KVCache(
            layers, max_batch, int(decoder["num_key_value_heads"]), self.max_len, int(decoder["head_size"])
        )
        self.stats = BatchedStats()

        self._cv = threading.Condition()
        self._incoming: deque[GenerationJob] = deque()
        self._forget: list[AdapterHandle] = []
        self._deferred: set[AdapterHandle] = set()  # unloads waiting for their rows to finish
        self._closing = False
        self._waiting: deque[GenerationJob] = deque()
        self._running: list[_Row] = []
        self._thread = threading.Thread(target=self._loop, name="loraplex-batched", daemon=True)
        self._thread.start()

    # ----- Engine interface (any thread) -----

    def load_adapter(self, name: str, version: str, path: Path) -> AdapterHandle:
        weights = read_adapter_weights(Path(path), self._lora_shapes)
        return AdapterHandle(name=name, version=version, path=Path(path), state=weights)

    def unload_adapter(self, handle: AdapterHandle) -> None:
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
        if job.adapter is not None and job.adapter.state is None:
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

    # ----- the engine thread -----

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._incoming or self._forget or self._running or self._waiting or self._closing):
                    self._cv.wait()
                self._waiting.extend(self._incoming)
                self._incoming.clear()
                forget, self._forget = self._forget, []
                if self._closing and not (self._waiting or self._running):
                    break
            try:
                self._iterate(forget)
            except Exception as exc:  # a bug here must not leave every client hanging
                log.exception("batched engine loop failed; ending all jobs")
                self._fail_all(exc)

    def _iterate(self, forget: list[AdapterHandle]) -> None:
        for handle in forget:
            if self.banks.forget(handle):
                handle.state = None
                self._deferred.discard(handle)
                continue
            # The registry unloads only unused versions; should rows still use it, wait for them.
            if handle not in self._deferred:
                self._deferred.add(handle)
                log.warning("adapter %s@%s unloaded while in use; freeing it when its rows finish",
                            handle.name, handle.version)
            with self._cv:
                self._forget.append(handle)
        self._end_stopped()
        new = self._admit()
        if new:
            self._step(self._prefill, new)
        if self._running:
            self._step(self._decode, self._running)
        elif self._waiting and not new:
            # Nothing runs yet some jobs wait: only possible while slots are being freed.
            with self._cv:
                self._cv.wait(timeout=0.01)

    def _fail_all(self, exc: Exception) -> None:
        for row in self._running:
            row.job.fail(EngineFailure(f"the batched engine failed: {exc}"))
            row.finish = FinishReason.CANCELLED
        try:
            self._retire()
        except Exception:
            log.exception("could not retire rows after a failure")
            self._running.clear()
        waiting, self._waiting = self._waiting, deque()
        for job in waiting:
            job.fail(EngineFailure(f"the batched engine failed: {exc}"))
            _finish_sink(job, FinishReason.CANCELLED)

    def _step(self, run, rows: list[_Row]) -> None:
        try:
            run(rows)
        except Exception as exc:  # an ONNX Runtime failure ends this step's rows, not the server
            log.exception("batched engine step failed for %d rows", len(rows))
            for row in rows:
                row.job.fail(EngineFailure(f"decoding failed: {exc}"))
                row.finish = FinishReason.CANCELLED
        self._retire()

    def _end_stopped(self) -> None:
        for row in self._running:
            if row.job.stopped and row.finish is None:
                row.finish = row.job.stop_reason or FinishReason.CANCELLED
        self._retire()
        if any(job.stopped for job in self._waiting):
            kept = deque()
            for job in self._waiting:
                if job.stopped:
                    _finish_sink(job, job.stop_reason or FinishReason.CANCELLED)
                else:
                    kept.append(job)
            self._waiting = kept

    def _admit(self) -> list[_Row]:
        free = self.max_batch - len(self._running)
        if not free or not self._waiting:
            return []
        new: list[_Row] = []
        kept: deque[GenerationJob] = deque()
        longest = 0
        for job in self._waiting:
            if job.adapter is not None and job.adapter.state is None:
                job.fail(EngineFailure(f"adapter {job.adapter.name}@{job.adapter.version} was unloaded before "
                                       "this request started"))
                _finish_sink(job, FinishReason.CANCELLED)
                continue
            if job.params.max_new_tokens <= 0:  # nothing to generate: no row, no prefill
                job.mark_started()
                _finish_sink(job, FinishReason.LENGTH)
                continue
            longest_if = max(longest, len(job.prompt_ids))
            if len(new) >= free or (new and longest_if * (len(new) + 1) > self.max_prefill_tokens):
                kept.append(job)
                continue
            slot = self.banks.acquire(job.adapter)
            if slot is None:
                self.stats.waits_for_slot += 1
                self.banks.drain_one()
                kept.append(job)
                continue
            longest = longest_if
            sampler = RowSampler(job.params, job.prompt_ids, self.vocab_size)
            new.append(_Row(job=job, slot=slot, sampler=sampler, length=len(job.prompt_ids)))
        self._waiting = kept
        return new

    def _prefill(self, new: list[_Row]) -> None:
        start = len(self._running)
        self._running.extend(new)  # rows [start, start + k) of the KV buffer
        k = len(new)
        lengths = np.array([row.length for row in new], dtype=np.int64)
        width = int(lengths.max())
        self.kv.ensure(width, rows=start)
        ids = np.full((k, width), self.pad_id, dtype=np.int64)
        for i, row in enumerate(new):
            ids[i, : row.length] = row.job.prompt_ids
            row.job.mark_started()
        mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
        last = self._run(ids, mask, new, start, lengths - 1)[:, 0, :]
        self.stats.prefill_runs += 1
        self._emit(new, choose_tokens(last, [row.sampler for row in new]))

    def _decode(self, rows: list[_Row]) -> None:
        ids = np.array([[row.last_token] for row in rows], dtype=np.int64)
        totals = np.array([row.length + 1 for row in rows], dtype=np.int64)
        # Each row's mask sums to its own total length (GQA reads only the sum); the width is the
        # longest row's, and must exceed 1 so GQA does not take a one-token step for a prompt.
        width = max(int(totals.max()), 2)
        self.kv.ensure(int(totals.max()), rows=len(rows))
        mask = (np.arange(width)[None, :] < totals[:, None]).astype(np.int64)
        logits = self._run(ids, mask, rows, 0, np.zeros(len(rows), dtype=np.int64))[:, 0, :]
        for row in rows:
            row.length += 1
        self.stats.decode_steps += 1
        self.stats.row_steps.append(len(rows))
        del self.stats.row_steps[:-1024]
        self._emit(rows, choose_tokens(logits, [row.sampler for row in rows]))

    def _run(self, ids: np.ndarray, mask: np.ndarray, rows: list[_Row], start: int, last: np.ndarray) -> np.ndarray:
        """One session run over KV rows [start, start + len(rows)); logits [rows, 1, vocab] at `last`."""
        binding = self.session.io_binding()
        binding.bind_cpu_input(LOGITS_INDEX_INPUT, last)
        binding.bind_output("logits")  # first: get_outputs() lists outputs in binding order
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        binding.bind_cpu_input(SLOT_INPUT, np.array([row.slot for row in rows], dtype=np.int64))
        for name, value in self.banks.ortvalues.items():
            binding.bind_ortvalue_input(name, value)
        views = self.kv.views(start, start + len(rows))
        for (past_k, past_v, present_k, present_v), (key, value) in zip(self._kv_names, views, strict=True):
            binding.bind_ortvalue_input(past_k, key)
            binding.bind_ortvalue_input(past_v, value)
            binding.bind_ortvalue_output(present_k, key)  # same memory: GQA updates the cache in place
            binding.bind_ortvalue_output(present_v, value)
        self.session.run_with_iobinding(binding)
        self.stats.max_rows = max(self.stats.max_rows, start + len(rows))
        return binding.get_outputs()[0].numpy()

    def _emit(self, rows: list[_Row], tokens: list[int]) -> None:
        for row, token in zip(rows, tokens, strict=True):
            params = row.job.params
            if row.job.stopped:
                row.finish = row.job.stop_reason or FinishReason.CANCELLED
                continue
            if token in self.eos_ids and not params.ignore_eos:
                row.finish = FinishReason.EOS
                continue
            row.last_token = token
            row.generated += 1
            self.stats.tokens += 1
            try:
                row.job.sink(token, None)
            except Exception as exc:
                log.exception("token sink of request %s raised", row.job.request_id)
                row.job.fail(exc)
                row.finish = FinishReason.CANCELLED
                continue
            if row.generated >= params.max_new_tokens or row.length + 1 >= self.max_len:
                row.finish = FinishReason.LENGTH

    def _retire(self) -> None:
        """Remove finished rows (moving the last row into each hole), free their slots, then tell
        their sinks: resources are gone before the finish call, as the engine contract asks."""
        done = [i for i, row in enumerate(self._running) if row.finish is not None]
        if not done:
            return
        finished = []
        for i in reversed(done):
            row = self._running[i]
            last = len(self._running) - 1
            if i != last:
                moved = self._running[last]
                self.kv.move_row(last, i, moved.length)
                self._running[i] = moved
            self._running.pop()
            self.banks.release(row.slot)
            finished.append(row)
        if not self._running:
            self.kv.reset()  # idle: give the memory back
        for row in reversed(finished):
            _finish_sink(row.job, row.finish)


def _finish_sink(job: GenerationJob, reason: FinishReason) -> None:
    try:
        job.sink(None, reason)
    except Exception:
        log.exception("finish sink of request %s raised", job.request_id)
