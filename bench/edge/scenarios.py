"""The edge scenarios: loraplex against llama.cpp on its own ground, the real SmolLM2-135M with trained adapters.

Scenarios (systems interleaved within each, as in `scenarios`):
- `single_switching`: one request at a time, the two trained adapters alternating (and the base
  model alone): tokens/s and decode tokens/s;
- `concurrency`: closed-loop clients over adapters: loraplex's batched engine, llama-cpp-python
  serving serially with a switch per request (measured, replayed as a FIFO queue), llama-server
  with `-np clients` (the strongest llama.cpp peer under concurrency);
- `memory`: RSS of a fresh server with 1, 8 and 32 adapters after one request on each;
- `cold_start`: process start to the first streamed token of a request on an adapter;
- `accuracy`: the trained adapters on 60 evaluation records each (wording unseen in training),
  exact match (the completion, then EOS), every system on the same prompts;
- `agreement`: greedy tokens of loraplex fp32 and llama.cpp f32 with the same adapter (the GGUF
  written by `loraplex adapters export-gguf`, loaded by llama.cpp): equal when the conversion is right.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.measure.results import Prompt, RequestResult, failure_line, guarded, over, summarize_load
from bench.paths import REPO_ROOT

log = logging.getLogger("bench.edge")




def single_switching(systems: list[Any], prompts: list[Prompt], adapters: tuple[str, str], new_tokens: int,
                     reps: int, deadline: float | None = None) -> dict[str, dict]:
    """Per system: requests alternating between two adapters, and on the base model; medians."""
    runs: dict[str, dict[str, list[RequestResult]]] = {s.name: {"switching": [], "base": []} for s in systems}
    for rep in range(reps):
        if rep and over(deadline):
            log.warning("edge single stream: time budget used up after %d repetitions", rep)
            break
        for system in systems:
            for kind, adapter in (("switching", adapters[rep % 2]), ("switching", adapters[(rep + 1) % 2]),
                                  ("base", None)):
                result = guarded(system.name, "single stream", system.generate, prompts[rep % len(prompts)], adapter,
                                new_tokens)
                if isinstance(result, RequestResult) and result.ok:
                    runs[system.name][kind].append(result)
    out = {}
    for name, kinds in runs.items():
        row: dict[str, Any] = {}
        for kind, results in kinds.items():
            if not results:
                continue
            decode = [(r.tokens - 1) / (r.latency_s - r.ttft_s) for r in results
                      if r.ttft_s is not None and r.tokens > 1]
            ttft = [r.ttft_s for r in results if r.ttft_s is not None]
            row[kind] = {"requests": len(results),
                         "tokens_per_s": statistics.median(r.tokens / r.latency_s for r in results),
                         "decode_tokens_per_s": statistics.median(decode) if decode else None,
                         "ttft_ms": statistics.median(ttft) * 1000 if ttft else None}
        out[name] = row or {"error": "no successful request"}
    return out


def concurrency(systems: list[Any], prompts: list[Prompt], adapters: list[str], clients: int, requests: int,
                new_tokens: int, serial_measured: int = 6, rounds: int = 1) -> dict[str, dict]:
    """Closed-loop clients over `adapters` (round robin): throughput and latency per system.

    With several `rounds` the systems take turns (each runs the load once per round) and a system's
    figures pool its rounds: a machine whose speed drifts during the scenario (shared hosts do)
    shifts every system alike instead of the one measured last."""
    load = [(prompts[i % len(prompts)], adapters[i % len(adapters)]) for i in range(requests)]
    pooled: dict[str, tuple[list, float, str]] = {}
    failed: dict[str, str] = {}
    for _ in range(rounds):
        for system in systems:
            if system.name in failed:
                continue
            kwargs = {"max_measured": serial_measured} if getattr(system, "serial", False) else {}
            got = guarded(system.name, "concurrency", system.run_load, load, clients, new_tokens, **kwargs)
            if isinstance(got, Exception):
                failed[system.name] = failure_line(got)
                continue
            results, wall, note = got
            before = pooled.get(system.name, ([], 0.0, note))
            pooled[system.name] = (before[0] + list(results), before[1] + wall, note)
    out: dict[str, dict] = {}
    for system in systems:
        if system.name in failed:
            out[system.name] = {"error": failed[system.name]}
            continue
        results, wall, note = pooled[system.name]
        out[system.name] = {**summarize_load(results, wall), "rounds": rounds, "note": note}
        log.info("%-34s %d clients x %d adapters: %.1f tok/s", system.name, clients, len(adapters),
                 out[system.name]["tokens_per_s"])
    return out


def accuracy(systems: dict[str, Any], tasks: dict[str, tuple[dict, Path]], tokenizer, max_new_tokens: int = 32,
             ) -> dict[str, dict[str, dict]]:
    """Exact match on each task's evaluation records: the completion's text, then EOS.

    loraplex renders the template itself (`inputs`); llama.cpp gets the same rendered prompt as the
    base tokenizer's ids, and its completion ids are decoded by the same tokenizer.
    """
    from loraplex.adapters.package.template import PromptTemplate
    from loraplex.trainer.dataset import read_records

    out: dict[str, dict[str, dict]] = {}
    for task, (template_dict, eval_file) in tasks.items():
        template = PromptTemplate.from_dict(template_dict)
        records = read_records(eval_file)
        for name, system in systems.items():
            correct, failed = 0, 0
            for record in records:
                fields = {f: str(record[f]) for f in template.prompt_fields}
                expected = template.render_completion(record)
                try:
                    if hasattr(system, "complete_task"):
                        text, at_eos = system.complete_task(task, fields, max_new_tokens)
                    else:
                        ids = tokenizer.encode(template.render_prompt(fields), add_special_tokens=False)
                        out_ids, at_eos = system.complete(ids, task, max_new_tokens)
                        text = tokenizer.decode(out_ids, skip_special_tokens=True)  # llama.cpp returns the EOS id too
                except Exception as exc:
                    log.error("%s failed on a %s record: %s", name, task, exc)
                    failed += 1
                    continue
                correct += at_eos and text == expected
            out.setdefault(name, {})[task] = {"correct": correct, "total": len(records), "failed": failed}
            log.info("accuracy %-34s %-18s %d/%d", name, task, correct, len(records))
    return out


def agreement(reference: Any, other: Any, prompts: list[Prompt], adapters: list[str | None], new_tokens: int,
              eos_ids: frozenset[int] = frozenset()) -> dict[str, str]:
    """Whether `other`'s greedy tokens equal `reference`'s, per adapter (None = base), on each prompt.

    Compared up to `reference`'s first EOS: past it the peers differ by design (loraplex's `ignore_eos`
    emits EOS and goes on; llama.cpp's never chooses it), and a trained adapter reaches EOS early."""
    out = {}
    for adapter in adapters:
        verdicts = []
        for prompt in prompts:
            a = guarded(reference.name, "agreement", reference.generate, prompt, adapter, new_tokens)
            b = guarded(other.name, "agreement", other.generate, prompt, adapter, new_tokens)
            if isinstance(a, Exception) or isinstance(b, Exception) or not (a.ok and b.ok):
                verdicts.append("failed")
                continue
            length = next((i for i, t in enumerate(a.token_ids) if t in eos_ids), len(a.token_ids))
            ours, theirs = a.token_ids[:length], b.token_ids[:length]
            if ours == theirs:
                verdicts.append("same")
            else:
                first = next((i for i, (x, y) in enumerate(zip(ours, theirs, strict=False)) if x != y),
                             min(len(ours), len(theirs)))
                verdicts.append(f"from token {first}")
        same = sum(v == "same" for v in verdicts)
        out[adapter or "(base)"] = f"{same}/{len(verdicts)} prompts equal" + (
            "" if same == len(verdicts) else f" ({', '.join(v for v in verdicts if v != 'same')})")
    return out


def probe_llama_cpp_python(env: dict, model: Path, threads: int, prompt: Prompt, adapters: list[Path]) -> dict:
    """`bench.edge.llamacpp_probe` in a fresh process: start to first token, RSS after a request per adapter.
    Run by the interpreter named by LORAPLEX_BENCH_LLAMACPP_PYTHON (one with llama_cpp), else this one."""
    python = os.environ.get("LORAPLEX_BENCH_LLAMACPP_PYTHON") or sys.executable
    proc = subprocess.run([python, "-m", "bench.edge.llamacpp_probe", str(model), str(threads), json.dumps(prompt.ids),
                           *map(str, adapters)], capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=900)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def breakdown(package: Path, profile: str, n_adapters: int, env: dict | None = None) -> dict:
    """`bench.edge.memory_breakdown` of `loraplex serve` on `package` in a fresh process."""
    proc = subprocess.run([sys.executable, "-m", "bench.edge.memory_breakdown", str(package), "--profile", profile,
                           "--adapters", str(n_adapters)], capture_output=True, text=True, cwd=REPO_ROOT, env=env,
                          timeout=900)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def byte_compile_loraplex() -> None:
    """Byte-compile loraplex's sources, as `pip install` does: this checkout is an editable install and
    the environment may set PYTHONDONTWRITEBYTECODE, so without it every start compiles the modules it
    imports (about 0.1 s of CPU measured on the serve path), which a device's installed wheel never does."""
    import compileall

    for part in ("runtime", "adapters", "proto"):
        compileall.compile_dir(REPO_ROOT / part, quiet=1)


def first_token_after_start(server: Any, prompt: Prompt, adapter: str | None) -> float | None:
    """Seconds from the server's process start to the first streamed token of one request."""
    result = server.generate(prompt, adapter, 2)
    if not result.ok or result.ttft_s is None:
        return None
    return time.perf_counter() - server.started_at - (result.latency_s - result.ttft_s)


def process_cpu_s(server: Any) -> float | None:
    """User + system CPU seconds the server process has used so far (all its threads)."""
    import psutil

    try:
        times = psutil.Process(server.process.pid).cpu_times()
    except psutil.Error:
        return None
    return times.user + times.system
