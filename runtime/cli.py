"""`loraplex` command line: parses arguments and calls library functions that tests also call.

Each stage registers its own subcommands; handlers import heavy modules only when run, so
`loraplex serve` never imports torch.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from loraplex.adapters.export import cli as export_cli
    from loraplex.runtime import commands as runtime_commands
    from loraplex.trainer import cli as trainer_cli

    parser = argparse.ArgumentParser(
        prog="loraplex", description="One base model, many LoRA task adapters, one gRPC server."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    adapters = commands.add_parser("adapters", help="manage adapters in a package or a running server")
    adapter_commands = adapters.add_subparsers(dest="adapters_command", required=True, metavar="ACTION")

    trainer_cli.register(commands)
    export_cli.register(commands, adapter_commands)
    runtime_commands.register(commands, adapter_commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
