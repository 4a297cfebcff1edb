"""Export subcommands: `loraplex export` and `loraplex adapters add`. Parsing only; the work is in `export`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loraplex.adapters.package.devices import DEVICES, PROVIDERS
from loraplex.adapters.package.manifest import PRECISIONS


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
    export.add_argument("--no-verify", dest="verify", action="store_false", help="skip the parity checks")
    export.set_defaults(func=_export)

    add = adapter_commands.add_parser(
        "add", help="add or replace one adapter in an existing package (no graph rebuild)",
        description="Convert a PEFT adapter into PKG/adapters/NAME.onnx_adapter and register it in the manifest. "
        "Refuses adapters trained on another base or targeting modules the package graph lacks.",
    )
    add.add_argument("package", type=Path, metavar="PKG", help="package directory written by `loraplex export`")
    add.add_argument("adapter", metavar="NAME=DIR", help="adapter name and PEFT adapter directory")
    add.add_argument("--version", help="version label (default: first 12 hex digits of the file's sha256)")
    add.add_argument("--no-verify", dest="verify", action="store_false", help="skip the parity check")
    add.set_defaults(func=_add)


def parse_named_dir(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"adapter {text!r} must be NAME=DIR, e.g. sentiment=artifacts/adapters/sentiment")
    return name, Path(path)


def adapters_from_args(args: argparse.Namespace) -> tuple[Path, dict[str, Path]]:
    """(base dir, {name: adapter dir}) from --adapter and/or --config."""
    adapters: dict[str, Path] = {}
    base = args.base
    if args.config:
        from loraplex.trainer.config import load_tasks_yaml

        config_base, tasks = load_tasks_yaml(args.config, base=args.base)
        base = base or config_base
        for task in tasks:
            if not (task.adapter_dir / "adapter_config.json").is_file():
                raise FileNotFoundError(
                    f"task {task.task!r}: no trained adapter in {task.adapter_dir}; "
                    f"run `loraplex train --config {args.config}` first"
                )
            adapters[task.task] = task.adapter_dir
    for item in args.adapter:
        name, path = parse_named_dir(item)
        if name in adapters:
            raise ValueError(f"adapter name {name!r} is given twice")
        adapters[name] = path
    if base is None:
        raise ValueError("no base model: pass --base DIR (or a task file with 'base:')")
    if not adapters:
        raise ValueError("no adapters: pass --adapter NAME=DIR (repeatable) or --config TASKS_YAML")
    return base, adapters


def _export(args: argparse.Namespace) -> int:
    from loraplex.adapters.export import export_package

    try:
        base, adapters = adapters_from_args(args)
        timings: dict[str, float] = {}
        manifest = export_package(base, adapters, args.out, precision=args.precision, device=args.device,
                                  provider=args.provider, verify=args.verify, progress=True, timings=timings)
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
        add_adapter(args.package, name, path, version=args.version, verify=args.verify)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"loraplex adapters add: error: {exc}", file=sys.stderr)
        return 2
    print_summary(Manifest.load(args.package), args.package, {}, only=name)
    return 0


def parity_text(parity) -> str:
    if parity is None:
        return "not checked"
    tokens = "equal" if parity.tokens_equal else "differ"
    return f"tokens {tokens}, Δlogit≤{parity.max_abs_logit_diff:.1g} vs {parity.reference}"


def print_summary(manifest, package_dir: Path, timings: dict[str, float], only: str | None = None) -> None:
    """The summary table: adapter, version, rank, modules, size, parity; then the export's stage times."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{package_dir} ({manifest.precision}, {manifest.device}, LoRA rank {manifest.lora_rank})")
    for column in ("adapter", "version", "rank", "modules", "size", "parity"):
        table.add_column(column, justify="right" if column in ("rank", "size") else "left")
    for name, entry in manifest.adapters.items():
        if only and name != only:
            continue
        modules = ",".join(m.removesuffix("_proj") for m in entry.target_modules)
        table.add_row(name, entry.version, str(entry.rank), modules,
                      f"{entry.size_bytes / 1024:.0f} KiB", parity_text(entry.parity))
    if manifest.base_parity is not None and not only:
        table.add_row("(base)", "-", "-", "-", "-", parity_text(manifest.base_parity))
    console = Console()
    console.print(table)
    if timings:
        console.print("stages: " + ", ".join(f"{stage} {seconds:.1f}s" for stage, seconds in timings.items()))
