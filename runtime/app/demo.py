"""`loraplex demo` (`make demo`): the whole pipeline on the three demo tasks, end to end.

tiny base -> train sentiment / reverse / translate adapters -> export one package -> serve it over
gRPC -> one client per task sends that task's eval examples, concurrently -> retrain one adapter
(another seed) and hot-swap it into the running server while every task's client keeps sending
-> a table of what came back -> clean shutdown. Exits non-zero if any request failed.

Training and export import torch/olive: they are imported inside the functions that need them,
so the runtime package never pulls them in. Artefacts go to `artifacts/demo/` (gitignored).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SWAPPED_TASK = "sentiment"
MAX_NEW_TOKENS = 24
SHOWN_PER_TASK = 4
RETRAIN_STEPS = 60


@dataclass
class Example:
    fields: dict[str, str]  # the prompt-side fields, sent as TaskInputs
    expected: str


@dataclass
class Row:
    task: str
    phase: str  # "serve" or "hot-swap"
    version: str
    input: str
    expected: str
    output: str
    latency_ms: float
    failed: bool = False

    @property
    def correct(self) -> bool:
        return not self.failed and self.output.strip() == self.expected.strip()


def demo_tasks_file() -> Path:
    from loraplex.trainer import demo_tasks

    return demo_tasks.DATA_DIR / "tasks.yaml"


def eval_examples(config: Any) -> list[Example]:
    """The records a task's training held out (same split function, same seed)."""
    from loraplex.trainer.dataset import held_out_records

    template = config.template
    return [
        Example({f: str(record[f]) for f in template.prompt_fields}, template.render_completion(record).strip())
        for record in held_out_records(config.data, config.eval_split, config.seed)
    ]


async def query(client: Any, task: str, example: Example, phase: str) -> Row:
    """One request through the gRPC client; a failure becomes a failed row, never an exception."""
    import grpc

    started = time.perf_counter()
    text_in = " | ".join(example.fields.values())
    try:
        response = await client.generate(task, inputs=example.fields, max_new_tokens=MAX_NEW_TOKENS, stop=["\n"])
    except grpc.aio.AioRpcError as exc:
        ms = (time.perf_counter() - started) * 1000
        return Row(task, phase, "?", text_in, example.expected, f"{exc.code().name}: {exc.details()}", ms, True)
    ms = (time.perf_counter() - started) * 1000
    return Row(task, phase, response.adapter_version, text_in, example.expected, response.text.strip(), ms)


async def query_all(target: str, examples: dict[str, list[Example]], phase: str = "serve") -> list[Row]:
    """One client per task, all tasks concurrently, each sending its examples in turn."""
    from loraplex.runtime.client import AsyncClient

    async def one_task(task: str) -> list[Row]:
        async with AsyncClient(target) as client:
            return [await query(client, task, e, phase) for e in examples[task]]

    results = await asyncio.gather(*(one_task(t) for t in examples))
    return [row for rows in results for row in rows]


async def swap_under_load(target: str, examples: dict[str, list[Example]], swap, minimum: int = 20) -> list[Row]:
    """Every task's client loops over its examples while `swap()` runs; stops once the swapped task
    has served `minimum` requests on the new version."""
    from loraplex.runtime.client import AsyncClient

    rows: list[Row] = []
    done = asyncio.Event()
    new_version: list[str] = []

    async def keep_sending(task: str) -> None:
        async with AsyncClient(target) as client:
            i = 0
            while not done.is_set():
                row = await query(client, task, examples[task][i % len(examples[task])], "hot-swap")
                rows.append(row)
                i += 1
                on_new = [r for r in rows if r.task == SWAPPED_TASK and new_version and r.version == new_version[0]]
                if len(on_new) >= minimum:
                    done.set()

    senders = [asyncio.create_task(keep_sending(t)) for t in examples]
    while len(rows) < minimum * len(examples):  # the load is on before the swap
        await asyncio.sleep(0.01)
    new_version.append(await swap())
    await asyncio.wait_for(done.wait(), timeout=120)
    await asyncio.gather(*senders)
    return rows


async def parseable_rates(target: str, examples: dict[str, list[Example]], temperature: float = 1.5
                          ) -> dict[str, tuple[float, float, int]]:
    """Per task with an output contract: the share of sampled outputs (hot, seeded) the contract
    accepts, with the contract (the adapter's default) and without it (`no_default_output`)."""
    from loraplex.runtime.client import AsyncClient

    rates: dict[str, tuple[float, float, int]] = {}
    async with AsyncClient(target) as client:
        contracts = {a.name: a.output for a in await client.list_adapters() if a.HasField("output")}
        for task, contract in contracts.items():
            accepts = _accepts(contract)
            if accepts is None:
                continue  # the demo checks choice and regex contracts
            counts = []
            for free in (False, True):
                ok = 0
                for i, example in enumerate(examples.get(task, [])):
                    response = await client.generate(task, inputs=example.fields, max_new_tokens=MAX_NEW_TOKENS,
                                                      temperature=temperature, seed=i, no_default_output=free)
                    ok += bool(accepts(response.text))
                counts.append(ok / max(1, len(examples.get(task, []))))
            rates[task] = (counts[0], counts[1], len(examples.get(task, [])))
    return rates


def _accepts(contract: Any) -> Callable[[str], bool] | None:
    """Whether a text satisfies a choice or regex contract (an `OutputConstraint` message)."""
    import re

    kind = contract.WhichOneof("kind")
    if kind == "choice":
        choices = set(contract.choice.choices)
        return choices.__contains__
    if kind == "regex":
        pattern = re.compile(contract.regex)
        return lambda text: pattern.fullmatch(text) is not None
    return None


def single_request_speed(rows: list[Any]) -> dict[str, float]:
    totals = [r.timings.total_ms for r in rows]
    ttft = [r.timings.time_to_first_token_ms for r in rows]
    tokens = [r.usage.completion_tokens for r in rows]
    decode_s = sum(t - f for t, f in zip(totals, ttft, strict=True)) / 1000
    return {
        "latency_ms": statistics.median(totals),
        "ttft_ms": statistics.median(ttft),
        "tokens": statistics.median(tokens),
        "tokens_per_s": sum(tokens) / (sum(totals) / 1000),
        "decode_tokens_per_s": sum(n - 1 for n in tokens) / decode_s if decode_s > 0 else 0.0,
    }


async def measure_speed(target: str, prompt: str, count: int = 5) -> dict[str, float]:
    """Single-request latency and tokens/s: sequential requests, nothing else running."""
    from loraplex.runtime.client import AsyncClient

    async with AsyncClient(target) as client:
        responses = [await client.generate("", prompt, max_new_tokens=64) for _ in range(count)]
    return single_request_speed(responses)


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


def print_report(rows: list[Row], speed: dict[str, float], swap: dict[str, Any], stages: dict[str, float],
                 parseable: dict[str, tuple[float, float, int]] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)  # logs and CI: no wrapping at 80 columns
    table = Table(title="loraplex demo: requests through the gRPC server")
    for column in ("task", "phase", "adapter version", "input", "output", "expected", "latency ms"):
        table.add_column(column, justify="right" if column == "latency ms" else "left")
    for task in sorted({r.task for r in rows}):
        for phase in ("serve", "hot-swap"):
            picked = [r for r in rows if r.task == task and r.phase == phase]
            if phase == "hot-swap":  # show the swap: last rows on the old version, first on the new
                versions = list(dict.fromkeys(r.version for r in picked))
                picked = [r for v in versions for r in [x for x in picked if x.version == v][:2]]
            for r in picked[:SHOWN_PER_TASK]:
                mark = "[red]FAILED[/]" if r.failed else ("" if r.correct else "[yellow]≠[/]")
                table.add_row(r.task, r.phase, r.version, r.input, f"{r.output} {mark}".strip(), r.expected,
                              f"{r.latency_ms:.1f}")
    console.print(table)

    summary = Table(title="per task")
    for column in ("task", "phase", "versions", "requests", "failed", "exact match", "p50 ms", "p95 ms"):
        summary.add_column(column)
    for task in sorted({r.task for r in rows}):
        for phase in ("serve", "hot-swap"):
            picked = [r for r in rows if r.task == task and r.phase == phase]
            if not picked:
                continue
            latencies = sorted(r.latency_ms for r in picked)
            summary.add_row(
                task, phase, ", ".join(dict.fromkeys(r.version for r in picked)), str(len(picked)),
                str(sum(r.failed for r in picked)), f"{sum(r.correct for r in picked) / len(picked):.0%}",
                f"{percentile(latencies, 0.5):.1f}", f"{percentile(latencies, 0.95):.1f}",
            )
    console.print(summary)
    console.print(
        f"hot swap: {SWAPPED_TASK} {swap['old']} -> {swap['new']} (Adapters.Load {swap['load_ms']:.0f} ms) "
        f"under load from {swap['clients']} clients; failed requests during the swap: {swap['failed']}"
    )
    console.print(
        f"single request (base model, CPU): median {speed['latency_ms']:.1f} ms for {speed['tokens']:.0f} tokens, "
        f"time to first token {speed['ttft_ms']:.1f} ms, {speed['tokens_per_s']:.0f} tokens/s end to end, "
        f"{speed['decode_tokens_per_s']:.0f} tokens/s decoding"
    )
    for task, (constrained, free, count) in (parseable or {}).items():
        console.print(
            f"output contract of {task}: {constrained:.0%} of {count} sampled outputs (temperature 1.5) are valid "
            f"with it, {free:.0%} without it (no_default_output)"
        )
    console.print("stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in stages.items()))


class Stages:
    """Wall time per stage, printed as the demo goes."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    def run(self, name: str, fn, *args, **kwargs):
        from rich.console import Console

        Console().rule(f"[bold]{name}")
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        self.times[name] = time.perf_counter() - started
        return result


def build_package(out: Path, stages: Stages) -> tuple[Path, Path, list[Any]]:
    """tiny base -> three trained adapters -> one package (blocking; heavy imports)."""
    from loraplex.adapters.export import export_package
    from loraplex.trainer.config import load_tasks_yaml
    from loraplex.trainer.tiny_base import build_tiny_base
    from loraplex.trainer.train import train_tasks

    base = stages.run("build tiny base", build_tiny_base, out / "base", seed=0)
    _, configs = load_tasks_yaml(demo_tasks_file(), base=base, out=out / "adapters")
    # One torch thread: as fast as two on the tiny model, and far faster on a busy machine.
    results = stages.run("train 3 adapters", train_tasks, base, configs, num_threads=1)
    adapters = {r.task: r.adapter_dir for r in results}
    package = out / "package"
    stages.run("export package", export_package, base, adapters, package)
    return base, package, configs


def retrain(base: Path, package: Path, config: Any, out: Path, stages: Stages) -> str:
    """Train `config`'s task again with another seed and put it in the package; returns its version."""
    from loraplex.adapters.export import add_adapter
    from loraplex.trainer.train import train_tasks

    # Another seed and a shorter run (the sentiment task converges in well under the full schedule):
    # a genuinely different adapter file, in a fraction of the first training's time.
    again = dataclasses.replace(config, seed=config.seed + 1, max_steps=RETRAIN_STEPS, out=out / "retrained")
    name = f"retrain {config.task} (seed {again.seed})"
    result = stages.run(name, train_tasks, base, [again], summary=False, num_threads=1)[0]
    entry = stages.run("add to package", add_adapter, package, config.task, result.adapter_dir, version="2")
    return entry.version


async def run_async(out: Path) -> int:
    from loraplex.runtime.client import AsyncClient
    from loraplex.runtime.server import ServerConfig, start_server

    stages = Stages()
    base, package, configs = await asyncio.to_thread(build_package, out, stages)
    examples = {c.task: eval_examples(c) for c in configs}
    started = time.perf_counter()
    # The batched engine: the three task clients' requests share decode steps across adapters.
    server = await start_server(ServerConfig(package=package, port=0, engine="batched", max_batch=8, max_queue=64))
    stages.times["start server"] = time.perf_counter() - started
    try:
        started = time.perf_counter()
        rows = await query_all(server.target, examples)
        stages.times["serve eval examples"] = time.perf_counter() - started
        speed = await measure_speed(server.target, "The weather today is")
        parseable = await parseable_rates(server.target, examples)

        config = next(c for c in configs if c.task == SWAPPED_TASK)
        old = server.registry.get(SWAPPED_TASK).version
        version = await asyncio.to_thread(retrain, base, package, config, out, stages)
        swap_info: dict[str, Any] = {"old": old, "clients": len(examples)}

        async def swap() -> str:
            async with AsyncClient(server.target) as admin:
                began = time.perf_counter()
                info = await admin.load_adapter(SWAPPED_TASK, f"{SWAPPED_TASK}.onnx_adapter", version=version)
                swap_info["load_ms"] = (time.perf_counter() - began) * 1000
                return info.version

        started = time.perf_counter()
        swap_rows = await swap_under_load(server.target, examples, swap)
        stages.times["hot swap under load"] = time.perf_counter() - started
        swap_info["new"] = version
        swap_info["failed"] = sum(r.failed for r in swap_rows)
    finally:
        await server.stop(10)
    rows += swap_rows
    print_report(rows, speed, swap_info, stages.times, parseable)
    failed = sum(r.failed for r in rows)
    if failed:
        log.error("%d request(s) failed", failed)
        return 1
    return 0


def run_demo(out: str | Path = "artifacts/demo") -> int:
    """Run the demo; artefacts under `out` (cleared first: every run is a fresh pipeline)."""
    import shutil

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    started = time.perf_counter()
    code = asyncio.run(run_async(out))
    print(f"demo finished in {time.perf_counter() - started:.0f}s with exit code {code}")
    return code
