"""Export subcommands: `loraplex export` and `loraplex adapters add`. Parsing only; the work is in `export`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from loraplex.adapters.package.devices import DEVICES, PROVIDERS
from loraplex.adapters.package.manifest import PRECISIONS

# adapters.export.merge.COMBINATIONS, spelled out so parsing imports no torch
COMBINATIONS_CHOICES = ("cat", "linear", "ties", "dare_linear", "dare_ties")


def register(commands: argparse._SubParsersAction, adapter_commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser(
        "export", help="export a base model and its LoRA adapters as one ONNX package the server loads",
        description="Build the base graph (LoRA weights as inputs), convert every adapter, check parity with "
        "PyTorch, write the package. Give adapters with --adapter NAME=DIR or all tasks of --config.",
    )
    export.add_argument("--base", type=Path, help="Hugging Face base model directory (default: the task file's)")
    export.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="a PEFT adapter directory and the name it is served under (repeatable)")
    export.add_argument("--config", type=Path, metavar="TASKS_YAML",
                        help="the trainer's task file: export every task's adapter from its output directory")
    export.add_argument("--out", type=Path, required=True, help="package directory to write")
    export.add_argument("--precision", choices=PRECISIONS, default="fp32", help="base weights precision")
    export.add_argument("--device", choices=DEVICES, default="cpu", help="device the package targets")
    export.add_argument("--provider", choices=sorted(p for p in PROVIDERS if p != "cpu"),
                        help="execution provider for gpu/npu (default: cuda for gpu, qnn for npu)")
    export.add_argument("--int4-block-size", type=int, default=32, choices=(16, 32, 64, 128, 256),
                        help="int4: weights per quantization scale (smaller: more accurate, larger file)")
    export.add_argument("--int4-accuracy-level", type=int, default=4, choices=(1, 2, 3, 4),
                        help="int4: compute precision of the quantized MatMuls on CPU (4 = int8, fastest; 1 = fp32)")
    export.add_argument("--int4-algo", default="rtn", choices=("rtn", "default", "k_quant"),
                        help="int4: quantization algorithm (rtn or default: round to nearest, seconds; k_quant: "
                             "llama.cpp-style, minutes)")
    export.add_argument("--int4-symmetric", action=argparse.BooleanOptionalAction, default=False,
                        help="int4: one scale per block and no zero point (default: asymmetric, more accurate)")
    export.add_argument("--int4-lm-head", choices=("int8", "int4"), default="int8",
                        help="int4: precision of the LM head (default int8: more accurate, slightly larger)")
    _verification_options(export)
    export.set_defaults(func=_export)

    add = adapter_commands.add_parser(
        "add", help="add or replace one adapter in an existing package (no graph rebuild)",
        description="Convert a PEFT adapter into PKG/adapters/NAME.onnx_adapter and register it in the manifest. "
        "Refuses adapters trained on another base or targeting modules the package graph lacks.",
    )
    add.add_argument("package", type=Path, metavar="PKG", help="package directory written by `loraplex export`")
    add.add_argument("adapter", metavar="NAME=DIR", help="adapter name and PEFT adapter directory")
    add.add_argument("--version", help="version label (default: first 12 hex digits of the file's sha256)")
    _verification_options(add)
    add.set_defaults(func=_add)

    merge = adapter_commands.add_parser(
        "merge", help="write a new PEFT adapter merged from several (cat, linear, ties, dare_linear, dare_ties)",
        description="Merge PEFT adapters with PEFT's add_weighted_adapter and write the result as a PEFT adapter "
        "directory recording its sources and weights (training.json); --add-to puts it in a package as "
        "`adapters add` does. cat is exactly the weighted sum of the adapters (a request's mix, made permanent).",
    )
    merge.add_argument("--adapter", action="append", required=True, metavar="NAME=DIR",
                       help="a source PEFT adapter (repeatable, in the order of --weight)")
    merge.add_argument("--weight", action="append", type=float, default=[], metavar="W",
                       help="each source's weight, in order (default: 1 each)")
    merge.add_argument("--combination", default="cat", choices=COMBINATIONS_CHOICES,
                       help="PEFT's combination_type (default cat: exact; linear needs equal ranks)")
    merge.add_argument("--density", type=float, help="ties/dare: the fraction of each source's weights kept")
    merge.add_argument("--out", type=Path, required=True, help="the new PEFT adapter directory")
    merge.add_argument("--base", type=Path, help="the base model directory (default: --add-to's package base)")
    merge.add_argument("--add-to", type=Path, metavar="PKG", help="also add the merge to this package")
    merge.add_argument("--name", help="its name in the package (default: the --out directory's name)")
    _verification_options(merge)
    merge.set_defaults(func=_merge)

    gguf = adapter_commands.add_parser(
        "export-gguf", help="write a trained adapter as a llama.cpp LoRA GGUF (llama.cpp, Ollama)",
        description="Convert a PEFT adapter into the LoRA GGUF llama.cpp loads (--lora, llama_adapter_lora_init), "
        "with the q/k row permutation llama.cpp's own conversion of the base applies. The base model's "
        "architecture and head counts come from --base (the HF directory it was trained on) or --package.",
    )
    gguf.add_argument("adapter", metavar="NAME=DIR", help="adapter name (recorded as general.name) and PEFT directory")
    gguf.add_argument("--out", type=Path, required=True, help="the .gguf file to write")
    source = gguf.add_mutually_exclusive_group(required=True)
    source.add_argument("--base", type=Path, help="Hugging Face base model directory the adapter was trained on")
    source.add_argument("--package", type=Path, help="a loraplex package exported from that base")
    gguf.add_argument("--outtype", choices=("f32", "f16"), default="f32",
                      help="tensor type: f32 (exact, llama.cpp's default) or f16 (half the size)")
    gguf.set_defaults(func=_export_gguf)


def _verification_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip the checks against PyTorch (parity and task accuracy)")
    parser.add_argument("--max-accuracy-drop", type=float, default=2.0, metavar="POINTS",
                        help="largest task-accuracy drop allowed from PyTorch fp32 to the package, in points (2 = 2%%)")
    parser.add_argument("--eval-data", action="append", default=[], metavar="NAME=FILE",
                        help="held-out JSON/JSONL records for an adapter trained elsewhere (default: its eval split)")
    parser.add_argument("--eval-examples", type=int, default=64, metavar="N",
                        help="held-out examples per adapter for the accuracy check")


def verification_from_args(args: argparse.Namespace):
    from loraplex.adapters.export.verify import Verification

    eval_data = dict(parse_named_dir(item) for item in args.eval_data)
    return Verification(max_accuracy_drop=args.max_accuracy_drop / 100, eval_data=eval_data,
                        eval_examples=args.eval_examples)


def parse_named_dir(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"{text!r} must be NAME=PATH, e.g. sentiment=artifacts/adapters/sentiment")
    return name, Path(path)


def export_inputs(args: argparse.Namespace) -> tuple[Path, dict[str, Path], dict[str, dict | None]]:
    """(base dir, {name: adapter dir}, {name: output contract declared in the task file}) from --adapter
    and/or --config."""
    adapters: dict[str, Path] = {}
    outputs: dict[str, dict | None] = {}
    base = args.base
    if args.config:
        from loraplex.adapters.package.output import OutputConstraint
        from loraplex.trainer.config import NO_OUTPUT, load_tasks_yaml

        config_base, tasks = load_tasks_yaml(args.config, base=args.base)
        base = base or config_base
        for task in tasks:
            if not (task.adapter_dir / "adapter_config.json").is_file():
                raise FileNotFoundError(
                    f"task {task.task!r}: no trained adapter in {task.adapter_dir}; "
                    f"run `loraplex train --config {args.config}` first"
                )
            adapters[task.task] = task.adapter_dir
            if task.output is not None:  # declared: it wins over what training recorded
                outputs[task.task] = None if task.output == NO_OUTPUT else OutputConstraint.from_dict(
                    task.output).to_dict()  # type: ignore[arg-type]
    for item in args.adapter:
        name, path = parse_named_dir(item)
        if name in adapters:
            raise ValueError(f"adapter name {name!r} is given twice")
        adapters[name] = path
    if base is None:
        raise ValueError("no base model: pass --base DIR (or a task file with 'base:')")
    if not adapters:
        raise ValueError("no adapters: pass --adapter NAME=DIR (repeatable) or --config TASKS_YAML")
    return base, adapters, outputs


def _export(args: argparse.Namespace) -> int:
    from loraplex.adapters.export import export_package
    from loraplex.adapters.export.base_graph import Int4Options

    try:
        base, adapters, outputs = export_inputs(args)
        timings: dict[str, float] = {}
        int4 = Int4Options(block_size=args.int4_block_size, accuracy_level=args.int4_accuracy_level,
                           algo=args.int4_algo, symmetric=args.int4_symmetric, lm_head_int8=args.int4_lm_head == "int8")
        manifest = export_package(base, adapters, args.out, precision=args.precision, device=args.device,
                                  provider=args.provider, int4=int4, verify=args.verify,
                                  verification=verification_from_args(args), progress=True, timings=timings,
                                  outputs=outputs)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"loraplex export: error: {exc}", file=sys.stderr)
        return 2
    print_summary(manifest, args.out, timings)
    return 0


def _add(args: argparse.Namespace) -> int:
    from loraplex.adapters.export import add_adapter
    from loraplex.adapters.package.manifest import Manifest

    try:
        name, path = parse_named_dir(args.adapter)
        add_adapter(args.package, name, path, version=args.version, verify=args.verify,
                    verification=verification_from_args(args))
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"loraplex adapters add: error: {exc}", file=sys.stderr)
        return 2
    print_summary(Manifest.load(args.package), args.package, {}, only=name)
    return 0


def _merge(args: argparse.Namespace) -> int:
    from loraplex.adapters.export.merge import MergeSource, merge_adapters
    from loraplex.adapters.package.manifest import Manifest

    try:
        named = [parse_named_dir(item) for item in args.adapter]
        weights = args.weight or [1.0] * len(named)
        if len(weights) != len(named):
            raise ValueError(f"{len(named)} --adapter but {len(weights)} --weight; give one weight per adapter")
        base = args.base or (Path(Manifest.load(args.add_to).base.source) if args.add_to else None)
        if base is None:
            raise ValueError("no base model: pass --base DIR (or --add-to PKG)")
        out = merge_adapters(base, [MergeSource(n, p, w) for (n, p), w in zip(named, weights, strict=True)],
                             args.out, combination=args.combination, density=args.density, verify=args.verify,
                             eval_data=dict(parse_named_dir(item) for item in args.eval_data),
                             eval_examples=args.eval_examples)
        parts = ", ".join(f"{n}*{w:g}" for (n, _), w in zip(named, weights, strict=True))
        print(f"wrote {out} ({args.combination} of {parts})")
        for source in json.loads((out / "training.json").read_text())["merge"]["sources"]:
            scores = source.get("accuracy")
            if scores is None:
                print(f"  {source['name']}: no held-out examples (no eval split recorded; --eval-data NAME=FILE)")
                continue
            metric = scores["metric"]
            print(f"  {source['name']} task ({scores['examples']} held-out examples, {metric}): source "
                  f"{scores['source'][metric]:.0%}, merged {scores['merged'][metric]:.0%}, same answer on "
                  f"{scores['agreement']:.0%} (PyTorch fp32)")
        if args.add_to:
            from loraplex.adapters.export import add_adapter

            name = args.name or out.name
            add_adapter(args.add_to, name, out, verify=args.verify, verification=verification_from_args(args))
            print_summary(Manifest.load(args.add_to), args.add_to, {}, only=name)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"loraplex adapters merge: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _export_gguf(args: argparse.Namespace) -> int:
    from loraplex.adapters.export.gguf_lora import GgufBase, export_gguf_lora

    try:
        name, path = parse_named_dir(args.adapter)
        base = GgufBase.from_base_dir(args.base) if args.base else GgufBase.from_package(args.package)
        out = export_gguf_lora(path, args.out, base, name=name, dtype=args.outtype)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"loraplex adapters export-gguf: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({out.stat().st_size / 1024:,.0f} KiB, {base.architecture}, {args.outtype})")
    return 0


def parity_text(parity) -> str:
    if parity is None:
        return "not checked"
    tokens = "equal" if parity.tokens_equal else "differ"
    return f"tokens {tokens}, Δlogit≤{parity.max_abs_logit_diff:.1g}"


def accuracy_text(accuracy) -> str:
    if accuracy is None:
        return "-"
    metric = accuracy.metric
    return (f"{accuracy.package[metric]:.0%} (PyTorch {accuracy.pytorch[metric]:.0%}, base "
            f"{accuracy.base[metric]:.0%}, n={accuracy.examples})")


def _kib(size: int) -> str:
    return f"{size / 1024:,.0f}" if size else "-"


def print_summary(manifest, package_dir: Path, timings: dict[str, float], only: str | None = None) -> None:
    """The summary table: adapter, version, rank, modules, sizes, parity, accuracy; then stage times."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{package_dir} ({manifest.precision}, {manifest.device})")
    columns = ("adapter", "version", "rank", "modules", "KiB", "PEFT KiB", "vs PyTorch", "exact match")
    for column in columns:
        table.add_column(column, justify="right" if column in ("rank", "KiB", "PEFT KiB") else "left")
    for name, entry in manifest.adapters.items():
        if only and name != only:
            continue
        modules = ",".join(m.removesuffix("_proj") for m in entry.target_modules)
        table.add_row(name, entry.version, str(entry.rank), modules, _kib(entry.size_bytes),
                      _kib(entry.peft_size_bytes), parity_text(entry.parity), accuracy_text(entry.accuracy))
    if manifest.base_parity is not None and not only:
        table.add_row("(base)", "-", "-", "-", "-", "-", parity_text(manifest.base_parity), "-")
    console = Console(width=None if sys.stdout.isatty() else 160)  # piped or captured: no wrapping at 80 columns
    console.print(table)
    if timings:
        console.print("stages: " + ", ".join(f"{stage} {seconds:.1f}s" for stage, seconds in timings.items()))
