"""Where a loraplex server's resident memory goes, step by step, in a fresh process.

`python -m bench.edge.memory_breakdown PACKAGE [--engine batched|genai] [--profile default|edge] [--adapters N]`
does what `loraplex serve` does at start, in the same order and with the same library calls
(`start_server` minus the gRPC port), and reads the process's RSS after each step (split into
anonymous memory and file-backed pages, from /proc/self/status), with the seconds the step took:

    python          the interpreter alone
    imports         the server stack (grpc, protobuf, numpy, onnxruntime, prometheus, loraplex)
    package         Package.open (manifest, genai_config, the graph's LoRA inputs)
    engine          the engine: onnxruntime session (weights, prepacked weights), banks, KV cache
    tokenizer       the package tokenizer
    adapters        N adapter files read, checked and handed to the engine
    requests        one 1-token request on the base and on each adapter (banks filled, arena grown)
    idle            1.5 s later, the server idle (the batched engine has handed its free heap back, and
                    the engine has dropped the code pages only start-up ran: `process_pages`)
    again           the same requests again and 1.5 s idle (the code serving runs is back)

It prints one JSON line. The bench runs it for the memory breakdown table; the last reading
matches a `loraplex serve` of the same package after the same requests within a few MiB (gRPC's
threads and buffers are the difference).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path


def _status() -> dict[str, int]:
    """VmRSS, RssAnon, RssFile (bytes) of this process."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _mapped() -> dict[str, int]:
    """Resident bytes by what is mapped (/proc/self/smaps): model files, shared libraries, the rest."""
    out = {"model_files": 0, "libraries": 0, "other_files": 0, "anonymous": 0}
    path = ""
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if not head:
                continue
            if "-" in head[0] and len(head) >= 5:  # a mapping's first line: range perms offset dev inode [path]
                path = head[5] if len(head) > 5 else ""
            elif head[0] == "Rss:":
                size = int(head[1]) * 1024
                if path.endswith((".onnx", ".data", ".onnx_adapter")):
                    out["model_files"] += size
                elif ".so" in path:
                    out["libraries"] += size
                elif path.startswith("/"):
                    out["other_files"] += size
                else:
                    out["anonymous"] += size
    return out


class Steps:
    def __init__(self) -> None:
        self.rows: list[dict] = []
        self._t, self._cpu = time.perf_counter(), time.process_time()
        self.mark("python")

    def mark(self, step: str, **extra) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        self.rows.append({"step": step, "seconds": now - self._t, "cpu_s": cpu - self._cpu, **_status(), **extra})
        self._t, self._cpu = now, cpu


async def run(package_dir: Path, engine_name: str, profile: str, n_adapters: int | None, steps: Steps) -> None:
    from loraplex.adapters.package.reader import Package
    from loraplex.runtime.engines import build_engine
    from loraplex.runtime.engines.base import SamplingParams
    from loraplex.runtime.server.app import ServerConfig
    from loraplex.runtime.server.generation import GenerationRequest, GenerationService
    from loraplex.runtime.server.metrics import ServerMetrics
    from loraplex.runtime.server.registry import AdapterRegistry
    from loraplex.runtime.server.tokenizer import open_tokenizer

    steps.mark("imports")
    config = ServerConfig(package=package_dir, port=0, engine=engine_name, profile=profile)
    if config.malloc_arenas:  # as start_server does
        from loraplex.runtime.engines.heap import limit_heap_arenas

        limit_heap_arenas(config.malloc_arenas)
    package = Package.open(config.package)
    steps.mark("package")
    engine = build_engine(package, config.engine, **config.engine_options())
    steps.mark("engine")
    tokenizer = open_tokenizer(package.root, package.manifest.tokenizer)
    steps.mark("tokenizer")
    registry = AdapterRegistry(engine, package, package.adapter_dir)
    names = sorted(package.manifest.adapters)[:n_adapters]
    for name in names:
        await registry.load_file(name, package.adapter_path(name), package.manifest.adapters[name].version)
    steps.mark("adapters", adapters=len(names))
    service = GenerationService(engine, registry, tokenizer, package.config.context_length, ServerMetrics(),
                                max_batch=config.max_batch, max_queue=config.max_queue, max_prompt_bytes=1 << 16)
    params = SamplingParams(max_new_tokens=1)

    async def serve_each() -> None:
        for name in ["", *names]:
            await service.generate(GenerationRequest(adapter=name, prompt="warm up", params=params,
                                                     request_id="probe"))

    await serve_each()
    steps.mark("requests")
    await asyncio.sleep(1.5)  # the batched engine hands its free heap back once idle (runtime.engines.heap)

    def at_rest() -> dict:
        extra = {"mapped": _mapped()}
        runner = getattr(engine, "runner", None)
        if runner is not None:
            extra |= {"bank_bytes": runner.bank.nbytes, "bank_slots": runner.bank.capacity - 1,
                      "kv_bytes": sum(a.nbytes for a in runner.kv.keys + runner.kv.values)}
        return extra

    steps.mark("idle", **at_rest())
    await serve_each()
    await asyncio.sleep(1.5)
    steps.mark("again", **at_rest())
    await registry.close()
    engine.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.edge.memory_breakdown", description=__doc__.splitlines()[0])
    parser.add_argument("package", type=Path)
    parser.add_argument("--engine", default="batched", choices=("batched", "genai"))
    parser.add_argument("--profile", default="default")
    parser.add_argument("--adapters", type=int, default=None, help="how many of the package's adapters (default: all)")
    args = parser.parse_args(argv)
    steps = Steps()
    asyncio.run(run(args.package, args.engine, args.profile, args.adapters, steps))
    print(json.dumps({"engine": args.engine, "profile": args.profile, "steps": steps.rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
