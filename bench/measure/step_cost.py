"""`python -m bench.measure.step_cost PACKAGE`: what a batched decode step costs as its rows grow, and why.

Three tables, on the package's own banked graph and weights:

1. the whole decode step (the engine's session run through its IO binding, KV rows of 64 tokens,
   the rows spread over the package's adapters, at most `SPREAD` of them, as the bench's clients are)
   at 1, 2, 4, 8 and 16 rows, with 1 and 2 threads;
2. each distinct int4/int8 matmul of the graph (`MatMulNBits`: the layers' projections and the LM
   head, with the graph's own K, N, bits, block size and zero points) alone, repeated as many times
   as the graph has it, at the same row counts: which kernel makes several rows expensive;
3. with `--profile`, onnxruntime's profiler over 32 decode steps at 1 and 8 rows: each op type's
   share of kernel time (the profiler's own cost inflates small kernels: shares, not milliseconds).

Medians of interleaved repeats; run it on a quiet machine (the load average is printed), since a
second process on a 2-core machine stretches every parallel section.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROWS = (1, 2, 4, 8, 16)
CONTEXT = 64  # tokens already in each row's cache
SPREAD = 4  # adapters a step's rows are spread over (the package's, repeated if it has fewer)


@dataclass(frozen=True)
class MatMulShape:
    k: int
    n: int
    bits: int
    block_size: int
    zero_points: bool
    accuracy_level: int


def _median_ms(fn, repeats: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def step_times(package_dir: Path, threads: int, repeats: int) -> dict[int, float]:
    """Median ms of one decode step (session run) of `rows` rows, for each row count. The row counts
    take turns within each repeat, so a machine whose speed drifts (a shared host) moves them alike."""
    from loraplex.adapters.package.reader import Package
    from loraplex.runtime.engines.batched.runner import ModelRunner
    from loraplex.runtime.engines.batched.session import SessionSettings

    package = Package.open(package_dir)
    runner = ModelRunner(package, max_batch=max(ROWS), max_slots=SPREAD,
                         session=SessionSettings(intra_op_threads=threads, allow_spinning=True))
    _fill_adapters(runner, package)
    steps = {rows: _decode_rows(rows, runner.bank.capacity - 1) for rows in ROWS}
    times: dict[int, list[float]] = {rows: [] for rows in ROWS}
    for repeat in range(repeats + 2):  # the first two of each: warm-up
        for rows, inputs in steps.items():
            start = time.perf_counter()
            runner.forward(0, inputs, keep=0)
            if repeat >= 2:
                times[rows].append(time.perf_counter() - start)
    runner.close()
    return {rows: statistics.median(t) * 1000 for rows, t in times.items()}


def _fill_adapters(runner, package) -> None:
    """Bank slots 1..SPREAD hold the package's adapters (repeated if it has fewer; none: the base)."""
    from loraplex.adapters.package.adapter_file import read_adapter_file
    from loraplex.runtime.engines.batched.scheduler import BatchedAdapter

    files = sorted((package.root / "adapters").glob("*.onnx_adapter"))
    for slot in range(1, SPREAD + 1) if files else ():
        path = files[(slot - 1) % len(files)]
        weights = read_adapter_file(path, package.lora_inputs)
        runner.bank.fill(slot, BatchedAdapter(name=f"{path.stem}#{slot}", version="1", path=path, weights=weights))


def _decode_rows(rows: int, slots: int) -> list:
    """A decode step's rows: one token each after CONTEXT cached ones, row i on slot 1 + i % slots (0: base)."""
    from loraplex.runtime.engines.batched.runner import RowInput

    return [RowInput(slot=1 + i % slots if slots else 0, past=CONTEXT, tokens=(42,)) for i in range(rows)]


def graph_matmuls(banked: Path) -> collections.Counter[MatMulShape]:
    import onnx

    model = onnx.load(str(banked), load_external_data=False)
    shapes: collections.Counter[MatMulShape] = collections.Counter()
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        shapes[MatMulShape(attrs["K"], attrs["N"], attrs.get("bits", 4), attrs["block_size"],
                           len(node.input) > 3 and bool(node.input[3]), attrs.get("accuracy_level", 0))] += 1
    return shapes


def _matmul_session(shape: MatMulShape, count: int, rows: int, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    blocks = -(-shape.k // shape.block_size)
    blob = shape.block_size * shape.bits // 8
    nodes, inits = [], []
    for i in range(count):
        names = ["x", f"b{i}", f"s{i}"]
        inits.append(numpy_helper.from_array(rng.integers(0, 255, (shape.n, blocks, blob), dtype=np.uint8), f"b{i}"))
        inits.append(numpy_helper.from_array(rng.random(shape.n * blocks, dtype=np.float32) * 0.01, f"s{i}"))
        if shape.zero_points:
            zp_bytes = shape.n * -(-blocks * shape.bits // 8)
            inits.append(numpy_helper.from_array(rng.integers(0, 255, zp_bytes, dtype=np.uint8), f"z{i}"))
            names.append(f"z{i}")
        nodes.append(helper.make_node("MatMulNBits", names, [f"y{i}"], domain="com.microsoft", K=shape.k,
                                      N=shape.n, bits=shape.bits, block_size=shape.block_size,
                                      accuracy_level=shape.accuracy_level))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, shape.k])
    ys = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(count)]
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(helper.make_graph(nodes, "matmuls", [x], ys, inits), opset_imports=opsets)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def matmul_times(shapes: collections.Counter[MatMulShape], threads: int,
                 repeats: int) -> dict[MatMulShape, dict[int, float]]:
    out: dict[MatMulShape, dict[int, float]] = {}
    for shape, count in shapes.items():
        out[shape] = {}
        for rows in ROWS:
            session = _matmul_session(shape, count, rows, threads)
            feed = {"x": np.random.default_rng(1).random((rows, shape.k), dtype=np.float32)}
            out[shape][rows] = _median_ms(lambda s=session, f=feed: s.run(None, f), repeats)
    return out


def profile_shares(package_dir: Path, threads: int, rows: int, steps: int = 32) -> dict[str, float]:
    """Share of kernel time per op type over `steps` decode steps of `rows` rows (onnxruntime's profiler)."""
    import onnxruntime as ort
    from loraplex.adapters.package.reader import Package
    from loraplex.runtime.engines.batched import runner as runner_module
    from loraplex.runtime.engines.batched.session import SessionSettings

    class Profiled(SessionSettings):
        def options(self) -> ort.SessionOptions:
            options = super().options()
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(tempfile.gettempdir()) / f"loraplex-step-{os.getpid()}")
            return options

    settings = Profiled(intra_op_threads=threads, allow_spinning=True, cache=False)
    package = Package.open(package_dir)
    runner = runner_module.ModelRunner(package, max_batch=rows, max_slots=SPREAD, session=settings)
    _fill_adapters(runner, package)
    for _ in range(steps):
        runner.forward(0, _decode_rows(rows, runner.bank.capacity - 1), keep=0)
    trace = Path(runner.session.end_profiling())
    totals: collections.Counter[str] = collections.Counter()
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"]
    trace.unlink()
    runner.close()
    whole = sum(totals.values()) or 1
    return {op: us / whole for op, us in totals.most_common()}


def render(package_dir: Path, repeats: int, profile: bool) -> str:
    from loraplex.runtime.engines.batched.graph import ensure_batched_model

    banked = ensure_batched_model(package_dir / "model.onnx")
    lines = [f"Package `{package_dir.name}`, load average {os.getloadavg()[0]:.2f} at start; medians of {repeats}.", ""]
    header = "| " + " | ".join(f"{r} rows" for r in ROWS) + " | 8 rows / 1 row |"
    rule = "|---" * (len(ROWS) + 2) + "|"
    lines += ["Decode step (session run), ms:", "", "| threads " + header, rule]
    for threads in (1, 2):
        times = step_times(package_dir, threads, repeats)
        cells = " | ".join(f"{times[r]:.2f}" for r in ROWS)
        lines.append(f"| {threads} | {cells} | {times[8] / times[1]:.2f}x |")
    shapes = graph_matmuls(banked)
    lines += ["", "MatMulNBits alone (the graph's shapes, each repeated as often as the graph has it), 2 threads, ms:",
              "", "| K x N, bits, zero points, nodes " + header, rule]
    for shape, times in matmul_times(shapes, 2, repeats).items():
        label = f"{shape.k} x {shape.n}, {shape.bits}, {'yes' if shape.zero_points else 'no'}, {shapes[shape]}"
        lines.append(f"| {label} | " + " | ".join(f"{times[r]:.2f}" for r in ROWS) + f" | {times[8] / times[1]:.2f}x |")
    if profile:
        lines += ["", "Share of kernel time per op type (profiler, 2 threads, 32 decode steps):", "",
                  "| op | 1 row | 8 rows |", "|---|---|---|"]
        one, eight = profile_shares(package_dir, 2, 1), profile_shares(package_dir, 2, 8)
        for op in sorted(set(one) | set(eight), key=lambda o: -one.get(o, 0))[:10]:
            lines.append(f"| {op} | {one.get(op, 0):.0%} | {eight.get(op, 0):.0%} |")
    lines.append(f"\nLoad average at end {os.getloadavg()[0]:.2f}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.measure.step_cost", description=__doc__.splitlines()[0])
    parser.add_argument("package", type=Path, help="an exported package directory (int4 for the interesting case)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--profile", action="store_true", help="also the profiler's op-type shares")
    parser.add_argument("--json", type=int, metavar="THREADS",
                        help="only the decode step's times with this many threads, as JSON (`make bench` runs this)")
    args = parser.parse_args(argv)
    if args.json is not None:
        times = step_times(args.package, args.json, args.repeats)
        print(json.dumps({"threads": args.json, "spread": SPREAD, "repeats": args.repeats,
                          "load_average": os.getloadavg(),
                          "ms": {str(rows): ms for rows, ms in times.items()}}))
        return
    print(render(args.package, args.repeats, args.profile))


if __name__ == "__main__":
    main()
