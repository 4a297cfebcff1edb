"""The engine contract: what the server asks of a decoder, whatever runs underneath.

Two implementations (docs/architecture.md, "Engines"), one loop: `core.EngineCore` runs either
executor and keeps every rule below in one place.
- `genai`: onnxruntime-genai, one generator per request (`loraplex.runtime.engines.genai`);
- `batched`: continuous batching of requests for different adapters in one batch on
  onnxruntime.InferenceSession (`loraplex.runtime.engines.batched`).

Engines deal in token ids only: text, stop strings and templates live above them, so every engine
behaves the same to a client. An engine never blocks the asyncio loop: it decodes on its own thread
and hands each job's output to the job's `TokenSink`, once per step (`StepOutput`). Every engine honours:
- the sink gets completion tokens only, never the EOS token: EOS ends the job with
  `FinishReason.EOS` (unless `params.ignore_eos`);
- exactly one output carries the finish reason, the job's last, sent after the engine has dropped
  every resource of the job (generator, KV rows, adapter slot): the registry frees an adapter
  version right after the last job on it finishes;
- `job.mark_started()` when the job leaves the queue (queue time and depth are reported from it);
  `job.fail(error)` before finishing when decoding the job raised (the server reports INTERNAL);
- `job.stop(reason)` (cancel, deadline, a stop string found above the engine) ends the job before
  its next step, with that reason;
- `params.constraint` (already checked by the server) holds for every completion, greedy or sampled:
  the job ends with `FinishReason.STOP` once the constraint is complete (it allows nothing more, or
  the model ended it with EOS where it may end), with LENGTH when `max_new_tokens` comes first;
- `params.max_new_tokens` is already clamped by the server to what the context leaves;
- a failure belongs to its job: whatever one job's decoding or its sink raises ends that job (with
  `job.fail`) and never another; `submit` refuses a prompt the model cannot take (`check_prompt`).
"""

from __future__ import annotations

import abc
import enum
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from loraplex.adapters.package.adapter_file import AdapterWeights
from loraplex.adapters.package.output import OutputConstraint
from loraplex.runtime.errors import InvalidRequest

# Speculative decoding (the batched engine): drafts from the prompt (`lookup`), from the output
# contract (`contract`), from both (`on`), from both where verification is token-exact (`auto`:
# fp32 packages), or none (`off`).
SPECULATION_MODES = ("off", "lookup", "contract", "on", "auto")


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
    # Every completion must match it (checked by the server before submit); None = free text.
    constraint: OutputConstraint | None = None
    # Per completion token: its log-probability and this many most likely alternatives (None: none). From
    # the distribution the token is chosen from: the model's, after the repetition penalty and the output
    # constraint's mask, before temperature, top-k and top-p (which only shape the draw).
    logprobs: int | None = None
    # Scoring, not generating: the completion is these tokens, each scored (with `logprobs`) under the
    # model's own distribution (no penalty, no constraint). Label probabilities are computed this way.
    forced: tuple[int, ...] = ()
    # With `logprobs`: each token's listed alternatives are these tokens (in this order), not the most likely.
    candidates: tuple[int, ...] = ()


@dataclass(eq=False)
class AdapterHandle:
    """One loaded version of one adapter as an engine holds it; each engine subclasses it."""

    name: str
    version: str
    path: Path


@dataclass(frozen=True)
class TokenLogprobs:
    """One completion token's log-probability and the most likely alternatives, (token, logprob) from the
    most likely down (the token itself among them when it is one of them)."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class StepOutput:
    """One step's output for one job: its new completion tokens and, in its last output only, how it
    ended (sent once the job's resources are free)."""

    tokens: tuple[int, ...] = ()
    finish: FinishReason | None = None
    at: float = 0.0  # time.monotonic() when the step ended
    logprobs: tuple[TokenLogprobs, ...] = ()  # one per token when the job asked for them (`params.logprobs`)


class TokenSink(Protocol):
    """Where an engine delivers one job's output, on the engine's thread: keep it short (hand the
    output to another thread or loop), it delays every job of the step."""

    def on_output(self, output: StepOutput) -> None: ...


@dataclass(eq=False)
class GenerationJob:
    """One request as an engine sees it: prompt ids, parameters, the adapter version it is pinned to."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: AdapterHandle | None  # None = the base model
    sink: TokenSink
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    stop_reason: FinishReason | None = None
    submitted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None  # set by mark_started()
    error: BaseException | None = None  # set by fail()

    def mark_started(self) -> None:
        if self.started_at is None:
            self.started_at = time.monotonic()

    def fail(self, error: BaseException) -> None:
        """Decoding this job raised: record why and stop it (the sink still gets its finish).

        The error is kept without its traceback (log it before): the traceback's frames would keep
        the job's resources alive (a generator, and through it the adapter, which then refuses to
        unload) for as long as anyone holds the job.
        """
        error.__traceback__ = error.__context__ = error.__cause__ = None
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


def check_prompt(prompt_ids: list[int], max_len: int, vocab_size: int) -> None:
    """What every engine's `submit` refuses: an empty prompt, one that fills the context, unknown ids."""
    if not prompt_ids:
        raise InvalidRequest("the prompt is empty: send at least one token")
    if len(prompt_ids) >= max_len:
        raise InvalidRequest(
            f"the prompt has {len(prompt_ids)} tokens; the model's context length is {max_len} (prompt + completion): "
            "shorten the prompt"
        )
    if min(prompt_ids) < 0 or max(prompt_ids) >= vocab_size:
        raise InvalidRequest(f"prompt token ids must lie in [0, {vocab_size})")


class Engine(abc.ABC):
    """Decodes jobs; owns the engine-side copy of each loaded adapter version."""

    name: str

    @abc.abstractmethod
    def load_adapter(self, name: str, version: str, weights: AdapterWeights) -> AdapterHandle:
        """Take a checked adapter file; raise AdapterIncompatible if this engine cannot use it."""

    @abc.abstractmethod
    def unload_adapter(self, handle: AdapterHandle) -> None:
        """Free an adapter version no job uses any more (the registry guarantees that)."""

    @abc.abstractmethod
    def submit(self, job: GenerationJob) -> None:
        """Queue a job and return at once; its output arrives through `job.sink`."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop the engine's thread after the jobs in flight end."""

    def healthy(self) -> bool:
        """False once the engine can no longer decode (its thread died): health checks report it."""
        return True

    def quiet(self) -> AbstractContextManager:
        """Hold decoding between steps while the caller does Python work that needs the GIL (reading
        and checking an adapter file). An engine whose steps hold the GIL (onnxruntime-genai's)
        otherwise lets that work run only between its steps: seconds for a load under load. Others
        release the GIL while they compute and need nothing (the default)."""
        return nullcontext()
