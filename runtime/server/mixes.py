"""Adapter mixes: several adapters with weights, served as one derived adapter.

A mix's LoRA term sum_i w_i (x A_i) B_i is exactly the term of one adapter of rank sum(r_i):
A = the A_i concatenated along the rank axis, B = the w_i B_i concatenated likewise (a file's B is
pre-scaled by alpha/r, so w_i scales each adapter's whole term, as PEFT's `add_weighted_adapter`
with combination_type "cat" does). A module that only some of the adapters adapt takes only their
columns. Weights are float32 (the gRPC field's type) wherever they are used.

The derived adapter is written as an `.onnx_adapter` file into a scratch directory (the engines'
host caches read adapters again from their files, and onnxruntime-genai loads files) and loaded
into the engine as an ordinary adapter version named `mix:<hash16>`: the batched engine gives it a
bank slot like any adapter, so rows with different mixes run in one step. It is not in the
registry's names (not listed, not loadable by name).

A mix's identity is the sha256 of its sorted (source sha256, weight) pairs: replacing a source
(new bytes) makes a new mix. At most `max_mixes` are loaded; beyond that the least recently used
mix no request holds is unloaded (a mix in use never is, so the bound may be passed while all are).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from loraplex.adapters.package.adapter_file import ADAPTER_SUFFIX, AdapterWeights, write_adapter_file
from loraplex.adapters.package.lora_inputs import lora_input_name
from loraplex.adapters.package.manifest import file_sha256
from loraplex.runtime.server.registry import AdapterRegistry, AdapterVersion, Lease, adapter_cache

log = logging.getLogger(__name__)

DEFAULT_MAX_MIXES = 16
MIX_PREFIX = "mix:"

Mix = tuple[tuple[str, float], ...]  # (adapter name, weight), as validated


def combine(sources: Sequence[tuple[AdapterWeights, float]]) -> dict[str, np.ndarray]:
    """The tensors of the adapter whose LoRA term is sum_i weight_i * (source_i's term), exactly."""
    modules = sorted({module for weights, _ in sources for module in weights.ranks})
    out: dict[str, np.ndarray] = {}
    for module in modules:
        a, b = lora_input_name(module, "A"), lora_input_name(module, "B")
        parts = [(w.tensors[a], w.tensors[b], weight) for w, weight in sources if module in w.ranks]
        out[a] = np.concatenate([pa for pa, _, _ in parts], axis=1)
        out[b] = np.concatenate([(pb.astype(np.float32) * np.float32(weight)).astype(pb.dtype)
                                 for _, pb, weight in parts], axis=0)
    return out


def mix_key(pairs: Sequence[tuple[str, float]]) -> str:
    """The content hash of a mix: sha256 over its sorted (source sha256, float32 weight) pairs."""
    digest = hashlib.sha256()
    for sha, weight in sorted((sha, float(np.float32(w))) for sha, w in pairs):
        digest.update(f"{sha}:{weight!r};".encode())
    return digest.hexdigest()


class Mixes:
    """The mixes loaded into one engine, by content hash; `lease` builds one on first use."""

    def __init__(self, registry: AdapterRegistry, max_mixes: int = DEFAULT_MAX_MIXES):
        if max_mixes < 1:
            raise ValueError("max_mixes must be >= 1")
        self.registry = registry
        self.max_mixes = max_mixes
        self.dir = Path(tempfile.mkdtemp(prefix="loraplex-mixes-"))
        weakref.finalize(self, shutil.rmtree, self.dir, True)
        self._live: OrderedDict[str, AdapterVersion] = OrderedDict()  # least recently used first
        self._building: dict[str, asyncio.Task] = {}
        self.built = 0

    def names(self) -> list[str]:
        return [v.name for v in self._live.values()]

    async def lease(self, mix: Mix) -> Lease:
        """A lease on the mix's derived adapter (NOT_FOUND for an adapter neither loaded nor in a store)."""
        sources = [await self.registry.ensure(name) for name, _ in mix]
        key = mix_key([(v.sha256, w) for v, (_, w) in zip(sources, mix, strict=True)])
        version = self._live.get(key)
        if version is None:
            task = self._building.get(key)
            if task is None:
                task = asyncio.get_running_loop().create_task(self._build(key, sources, [w for _, w in mix]))
                self._building[key] = task
                task.add_done_callback(lambda t, k=key: self._built(k, t))
            version = await asyncio.shield(task)
            self._live.setdefault(key, version)
        self._live.move_to_end(key)
        version.leases += 1
        version.served += 1
        self._evict()
        return Lease(self.registry, version)

    def _built(self, key: str, task: asyncio.Task) -> None:
        self._building.pop(key, None)
        if not task.cancelled() and task.exception() is None:
            self._live[key] = task.result()

    async def _build(self, key: str, sources: list[AdapterVersion], weights: list[float]) -> AdapterVersion:
        name = MIX_PREFIX + key[:16]
        engine = self.registry.engine
        with engine.quiet():  # reading the sources and writing the mix need the GIL (see Engine.quiet)
            checked, derived = await asyncio.to_thread(self._write, name, key, sources, weights)
            handle = await asyncio.to_thread(engine.load_adapter, name, checked.version, derived)
        if (cache := adapter_cache(engine)) is not None:
            cache.record_sha256(handle, checked.sha256, checked.fingerprint)
        template = sources[0].template if all(v.template == sources[0].template for v in sources) else None
        version = AdapterVersion.of(replace(checked, template=template, output=None), handle)
        self.built += 1
        log.info("mix %s built from %s", name, ", ".join(f"{v.name}@{v.version}*{w:g}"
                                                        for v, w in zip(sources, weights, strict=True)))
        return version

    def _write(self, name: str, key: str, sources: list[AdapterVersion], weights: list[float]):
        """(Worker thread) read the sources' files (their recorded sha256 checked), write the derived one."""
        files = self.registry.files
        read = [files.read(v.name, v.handle.path, v.version, recorded=v.sha256)[1] for v in sources]
        file = write_adapter_file(combine(list(zip(read, weights, strict=True))), self.dir / f"{name[len(MIX_PREFIX):]}"
                                  f"{ADAPTER_SUFFIX}")
        return files.read(name, file, key[:12], recorded=file_sha256(file))

    def _evict(self) -> None:
        """Unload least recently used mixes without requests while more than `max_mixes` are loaded."""
        idle = [k for k, v in self._live.items() if v.leases == 0]
        for key in idle[: max(0, len(self._live) - self.max_mixes)]:
            version = self._live.pop(key)
            version.retired = True
            self.registry.schedule_unload(version)
            asyncio.get_running_loop().create_task(self._remove_file(version))

    async def _remove_file(self, version: AdapterVersion) -> None:
        await version.unloaded.wait()
        if version.handle is not None:
            version.handle.path.unlink(missing_ok=True)
