"""The in-process API: a package served inside the caller's process, without a port.

    from loraplex.runtime.api import LLM

    with LLM("package/") as llm:
        print(llm.generate("Review: great film\\nSentiment:", adapter="sentiment").text)
        replies = llm.generate(inputs=[{"text": "dull"}, {"text": "fine"}], adapter="sentiment")
        scores = llm.classify(inputs={"text": "dull"}, adapter="sentiment")  # each label's probability

`LLM` is the server's own request path (`server.app.build_core`: engine, adapter registry,
`GenerationService`) on a private event loop thread, so a call is validated and decoded exactly as
a gRPC request is, and gives the same tokens. Several prompts in one call are submitted together:
the batched engine decodes them in one batch. Sync methods block the caller; the `a*` methods are
coroutines for the caller's own event loop. Export's accuracy check, the bench and the tests use it.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from loraplex.adapters.package.output import OutputConstraint
from loraplex.adapters.package.reader import Package
from loraplex.runtime.engines.base import FinishReason, TokenLogprobs
from loraplex.runtime.server import fanout
from loraplex.runtime.server.app import ServerConfig, ServingCore, build_core
from loraplex.runtime.server.generation import GenerationRequest, GenerationResult
from loraplex.runtime.server.metrics import ServerMetrics
from loraplex.runtime.server.request_state import Finished, TextPiece
from loraplex.runtime.server.tokenizer import TextTokenizer
from loraplex.runtime.server.validation import mix as checked_mix
from loraplex.runtime.server.validation import output_constraint, samples, sampling_params, text
from loraplex.runtime.server.validation import request_id as checked_request_id

T = TypeVar("T")

# Sampling options as this API names them (the messages of a refused value name these).
FIELDS = {name: name for name in ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "stop",
                                  "logprobs")}
CONSTRAINT_KINDS = ("regex", "json_schema", "grammar", "choice")


@dataclass(frozen=True)
class Completion:
    """One whole reply: what `Generate` answers over gRPC."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    adapter: str
    adapter_version: str
    request_id: str
    time_to_first_token_ms: float
    total_ms: float
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per token id, with `logprobs=k`

    @classmethod
    def of(cls, result: GenerationResult) -> Completion:
        s, f = result.started, result.finished
        return cls(result.text, result.token_ids, f.reason, f.prompt_tokens, s.adapter, s.adapter_version,
                   s.request_id, f.timings.time_to_first_token_ms, f.timings.total_ms, result.logprobs)


@dataclass(frozen=True)
class Chunk:
    """One piece of a streamed reply; the last one has `finish_reason` (and no text after it)."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprobs, ...] = ()  # one per token id, with `logprobs=k`


class LLM:
    """A package served in this process. `options` are `ServerConfig`'s (max_batch, max_queue,
    max_slots, intra_op_threads, profile...); ports and TLS do not apply. `package` may be a
    `Package` opened with a manifest not yet on disk (export verifies a package before writing it).
    With `load_adapters` the package's adapters are loaded (as `loraplex serve` does)."""

    def __init__(self, package: str | Path | Package, *, engine: str = "auto", device: str = "cpu",
                 provider: str | None = None, load_adapters: bool = True, warmup: bool = False, **options: Any):
        self.package = package if isinstance(package, Package) else Package.open(Path(package))
        self.config = ServerConfig(package=self.package.root, engine=engine, device=device, provider=provider,
                                   load_package_adapters=load_adapters, warmup=warmup, port=0, **options)
        self.metrics = ServerMetrics()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="loraplex-api", daemon=True)
        self._thread.start()
        try:
            self._core: ServingCore = self._call(build_core(self.config, self.package, self.metrics))
        except BaseException:
            self._stop_loop()
            raise
        # Prompts one call submits at once: more would find the queue full (RESOURCE_EXHAUSTED).
        self._room = asyncio.Semaphore(self.config.max_batch + self.config.max_queue)

    # -- generation -----------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[str] | None = None, *,
                 inputs: Mapping[str, str] | Sequence[Mapping[str, str]] | None = None,
                 adapter: str = "", **sampling: Any) -> Completion | list[Completion]:
        """One completion per prompt (or per task `inputs`): a list when given a list. `sampling`:
        max_new_tokens, temperature, top_p, top_k, seed, repetition_penalty, stop, ignore_eos, one of
        regex / json_schema / grammar / choice, no_default_output, logprobs (each token's log-probability
        and that many alternatives), request_id (0 = the default, as over gRPC). Refusals raise the
        server's errors (`loraplex.runtime.errors`)."""
        return self._call(self.agenerate(prompt, inputs=inputs, adapter=adapter, **sampling))

    async def agenerate(self, prompt: str | Sequence[str] | None = None, *,
                        inputs: Mapping[str, str] | Sequence[Mapping[str, str]] | None = None,
                        adapter: str = "", **sampling: Any) -> Completion | list[Completion]:
        requests, many = self._requests(prompt, inputs, adapter, sampling)
        results = await self._on_loop(self._generate_all(requests))
        return results if many else results[0]

    def samples(self, prompt: str | None = None, *, n: int, inputs: Mapping[str, str] | None = None,
                adapter: str = "", **sampling: Any) -> list[Completion]:
        """`n` samples of one prompt (sample i with seed `seed + i` when `seed` is given), decoded together."""
        request = self.request(prompt, inputs=inputs, adapter=adapter, **sampling)
        count = samples(n)
        return [Completion.of(r) for r in self._call(self._on_loop(self._samples(request, count)))]

    async def _samples(self, request: GenerationRequest, n: int) -> list[GenerationResult]:
        async with self._room:
            return await fanout.generate_samples(self._core.service, request, n)

    def classify(self, prompt: str | None = None, *, inputs: Mapping[str, str] | None = None, adapter: str = "",
                 labels: Sequence[str] = (), request_id: str = "") -> list[fanout.LabelScore]:
        """Every label's probability after the prompt, most probable first: the adapter's choice contract's
        labels, or `labels`. A label's probability is its token sequence's under the adapter, normalised over
        the labels (see `loraplex.runtime.server.fanout`)."""
        return self._call(self.aclassify(prompt, inputs=inputs, adapter=adapter, labels=labels,
                                         request_id=request_id))

    async def aclassify(self, prompt: str | None = None, *, inputs: Mapping[str, str] | None = None,
                        adapter: str = "", labels: Sequence[str] = (), request_id: str = ""
                        ) -> list[fanout.LabelScore]:
        """`classify` for the caller's event loop."""
        service = self._core.service
        coro = fanout.classify(service, text("adapter", adapter), prompt, dict(inputs) if inputs is not None else None,
                               list(labels), checked_request_id(request_id))
        return (await self._on_loop(coro)).labels

    def stream(self, prompt: str | None = None, *, inputs: Mapping[str, str] | None = None, adapter: str = "",
               **sampling: Any) -> Iterator[Chunk]:
        """Text pieces as they are decoded, then a `Chunk` with the finish reason. Leaving the loop
        early cancels the request (its engine job stops, as a cancelled gRPC call's does)."""
        items: queue.SimpleQueue = queue.SimpleQueue()
        task = self._produce(self.request(prompt, inputs=inputs, adapter=adapter, **sampling), items.put)
        try:
            while (item := items.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            task.cancel()

    async def astream(self, prompt: str | None = None, *, inputs: Mapping[str, str] | None = None,
                      adapter: str = "", **sampling: Any) -> AsyncIterator[Chunk]:
        """`stream` for the caller's event loop."""
        caller = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        request = self.request(prompt, inputs=inputs, adapter=adapter, **sampling)
        task = self._produce(request, lambda item: caller.call_soon_threadsafe(items.put_nowait, item))
        try:
            while (item := await items.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            task.cancel()

    def request(self, prompt: str | None = None, *, inputs: Mapping[str, str] | None = None, adapter: str = "",
                max_new_tokens: int = 0, temperature: float = 0.0, top_p: float = 0.0, top_k: int = 0,
                seed: int | None = None, repetition_penalty: float = 0.0, stop: Sequence[str] = (),
                ignore_eos: bool = False, logprobs: int | None = None, regex: str | None = None,
                json_schema: str | None = None,
                grammar: str | None = None, choice: Sequence[str] | None = None, output: OutputConstraint | None = None,
                no_default_output: bool = False, request_id: str = "",
                mix: Sequence[tuple[str, float]] = ()) -> GenerationRequest:
        """A checked `GenerationRequest`, by the same rules as a gRPC request's (the service then checks
        the prompt's size and the context, as for every front end)."""
        params = sampling_params(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                 seed=seed, repetition_penalty=repetition_penalty, stop=list(stop),
                                 ignore_eos=ignore_eos, logprobs=logprobs,
                                 context_length=self.package.config.context_length, fields=FIELDS)
        given = {k: v for k, v in zip(CONSTRAINT_KINDS, (regex, json_schema, grammar, choice), strict=True)
                 if v is not None}
        if len(given) + (output is not None) > 1:
            raise ValueError(f"give at most one output constraint, not {sorted(given) + ['output'] * bool(output)}")
        if given:
            (kind, spec), = given.items()
            output = output_constraint(kind, spec, kind)
        if output is not None:
            params = replace(params, constraint=output)
        return GenerationRequest(adapter=text("adapter", adapter), prompt=prompt,
                                 inputs=dict(inputs) if inputs is not None else None, params=params,
                                 request_id=checked_request_id(request_id), default_output=not no_default_output,
                                 mix=checked_mix(list(mix), adapter))

    def tokenize(self, prompt: str | None = None, *, inputs: Mapping[str, str] | None = None,
                 adapter: str = "") -> list[int]:
        """The prompt's token ids as the server would decode from them (`inputs` rendered first)."""
        return self._call(self._on_loop(self._core.service.tokenize(adapter, prompt, inputs)))[1]

    @property
    def tokenizer(self) -> TextTokenizer:
        """The server's tokenizer of this package (`encode`, `decode`)."""
        return self._core.service.tokenizer

    # -- adapters ---------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str | Path, version: str | None = None) -> str:
        """Load (or replace) adapter `name` from a file this process trusts; returns its version."""
        registry = self._core.registry
        registry.files.check_name(name)
        loaded = self._call(self._on_loop(registry.load_file(name, Path(path).resolve(), version)))
        return loaded.version

    def unload_adapter(self, name: str) -> None:
        """Remove `name`; returns once its requests have finished and the engine freed it."""
        self._call(self._on_loop(self._core.registry.unload(name)))

    def adapters(self) -> list[str]:
        return self._core.registry.names()

    # -- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        if not self._thread.is_alive():
            return
        core = self._core

        async def stop() -> None:
            core.service.draining = True
            await core.service.wait_idle(30.0)
            await core.registry.close()
            await asyncio.to_thread(core.engine.close)

        try:
            self._call(stop())
        finally:
            self._stop_loop()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------
    def _requests(self, prompt, inputs, adapter: str, sampling: dict) -> tuple[list[GenerationRequest], bool]:
        if (prompt is None) == (inputs is None):
            raise ValueError("give either prompt(s) or inputs, not both and not neither")
        if inputs is not None:
            many = not isinstance(inputs, Mapping)
            batch = list(inputs) if many else [inputs]
            return [self.request(inputs=i, adapter=adapter, **sampling) for i in batch], many
        many = not isinstance(prompt, str)
        batch = list(prompt) if many else [prompt]
        return [self.request(p, adapter=adapter, **sampling) for p in batch], many

    async def _generate_all(self, requests: list[GenerationRequest]) -> list[Completion]:
        async def one(request: GenerationRequest) -> Completion:
            async with self._room:
                return Completion.of(await self._core.service.generate(request))

        return list(await asyncio.gather(*(one(r) for r in requests)))

    def _produce(self, request: GenerationRequest, put: Callable[[object], None]) -> Future:
        """Stream `request` on this API's loop, handing each `Chunk`, then an error or `_END`, to `put`."""

        async def produce() -> None:
            try:
                async with self._room:
                    async for event in self._core.service.stream(request):
                        if isinstance(event, TextPiece):
                            put(Chunk(event.text, tuple(event.token_ids), logprobs=tuple(event.logprobs)))
                        elif isinstance(event, Finished):
                            put(Chunk(finish_reason=event.reason))
            except Exception as exc:
                put(exc)
            put(_END)

        return asyncio.run_coroutine_threadsafe(produce(), self._loop)

    async def _on_loop(self, coro: Awaitable[T]) -> T:
        """Await `coro` on this API's loop from any loop (the caller's, or this one)."""
        if asyncio.get_running_loop() is self._loop:
            return await coro
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(_awaited(coro), self._loop))

    def _call(self, coro: Awaitable[T]) -> T:
        """Run `coro` on this API's loop and wait for it (from a thread that is not that loop's)."""
        return asyncio.run_coroutine_threadsafe(_awaited(coro), self._loop).result()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


_END = object()  # the end of a stream


async def _awaited(awaitable: Awaitable[T]) -> T:
    return await awaitable


# -- what the other stages ask of the runtime (export prepares and checks a package with these) --

def check_output_contract(constraint: OutputConstraint) -> OutputConstraint:
    """`constraint` compiled as the server compiles a request's (llguidance); raises InvalidRequest
    naming the fault."""
    from loraplex.runtime.engines.guidance import check_constraint

    return check_constraint(constraint, "output")


def write_batched_graph(model_path: Path) -> Path:
    """The batched engine's rewrite of a package graph, cached beside it (what a server makes at its
    first start otherwise); raises ValueError when the graph cannot be banked (the genai engine still
    serves the package)."""
    from loraplex.runtime.engines.batched.graph import ensure_batched_model

    return ensure_batched_model(model_path)


def server_tokenizers(package_dir: Path) -> tuple[TextTokenizer, TextTokenizer]:
    """The package's tokenizer as the server can open it: (the `tokenizers` library's, onnxruntime-genai's)."""
    from loraplex.runtime.server.tokenizer import FastTokenizer, PackageTokenizer

    return FastTokenizer(package_dir), PackageTokenizer(package_dir)


__all__ = ["LLM", "Chunk", "Completion", "FinishReason", "OutputConstraint", "check_output_contract",
           "server_tokenizers", "write_batched_graph"]
