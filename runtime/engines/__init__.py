"""Engines: decode token ids for jobs, each pinned to one adapter version (see `base`).

`build_engine` makes the engine a server configuration names; `resolve_engine` turns `auto` into
one: `batched` on the CPU (mixed-adapter continuous batching; its KV rows are host memory),
`genai` on every other device.
"""

from __future__ import annotations

import logging
from typing import Literal

from loraplex.adapters.package.reader import Package
from loraplex.runtime.engines.base import Engine

EngineName = Literal["genai", "batched"]
ENGINES: tuple[EngineName, ...] = ("genai", "batched")

log = logging.getLogger(__name__)


def resolve_engine(engine: str, device: str) -> EngineName:
    """`auto` -> batched on cpu, genai elsewhere; a named engine is checked."""
    if engine == "auto":
        return "batched" if device == "cpu" else "genai"
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} is unknown; choose auto, {', '.join(ENGINES)}")
    return engine  # type: ignore[return-value]


def build_engine(package: Package, engine: EngineName, *, device: str, provider: str | None, max_batch: int,
                 max_slots: int | None = None, intra_op_threads: int = 0, allow_spinning: bool = True,
                 memory_arena: bool = True, session_cache: bool = True,
                 prefix_cache_bytes: int | None = None,
                 adapter_cache_bytes: int | None = None, speculation: str = "auto",
                 spin_us: int | None = None) -> Engine:
    """The named engine on `package` (blocking: loads the model). The thread and arena options are the
    batched engine's (onnxruntime-genai takes its session options from the package's genai_config.json);
    `adapter_cache_bytes` bounds both engines' host copies of adapters (None: `adapter_cache.default_budget`);
    `speculation` is the batched engine's (onnxruntime-genai runs one token per step: drafts cannot be verified)."""
    if engine == "genai":
        from loraplex.runtime.engines.genai import GenaiEngine

        if prefix_cache_bytes:
            log.info("the genai engine keeps no KV across requests (onnxruntime-genai has no prefix cache): "
                     "the prefix cache setting is ignored; --engine batched has one")
        if speculation not in ("auto", "off"):  # lookup, contract, on: asked for explicitly
            log.info("the genai engine cannot verify drafted tokens (onnxruntime-genai decodes one token per "
                     "step): --speculation %s is ignored; --engine batched has speculative decoding", speculation)

        return GenaiEngine(package, device=device, provider=provider, max_batch=max_batch,
                           adapter_cache_bytes=adapter_cache_bytes)
    from loraplex.runtime.engines.batched import BatchedEngine

    prefix = {} if prefix_cache_bytes is None else {"prefix_cache_bytes": prefix_cache_bytes}  # None: its default

    return BatchedEngine(package, device=device, provider=provider, max_batch=max_batch, max_slots=max_slots,
                         intra_op_threads=intra_op_threads, allow_spinning=allow_spinning, memory_arena=memory_arena,
                         session_cache=session_cache, **prefix, adapter_cache_bytes=adapter_cache_bytes,
                         speculation=speculation, spin_us=spin_us)
