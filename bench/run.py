"""`python -m bench.run [--quick]`: loraplex against its peers, side by side in one run.

Two parts, each with its systems interleaved:
- `edge` (the main workload, `bench.edge`): the real SmolLM2-135M with trained adapters against
  llama.cpp (built from source here, cached), memory, cold start, speed, accuracy;
- `random` (`bench.random_init`): a ~78M random-init Llama with 32 random adapters against onnxruntime-genai and
  PyTorch PEFT (larger shapes, more adapters, hot load).
Writes `bench/RESULTS.md`, `bench/results.json` and PNG plots (`--quick` writes to
`bench/out/quick/` instead, with small counts: for developing the bench, not for quoting).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench.edge.runner import SCENARIOS as EDGE_SCENARIOS
from bench.measure import machine, roofline
from bench.measure.results import Prompt, failure_line, over
from bench.paths import BENCH_DIR, OUT_ROOT
from bench.random_init import memory, scenarios
from bench.systems.loraplex_server import LoraplexServer, Unavailable
from bench.workloads import random_llama as workload

log = logging.getLogger("bench")
ENGINES = ("batched", "genai")
SCENARIOS = ("single", "switch", "concurrency", "hotload", "memory")
PARTS = ("edge", "random")

QUICK_GRID = scenarios.Grid(
    single_reps=2,
    switch_reps=1,
    switch_block=2,
    concurrency=(1, 4),
    adapter_spread=(1, 4),
    min_requests=4,
    serial_measured=3,
    peft_waves=1,
    hot_load_requests=8,
    hot_load_adapters=2,
    hot_load_delay_s=0.5,
    memory_counts=(1, 4, 8),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, small counts (develop the bench)")
    parser.add_argument("--engines", default=",".join(ENGINES), help="loraplex engines to serve (comma list)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="which scenarios (comma list)")
    parser.add_argument("--no-peft", action="store_true", help="leave PyTorch PEFT out")
    parser.add_argument("--out", type=Path, help="where RESULTS.md, results.json and plots go")
    parser.add_argument("--build-only", action="store_true", help="build or reuse the artefacts, then stop")
    parser.add_argument("--render-only", action="store_true",
                        help="write RESULTS.md and the plots again from results.json (no measuring)")
    parser.add_argument("--parts", default=",".join(PARTS), help="edge (real model vs llama.cpp), random (comma list)")
    parser.add_argument("--edge-scenarios", default=",".join(EDGE_SCENARIOS), help="which edge scenarios")
    return parser.parse_args(argv)


class Bench:
    """The systems under test and what the run has measured so far."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.quick = args.quick
        self.workload = (
            workload.Workload(shape=dict(workload.QUICK_SHAPE), total_adapters=8, served_adapters=4, n_prompts=8)
            if args.quick
            else workload.Workload()
        )
        self.grid = QUICK_GRID if args.quick else scenarios.Grid()
        self.out = args.out or (OUT_ROOT / "quick" if args.quick else BENCH_DIR)
        self.engines = [e for e in args.engines.split(",") if e]
        self.wanted = set(args.scenarios.split(","))
        self.results: dict[str, Any] = {"unavailable": {}, "timings_s": {}}
        self.servers: dict[str, LoraplexServer] = {}  # fp32, keyed by engine
        self.peers: dict[str, Any] = {}
        self.deadline: float | None = None  # of the scenario running now (Grid.budget_s)

    # --- setup -----------------------------------------------------------------------------

    def build(self) -> None:
        start = time.perf_counter()
        self.art = workload.build(self.workload)
        self.prompts = [Prompt(t, ids) for t, ids in zip(self.art.prompts, self.art.prompt_ids, strict=True)]
        self.served = self.workload.adapter_names(self.workload.served_adapters)
        self.log_dir = self.art.root / "logs"
        self.results["workload"] = {**self.workload.__dict__, "cache": str(self.art.root)}
        self.results["timings_s"]["build"] = time.perf_counter() - start

    def measure_machine(self) -> None:
        self.results["machine"] = machine.machine_info()
        self.results["versions"] = machine.package_versions()
        self.bandwidth = roofline.measure_copy_bandwidth(buffer_mb=128 if self.quick else 512)
        self.results["bandwidth"] = self.bandwidth.__dict__

    def measure_roofline(self) -> None:
        bw = self.bandwidth
        roof = {}
        for precision, package in self.art.packages.items():
            sizes = roofline.weight_bytes_per_token(package)
            roof[precision] = {**sizes, "tokens_per_s": roofline.roofline_tokens_per_s(sizes["per_token"], bw)}
        self.results["roofline"] = roof
        self.results["server_max_batch"] = max(self.grid.concurrency)

    def _unavailable(self, name: str, reason: str) -> None:
        log.warning("%s is not available: %s", name, reason)
        self.results["unavailable"][name] = reason

    def start_servers(self, precision: str, label: str = "", spin: bool = False) -> dict[str, LoraplexServer]:
        """A server per engine on the `precision` package. `spin`: threads spin (`--spin`), loraplex's best
        setting for one request at a time on a dedicated machine, as onnxruntime's threads in the in-process
        peers spin by default; otherwise the default profile (spin 20 us, then sleep), its best with many
        clients beside it."""
        servers = {}
        package = self.art.packages.get(precision)
        for engine in self.engines:
            name = f"loraplex[{engine}]{' ' + label if label else ''}"
            if package is None:
                self._unavailable(name, f"no {precision} package (export unavailable or failed)")
                continue
            try:
                servers[engine] = LoraplexServer(
                    package,
                    engine,
                    adapter_root=self.art.root / f"pkg_{precision}_all" / "adapters",
                    log_dir=self.log_dir,
                    max_batch=max(self.grid.concurrency),
                    label=label,
                    # The bench's prompts repeat: a prefix cache across requests would turn them into hits the
                    # in-process peers do not get (its own value is measured in `bench.features.prefix_cache`).
                    extra_args=(*(("--no-prefix-cache",) if engine == "batched" else ()),
                                *(("--spin",) if spin else ())),
                )
            except Unavailable as exc:
                self._unavailable(name, str(exc))
        return servers

    def start_peers(self) -> None:
        from bench.systems.genai_in_process import GenaiInProcess

        for precision, package in self.art.packages.items():
            name = "onnxruntime-genai" + ("" if precision == "fp32" else f" {precision}")
            try:
                self.peers[name] = GenaiInProcess(package, self.served, name=name)
            except Exception as exc:
                self._unavailable(name, failure_line(exc))
        if "fp32" not in self.art.packages:
            self._unavailable("onnxruntime-genai", "no fp32 package (export unavailable or failed)")
        if not self.args.no_peft:
            from bench.systems.peft_in_process import PeftSystem

            try:
                self.peers["pytorch-peft"] = PeftSystem(self.art.base, {n: self.art.peft[n] for n in self.served})
            except Exception as exc:
                self._unavailable("pytorch-peft", failure_line(exc))

    # --- scenarios -------------------------------------------------------------------------

    def fp32_systems(self) -> list[Any]:
        return [
            *self.servers.values(),
            *(p for n, p in self.peers.items() if n in ("onnxruntime-genai", "pytorch-peft")),
        ]

    def _timed(self, key: str, fn) -> None:
        if key not in self.wanted:
            return
        start = time.perf_counter()
        self.deadline = start + self.grid.budget_s.get(key, 600)
        try:
            fn()
        except Exception as exc:  # one broken scenario must not cost the others' numbers
            log.error("scenario %s failed: %s", key, failure_line(exc))
            log.debug("scenario %s failed", key, exc_info=True)
            self.results.setdefault("scenario_errors", {})[key] = failure_line(exc)
        self.results["timings_s"][key] = time.perf_counter() - start
        log.info("scenario %s took %.0f s", key, self.results["timings_s"][key])

    def run_single(self) -> None:
        spinning = {precision: self.start_servers(precision, label="" if precision == "fp32" else precision, spin=True)
                    for precision in self.art.packages}
        try:
            systems = [
                *spinning.get("fp32", {}).values(),
                *(p for n, p in self.peers.items() if n in ("onnxruntime-genai", "pytorch-peft")),
                *spinning.get("int4", {}).values(),
                *(p for n, p in self.peers.items() if n.endswith("int4")),
            ]
            tokens = scenarios.warm_up(systems, self.prompts[0], self.served[0], self.workload.new_tokens)
            # Each precision against onnxruntime-genai on the same package: same work, same answer.
            fp32 = {n: t for n, t in tokens.items() if "int4" not in n}
            int4 = {n: t for n, t in tokens.items() if "int4" in n}
            self.results["greedy_agreement"] = {
                **scenarios.agreement(fp32, "onnxruntime-genai"),
                **scenarios.agreement(int4, "onnxruntime-genai int4"),
            }
            with tqdm(total=self.grid.single_reps * len(systems), desc="single stream", unit="req") as bar:
                self.results["single_stream"] = scenarios.single_stream(
                    systems, self.prompts, self.served[0], self.workload.new_tokens, self.grid.single_reps, bar,
                    deadline=self.deadline,
                )
            for name, row in self.results["single_stream"].items():
                row["precision"] = "int4" if "int4" in name else "fp32"
        finally:
            for servers in spinning.values():
                for server in servers.values():
                    server.close()

    def run_switch(self) -> None:
        systems = self.fp32_systems()
        with tqdm(total=self.grid.switch_reps * len(systems), desc="adapter switch", unit="block") as bar:
            self.results["adapter_switch"] = scenarios.adapter_switch(
                systems,
                self.prompts,
                (self.served[0], self.served[1]),
                self.workload.new_tokens,
                self.grid.switch_reps,
                self.grid.switch_block,
                bar,
                deadline=self.deadline,
            )

    def run_concurrency(self) -> None:
        systems = self.fp32_systems()
        total = len(self.grid.adapter_spread) * len(self.grid.concurrency) * len(systems)
        with tqdm(total=total, desc="concurrency", unit="point") as bar:
            self.results["concurrency"] = scenarios.concurrency(
                systems, self.prompts, self.served, self.workload.new_tokens, self.grid, bar, deadline=self.deadline
            )

    def run_hot_load(self) -> None:
        from loraplex.adapters.package.manifest import Manifest

        full = self.art.root / "pkg_fp32_all"
        manifest = Manifest.load(full)
        n = self.workload.served_adapters
        new, spare = f"a{n:02d}", f"a{n + 1:02d}"
        new_file = Path(manifest.adapters[new].file).name  # relative to the adapter root
        spare_file = Path(manifest.adapters[spare].file).name
        # The servers serve a view of the package that does not list these two: record their digests
        # beside them, as an operator does for a file that reaches a server outside its package.
        for name in (new, spare):
            entry = manifest.adapters[name]
            (full / entry.file).with_name(Path(entry.file).name + ".sha256").write_text(
                f"{entry.sha256}  {Path(entry.file).name}\n")
        peers = [p for name, p in self.peers.items() if name in ("onnxruntime-genai", "pytorch-peft")]
        paths = {"onnxruntime-genai": full / manifest.adapters[new].file, "pytorch-peft": self.art.peft[new]}
        with tqdm(total=len(self.servers) + len(peers), desc="hot load", unit="system") as bar:
            self.results["hot_load"] = scenarios.hot_load(
                list(self.servers.values()),
                peers,
                self.prompts,
                self.served,
                (new, new_file),
                (self.served[1], spare_file),
                paths,
                self.workload.new_tokens,
                self.grid,
                bar,
            )

    def run_memory(self) -> None:
        """Each reading in a fresh process; the long-lived servers and peers are closed first."""
        self.close()
        counts = [c for c in self.grid.memory_counts if c <= self.workload.total_adapters]
        rows: dict[str, dict[str, Any]] = {}
        total = len(counts) * (len(self.engines) + (1 if "fp32" in self.art.packages else 0) + (not self.args.no_peft))
        with tqdm(total=total, desc="memory", unit="reading") as bar:
            for n in counts:
                if over(self.deadline):
                    log.warning("memory: time budget used up; %d adapters and above skipped", n)
                    break
                names = self.workload.adapter_names(n)
                if "fp32" in self.art.packages:
                    package = self.art.package_with(n)
                    for engine in self.engines:
                        rows.setdefault(f"loraplex[{engine}]", {})[str(n)] = memory.server_rss(
                            package, engine, names, self.prompts[0], self.log_dir, max(self.grid.concurrency)
                        )
                        bar.update(1)
                    rows.setdefault("onnxruntime-genai", {})[str(n)] = memory.peer_rss("genai", self.art.root, n)
                    bar.update(1)
                if not self.args.no_peft:
                    rows.setdefault("pytorch-peft", {})[str(n)] = memory.peer_rss("peft", self.art.root, n)
                    bar.update(1)
        self.results["memory"] = rows

    def run_edge(self) -> None:
        from bench.edge.runner import EdgeBench

        load = os.getloadavg()
        edge = EdgeBench(OUT_ROOT, quick=self.quick, scenarios=tuple(self.args.edge_scenarios.split(",")))
        try:
            edge.run(self.bandwidth)
        finally:
            edge.results["load_average"] = {"start": load, "end": os.getloadavg()}
            self.results["edge"] = edge.results

    def run(self) -> None:
        start = time.perf_counter()
        parts = set(self.args.parts.split(","))
        self.measure_machine()
        if "edge" in parts:
            self.run_edge()
        if "random" not in parts:
            self.finish(start)
            return
        self.build()
        self.measure_roofline()
        self.servers = self.start_servers("fp32")
        self.start_peers()
        try:
            self._timed("single", self.run_single)
            self._timed("switch", self.run_switch)
            self._timed("concurrency", self.run_concurrency)
            self._timed("hotload", self.run_hot_load)
        finally:
            self.close()
        self._timed("memory", self.run_memory)
        self.finish(start)

    def finish(self, start: float) -> None:
        """The load average and the copy bandwidth again at the end: a host whose memory bandwidth drifted
        during the run (other tenants) shows it beside the tables."""
        self.results["machine"]["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
        self.results["bandwidth_at_end"] = roofline.measure_copy_bandwidth(
            buffer_mb=self.bandwidth.buffer_mb).__dict__
        self.results["timings_s"]["total"] = time.perf_counter() - start

    def close(self) -> None:
        for server in self.servers.values():
            with suppress(Exception):
                server.close()
        self.servers = {}
        for peer in self.peers.values():
            with suppress(Exception):
                peer.close()
        self.peers = {}

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.results["quick"] = self.quick
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        render(self.results, self.out)


def render(results: dict[str, Any], out: Path) -> None:
    """Plots and RESULTS.md from `results` (RESULTS.md's hand-measured section is kept)."""
    from bench.report import document, plots

    images = plots.write_plots(results, out / "plots")
    path = out / "RESULTS.md"
    kept = document.hand_measured(path.read_text(encoding="utf-8")) if path.is_file() else ""
    path.write_text(document.render(results, images, out) + kept)
    log.info("wrote %s", path)


def main(argv: list[str] | None = None) -> int:
    for key, value in (
        ("HF_HUB_OFFLINE", "1"),
        ("TRANSFORMERS_OFFLINE", "1"),
        ("HF_HUB_DISABLE_TELEMETRY", "1"),
        ("TOKENIZERS_PARALLELISM", "false"),
    ):
        os.environ.setdefault(key, value)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.render_only:
        out = args.out or BENCH_DIR
        render(json.loads((out / "results.json").read_text()), out)
        return 0
    bench = Bench(args)
    if args.build_only:
        parts = args.parts.split(",")
        if "edge" in parts:
            from bench.edge.runner import EdgeBench

            EdgeBench(OUT_ROOT, quick=args.quick).build()
        if "random" in parts:
            bench.build()
            log.info("built %s in %.0f s", bench.art.root, bench.results["timings_s"]["build"])
        return 0
    try:
        bench.run()
    finally:
        if "workload" in bench.results or "edge" in bench.results:
            bench.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
