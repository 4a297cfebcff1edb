"""Requests that run several engine jobs on one prompt: `n` samples, and label probabilities.

Both go through `GenerationService.stream` once per job (so every limit, lease and metric applies to
each job as to any request) and submit the jobs together, so the batched engine admits them in one
prefill batch.

- `samples(service, request, n)`: n completions of one request; sample i gets seed `seed + i` when the
  request has a seed (else each draws its own). Events arrive tagged with their sample's index.
- `classify(service, adapter, prompt, inputs, labels)`: every label's probability. A label's
  log-probability is the sum of its tokens' log-probabilities right after the prompt (the label
  tokenized on its own, as its text follows the prompt's last token), as the model gives them: no
  repetition penalty, no sampling options, no output constraint. When a label is a prefix of another,
  EOS after it is scored too (a constrained reply can only end there by choosing to); otherwise the
  contract ends the reply after the label and EOS is not counted. The probabilities are these
  normalised over the labels (softmax of the log-probabilities). One scoring job
  (`SamplingParams.forced`) reads every label's first token from the prompt's distribution
  (`SamplingParams.candidates`) and scores the first label of several tokens (or with EOS); each
  other such label is one more job.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, replace

from loraplex.runtime.engines.base import SamplingParams
from loraplex.runtime.errors import ConstraintUnsupported, InvalidRequest
from loraplex.runtime.server.generation import GenerationRequest, GenerationResult, GenerationService
from loraplex.runtime.server.request_state import Finished, Started, TextPiece
from loraplex.runtime.server.validation import text

MAX_LABELS = 64
MAX_LABEL_CHARS = 1024
SEED_RANGE = 2**64

Event = Started | TextPiece | Finished


async def merged(service: GenerationService, requests: Sequence[GenerationRequest], *, lead: bool = False
                 ) -> AsyncIterator[tuple[int, Event]]:
    """Every request's events, tagged with its index, as they come. The first error (or leaving the
    iteration early) cancels the others. `lead`: the others start once the first has output (its
    prompt is prefilled), so an engine with a prefix cache starts them from its blocks."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, request: GenerationRequest) -> None:
        try:
            async for event in service.stream(request):
                queue.put_nowait((i, event))
        except BaseException as exc:
            queue.put_nowait((i, exc))
            raise
        finally:
            queue.put_nowait((i, done))

    waiting = list(enumerate(requests))
    tasks = []

    def start(count: int) -> None:
        for i, request in waiting[:count]:
            tasks.append(asyncio.ensure_future(pump(i, request)))
        del waiting[:count]

    start(1 if lead else len(waiting))
    try:
        left = len(requests)
        while left:
            i, item = await queue.get()
            if waiting and (item is done or isinstance(item, TextPiece | Finished | BaseException)):
                start(len(waiting))  # the first request's prompt is in (or it ended): the others go
            if item is done:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def sample_requests(request: GenerationRequest, n: int) -> list[GenerationRequest]:
    """`n` copies of `request`, sample i with seed `seed + i` (mod 2**64) and request id `<id>-<i>` (sample 0
    keeps the request's)."""
    if n == 1:
        return [request]
    seed = request.params.seed
    return [replace(request, params=replace(request.params, seed=None if seed is None else (seed + i) % SEED_RANGE),
                    request_id=f"{request.request_id}-{i}" if request.request_id and i else request.request_id)
            for i in range(n)]


def samples(service: GenerationService, request: GenerationRequest, n: int) -> AsyncIterator[tuple[int, Event]]:
    """The events of `n` samples of `request`, tagged with the sample's index. With a prefix cache (the
    batched engine's), samples 1.. start once sample 0's prompt is prefilled, from its cached blocks."""
    return merged(service, sample_requests(request, n), lead=has_prefix_cache(service))


def has_prefix_cache(service: GenerationService) -> bool:
    return getattr(service.engine, "prefix_cache", None) is not None


@dataclass(frozen=True)
class LabelScore:
    label: str
    probability: float  # normalised over the labels
    logprob: float  # log P(label | prompt) under the adapter
    tokens: int  # tokens scored


@dataclass(frozen=True)
class Classification:
    labels: list[LabelScore]  # most probable first
    started: Started
    prompt_tokens: int
    scored_tokens: int
    queue_ms: float
    total_ms: float


async def labels_of(service: GenerationService, adapter: str, labels: Sequence[str]) -> list[str]:
    """The labels to score: the request's, else the adapter's choice contract; checked."""
    if not labels:
        output = (await service.registry.ensure(adapter)).output if adapter else None
        if output is None or output.kind != "choice":
            what = f"adapter {adapter!r}" if adapter else "the base model"
            has = "no output contract" if output is None else f"a {output.kind} output contract"
            raise ConstraintUnsupported(f"{what} has {has}, not a choice of labels: send the labels to score")
        labels = list(output.spec)
    if len(labels) > MAX_LABELS:
        raise InvalidRequest(f"labels has {len(labels)} entries; at most {MAX_LABELS}", field="labels")
    if len(set(labels)) != len(labels):
        raise InvalidRequest("labels has duplicates; send each label once", field="labels")
    for i, label in enumerate(labels):
        if not 1 <= len(label) <= MAX_LABEL_CHARS:
            raise InvalidRequest(f"labels[{i}] must be 1..{MAX_LABEL_CHARS} characters", field="labels")
        text(f"labels[{i}]", label)
    return list(labels)


async def classify(service: GenerationService, adapter: str, prompt: str | None, inputs: Mapping[str, str] | None,
                   labels: Sequence[str] = (), request_id: str = "") -> Classification:
    """Every label's probability after the prompt (see the module doc), most probable first.

    One scoring job reads every label's first token from the prompt's one distribution (its
    `candidates`), which scores the labels of one token, and goes on scoring the first longer label
    (one with several tokens, or EOS appended). Each other longer label gets a scoring job of its own,
    submitted with it (genai engine: each prefills the prompt again) or, with a prefix cache (batched
    engine), once the first job's prompt is in, to start from its blocks."""
    received = time.monotonic()
    chosen = await labels_of(service, adapter, labels)
    eos = min(service.engine.eos_ids) if getattr(service.engine, "eos_ids", None) else None
    tokens = await asyncio.to_thread(lambda: [service.tokenizer.encode(label) for label in chosen])
    forced: list[tuple[int, ...]] = []
    for i, (label, ids) in enumerate(zip(chosen, tokens, strict=True)):
        if not ids:
            raise InvalidRequest(f"labels[{i}] has no tokens", field="labels")
        extended = any(other != label and other.startswith(label) for other in chosen)
        forced.append(tuple(ids) + ((eos,) if extended and eos is not None else ()))
    firsts = tuple(dict.fromkeys(f[0] for f in forced))

    def scoring(tokens: tuple[int, ...], suffix: str, candidates: tuple[int, ...] = ()) -> GenerationRequest:
        params = SamplingParams(max_new_tokens=len(tokens), logprobs=0, forced=tokens, candidates=candidates,
                                ignore_eos=True)
        return GenerationRequest(adapter=adapter, prompt=prompt, inputs=inputs, params=params,
                                 request_id=f"{request_id}-{suffix}" if request_id else "", default_output=False)

    sums = [0.0] * len(chosen)
    counts = [0] * len(chosen)
    started: Started | None = None
    queue_ms = 0.0
    first: dict[int, float] = {}
    longer = [i for i, f in enumerate(forced) if len(f) > 1]
    # Job 0 scores the first longer label (or the first label) and reads every first token on its first step.
    jobs = longer or [0]
    requests = [scoring(forced[jobs[0]], str(jobs[0]), firsts), *(scoring(forced[i], str(i)) for i in jobs[1:])]
    # With a prefix cache the other jobs start once job 0's prompt is in (from its blocks).
    async for j, event in merged(service, requests, lead=has_prefix_cache(service)):
        i = jobs[j]
        if isinstance(event, Started):
            started = started if j else event
        elif isinstance(event, TextPiece):
            if j == 0 and event.logprobs and not first:
                first.update(event.logprobs[0].top)
            sums[i] += sum(lp.logprob for lp in event.logprobs)
            counts[i] += len(event.logprobs)
        else:
            queue_ms = max(queue_ms, event.timings.queue_ms)
    if not first:  # no room in the context for even one token
        raise InvalidRequest("the labels do not fit in the context after the prompt; shorten the prompt",
                             field="labels")
    for i, f in enumerate(forced):
        if len(f) == 1:
            sums[i], counts[i] = first[f[0]], 1
    for i, (count, tokens_i) in enumerate(zip(counts, forced, strict=True)):
        if count != len(tokens_i):  # the context was too short for the whole label
            raise InvalidRequest(f"labels[{i}] does not fit in the context after the prompt; shorten the prompt",
                                 field="labels")
    peak = max(sums)
    total = sum(math.exp(s - peak) for s in sums)
    scores = [LabelScore(label, math.exp(s - peak) / total, s, n) for label, s, n in zip(chosen, sums, counts,
                                                                                          strict=True)]
    order = sorted(range(len(scores)), key=lambda i: (-scores[i].probability, i))
    assert started is not None
    return Classification([scores[i] for i in order], started, started.prompt_tokens, sum(counts), queue_ms,
                          (time.monotonic() - received) * 1000)


async def generate_samples(service: GenerationService, request: GenerationRequest, n: int) -> list[GenerationResult]:
    """`n` whole completions of `request` (sample i at index i)."""
    if n == 1:
        return [await service.generate(request)]
    pieces: list[list[str]] = [[] for _ in range(n)]
    results: list[GenerationResult | None] = [None] * n
    ids: list[list[int]] = [[] for _ in range(n)]
    logprobs: list[list] = [[] for _ in range(n)]
    started: list[Started | None] = [None] * n
    async for i, event in samples(service, request, n):
        if isinstance(event, Started):
            started[i] = event
        elif isinstance(event, TextPiece):
            pieces[i].append(event.text)
            ids[i].extend(event.token_ids)
            logprobs[i].extend(event.logprobs)
        else:
            results[i] = GenerationResult("".join(pieces[i]), ids[i], started[i], event, logprobs[i])  # type: ignore[arg-type]
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]
