"""The batched engine's onnxruntime session, and the per-machine cache that makes later starts cheap.

The first start on a machine creates the session from the banked graph with every graph
optimization and has onnxruntime write, beside the graph, the optimized graph and its prepacked
weights (the MatMul / MatMulNBits weights already in the layout this CPU's kernels read) into one
external data file (`session.save_external_prepacked_constant_initializers`). Every later start
loads that file with graph optimizations off: no optimization pass, no prepacking, and the
prepacked weights are memory-mapped from the file (page cache: shared between processes and
dropped under memory pressure, as llama.cpp maps its GGUF) instead of copied into private memory.
Measured on SmolLM2-135M int4, 2 cores: session creation 0.50 -> 0.30 s of CPU, private memory
+123 -> +14 MiB (the weights now count as file-backed pages, and only once). The pages of the
mapped file that loading read but decoding does not (scales the prepacked weights hold a copy of,
the embedding rows no request gathered) are then dropped from the process (`pages`).

The prepacked layout depends on the CPU's instruction set (MLAS picks kernels by CPUID) and on the
onnxruntime version, so the cache is made on the machine that serves and its name carries a key
of both and of the banked graph's identity; export never ships it. It costs disk: about the
original weights plus the prepacked ones. A cache that cannot be written (read-only, disk full)
or read (corrupt) is logged and the session is made the ordinary way.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
from loraplex.runtime.engines.batched.pages import UnreadPages
from loraplex.runtime.engines.heap import on_idle

log = logging.getLogger(__name__)

CACHE_SUFFIX = ".session.onnx"
CACHE_VERSION = 1  # bump when what is cached changes


@dataclass(frozen=True)
class SessionSettings:
    """How the batched engine's session runs (see `runner.ModelRunner`)."""

    intra_op_threads: int = 0
    allow_spinning: bool = True
    memory_arena: bool = True
    cache: bool = True  # the per-machine optimized-session cache (this module)
    spin_us: int | None = None  # with spinning: how long an idle thread spins before it sleeps (None: onnxruntime's)

    def options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.enable_cpu_mem_arena = self.memory_arena
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.allow_spinning else "0")
        if self.allow_spinning and self.spin_us is not None:
            options.add_session_config_entry("session.intra_op.spin_duration_us", str(self.spin_us))
        options.log_severity_level = 3
        return options


def cpu_signature() -> str:
    """What decides which kernels (and so which prepacked layouts) onnxruntime uses on this CPU. (The cache
    key also names the architecture: under user-mode emulation /proc/cpuinfo can be the host's.)"""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()}|{platform.processor()}"


def cache_path(model: Path) -> Path:
    """Where the cached session of `model` goes (beside it), its name keyed to this machine and model."""
    st = model.stat()
    key = f"{CACHE_VERSION}|{ort.__version__}|{platform.machine()}|{cpu_signature()}|{st.st_size}|{st.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return model.with_name(f"{model.name.removesuffix('.onnx')}.{digest}{CACHE_SUFFIX}")


def create_session(model: Path, settings: SessionSettings, cache_dir: Path | None = None) -> ort.InferenceSession:
    """An InferenceSession of `model` on the CPU; from (or writing) the per-machine cache when enabled.

    `cache_dir`: where the cache lives (default: beside `model`)."""
    providers = ["CPUExecutionProvider"]
    if not settings.cache:
        return ort.InferenceSession(str(model), settings.options(), providers=providers)
    cached = cache_path(model)
    if cache_dir is not None:
        cached = Path(cache_dir) / cached.name
    if cached.is_file():
        options = settings.options()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            session = ort.InferenceSession(str(cached), options, providers=providers)
        except Exception as exc:  # onnxruntime raises bare errors for a truncated or foreign file
            log.warning("ignoring the session cache %s (%s); making it again", cached, exc)
        else:
            _drop_unread_pages(session, cached)
            return session
    return _create_and_cache(model, settings, cached)


def _drop_unread_pages(session: ort.InferenceSession, cached: Path) -> None:
    """The cached data's pages decoding does not read, out of the process's RSS whenever the engine is
    idle (`pages`, `heap.on_idle`: the first time half a second after the warm-up, not on the way to
    the first token)."""
    on_idle(session, UnreadPages(cached).drop)


def _create_and_cache(model: Path, settings: SessionSettings, cached: Path) -> ort.InferenceSession:
    """The ordinary session, which also writes the cache: into a scratch directory first, then renamed
    into place (data file first, graph last: a graph that exists is complete)."""
    data_name = cached.name + ".data"
    try:
        scratch = Path(tempfile.mkdtemp(prefix=".session-cache-", dir=cached.parent))
    except OSError as exc:
        log.info("no session cache for %s (%s): starting without one", model, exc)
        return ort.InferenceSession(str(model), settings.options(), providers=["CPUExecutionProvider"])
    options = settings.options()
    options.optimized_model_filepath = str(scratch / cached.name)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", data_name)
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
    try:
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # saving failed (onnxruntime's own error types), or the model is broken
        shutil.rmtree(scratch, ignore_errors=True)
        log.warning("could not write the session cache %s (%s)", cached, exc)
        return ort.InferenceSession(str(model), settings.options(), providers=["CPUExecutionProvider"])
    try:
        _remove_stale(cached)
        os.replace(scratch / data_name, cached.with_name(data_name))
        os.replace(scratch / cached.name, cached)
        log.info("wrote the session cache %s", cached)
    except OSError as exc:
        log.warning("could not write the session cache %s (%s)", cached, exc)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return session


def _remove_stale(cached: Path) -> None:
    """Delete the caches of the same graph under other keys (an older graph, onnxruntime or CPU): each
    costs about the weights' size on disk. A process still using one keeps its mapping until it exits."""
    prefix = cached.name.removesuffix(CACHE_SUFFIX).rsplit(".", 1)[0]  # the graph's name, without the key
    for old in cached.parent.glob(f"{prefix}.{'?' * 16}{CACHE_SUFFIX}"):
        if old.name != cached.name:
            for path in (old, old.with_name(old.name + ".data")):
                path.unlink(missing_ok=True)
