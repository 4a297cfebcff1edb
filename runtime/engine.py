"""The engine interface: what the server asks of a decoder, whatever runs underneath.

Two implementations share it (see ../shared/DESIGN.md, "Engines"):
- `genai`: onnxruntime-genai, one generator per request (runtime/genai_engine.py);
- `batched`: continuous batching of requests for different adapters in one batch on
  onnxruntime.InferenceSession (runtime/batched_engine.py).

Engines deal in token ids only. Text (UTF-8 safe streaming detokenization), stop strings and
templates live above them, so every engine behaves the same to a client. An engine must
never block the asyncio loop: onnxruntime-genai's `generate_next_token` holds the GIL, so
decoding runs on its own thread (or process) and hands tokens back through `TokenSink`.

Contract details every engine honours (the server relies on them):
- the sink gets completion tokens only, never the EOS token: EOS ends the job with
  `FinishReason.EOS` (unless `params.ignore_eos`);
- the sink is called exactly once with a finish reason, after the engine has dropped every
  resource of the job (generator, KV cache, adapter binding): the registry unloads an adapter
  version right after the last job on it finishes;
- `params.max_new_tokens` is already clamped by the server to what the context leaves.

Additions since the first version (backward compatible, all optional for an engine):
- `GenerationJob.mark_started()`: call when the job leaves the queue and decoding begins
  (prefill); the server reports queue time and queue depth from it.
- `GenerationJob.fail(error)`: call instead of a plain finish when decoding raised; the sink
  still gets its one finish call (`FinishReason.CANCELLED`) and the server reports INTERNAL.
"""

from __future__ import annotations

import abc
import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class FinishReason(enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    EOS = "eos"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None  # same seed, same prompt, same adapter -> same output
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks: every request does the same work


@dataclass(eq=False)
class AdapterHandle:
    """One loaded version of one adapter, as an engine holds it (opaque `state`)."""

    name: str
    version: str
    path: Path
    state: Any = None


# Called from the engine's thread for every decoded token, and once more with `finished`
# set (and no token) when the sequence ends.
TokenSink = Callable[[int | None, "FinishReason | None"], None]


@dataclass(eq=False)
class GenerationJob:
    """One request as an engine sees it: prompt ids, the adapter version it is pinned to."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: AdapterHandle | None  # None = the base model
    sink: TokenSink
    _stop: threading.Event = field(default_factory=threading.Event)
    stop_reason: FinishReason | None = None
    submitted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None  # set by mark_started()
    error: BaseException | None = None  # set by fail()

    def mark_started(self) -> None:
        """Engines call this when the job leaves the queue and decoding begins."""
        if self.started_at is None:
            self.started_at = time.monotonic()

    def fail(self, error: BaseException) -> None:
        """Engines call this (then finish the sink) when decoding this job raised."""
        self.error = error
        self.stop(FinishReason.CANCELLED)

    def stop(self, reason: FinishReason = FinishReason.CANCELLED) -> None:
        """Ask the engine to end this job before its next step (cancel, deadline, stop string)."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()


class Engine(abc.ABC):
    """Decodes jobs; owns the engine-side copy of each loaded adapter.

    An engine may set `tokenizer` (a loraplex.runtime.tokenizer.TextTokenizer) when it already
    holds one; otherwise the server builds one from the package. Constructors take
    `(package_dir, *, device, provider, max_batch)` so `loraplex serve --engine` can build either.
    """

    name: str
    tokenizer: Any = None

    @abc.abstractmethod
    def load_adapter(self, name: str, version: str, path: Path) -> AdapterHandle:
        """Load an adapter file; raise AdapterIncompatible if it does not fit the graph."""

    @abc.abstractmethod
    def unload_adapter(self, handle: AdapterHandle) -> None:
        """Free an adapter no job uses any more (the registry guarantees that)."""

    @abc.abstractmethod
    def submit(self, job: GenerationJob) -> None:
        """Queue a job; returns at once. Tokens arrive through `job.sink` on the engine's thread."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop the engine's threads after the jobs in flight end."""
