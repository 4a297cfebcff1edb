"""The model's load: the engine and the tokenizer built in threads of their own.

`loraplex serve` starts one (`start_loading`) before it imports the gRPC server stack: this module
and `config` import no grpc, servicers or Prometheus, so onnxruntime makes the session (it releases
the GIL while it does) while the server stack imports and the port opens. `start_server` and
`build_core` take a load, or start their own.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_all
from typing import TypeVar

from loraplex.adapters.package.reader import Package
from loraplex.runtime.engines import build_engine
from loraplex.runtime.engines.base import Engine
from loraplex.runtime.engines.heap import limit_heap_arenas
from loraplex.runtime.server.config import ServerConfig
from loraplex.runtime.server.tokenizer import FastTokenizer, PackageTokenizer, open_tokenizer

Tokenizer = FastTokenizer | PackageTokenizer
log = logging.getLogger(__name__)
T = TypeVar("T")

# What each engine's and tokenizer's load imports, imported by the caller before the threads start:
# imports hold the GIL, so made in a thread they would only contend with the caller's own imports,
# and the session would start later.
ENGINE_MODULES = {"batched": "loraplex.runtime.engines.batched", "genai": "loraplex.runtime.engines.genai"}
TOKENIZER_MODULES = {"genai": "onnxruntime_genai"}
DEFAULT_TOKENIZER_MODULE = "tokenizers"


def _in_thread(name: str, fn: Callable[..., T], *args, **kwargs) -> Future[T]:
    """`fn(*args, **kwargs)` in a new daemon thread; its outcome in the returned future."""
    future: Future[T] = Future()

    def run() -> None:
        future.set_running_or_notify_cancel()
        start = time.perf_counter()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 (handed to whoever takes the result)
            future.set_exception(exc)
        log.debug("%s ended after %.3f s", name, time.perf_counter() - start)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def _close_built(future: Future[Engine]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().close()


class ModelLoad:
    """`package`'s engine, loading in a thread from construction; its tokenizer, read in another once
    `result` is awaited.

    The tokenizer holds the GIL while it reads (about 0.1 s): started with the engine, it would only
    contend with the caller's imports, so it starts when the caller is done with them (`result`),
    still beside the session, which onnxruntime makes mostly without the GIL. Whoever takes the
    result owns the engine; a load given up before that (`close`, `aclose`, `discard`) closes the
    engine once it is built.
    """

    def __init__(self, config: ServerConfig, package: Package) -> None:
        self.package = package
        importlib.import_module(ENGINE_MODULES[config.engine])
        self.engine: Future[Engine] = _in_thread("loraplex-load-engine", build_engine, package, config.engine,
                                                 **config.engine_options())
        self.tokenizer: Future[Tokenizer] | None = None
        self.taken = False

    def _start_tokenizer(self) -> Future[Tokenizer]:
        if self.tokenizer is None:
            importlib.import_module(TOKENIZER_MODULES.get(self.package.manifest.tokenizer or "",
                                                          DEFAULT_TOKENIZER_MODULE))
            self.tokenizer = _in_thread("loraplex-load-tokenizer", open_tokenizer, self.package.root,
                                        self.package.manifest.tokenizer)
        return self.tokenizer

    async def result(self) -> tuple[Engine, Tokenizer]:
        """The engine and the tokenizer once both are loaded (the caller owns the engine from then on).
        A failure of either is raised once both have ended, the engine (if built) closed; cancelled
        while waiting, the engine is closed when built."""
        if self.taken:
            raise RuntimeError("this model load was already taken")
        self.taken = True
        try:
            tokenizer = self._start_tokenizer()
            await asyncio.wait([asyncio.wrap_future(self.engine), asyncio.wrap_future(tokenizer)])
        except BaseException:  # cancelled, or the tokenizer's library cannot be imported
            self.discard()
            raise
        error = self.engine.exception() or tokenizer.exception()
        if error is not None:
            if self.engine.exception() is None:
                await asyncio.to_thread(self.engine.result().close)
            raise error
        return self.engine.result(), tokenizer.result()

    def discard(self) -> None:
        """Close the engine once it is built, without waiting for it."""
        self.engine.add_done_callback(_close_built)

    def close(self) -> None:
        """Wait for the load and close its engine, unless `result` handed it over."""
        if not self.taken:
            self.taken = True
            wait_all([self.engine] if self.tokenizer is None else [self.engine, self.tokenizer])
            _close_built(self.engine)

    async def aclose(self) -> None:
        """`close` without blocking the event loop."""
        await asyncio.to_thread(self.close)


def start_loading(config: ServerConfig) -> ModelLoad:
    """Open `config.package` (its errors raised here) and start loading its engine; with
    `config.malloc_arenas`, the heap's arenas are limited first (before the engine's threads start)."""
    if config.malloc_arenas:
        limit_heap_arenas(config.malloc_arenas)
    return ModelLoad(config, Package.open(config.package))
