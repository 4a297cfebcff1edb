"""`loraplex` command line: parses arguments and calls library functions that tests also call.

Each stage registers its own subcommands; handlers import heavy modules only when run, so
`loraplex serve` never imports torch.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from loraplex.adapters.export import cli as export_cli
    from loraplex.runtime import commands as runtime_commands
    from loraplex.trainer import base_cli
    from loraplex.trainer import cli as trainer_cli

    parser = argparse.ArgumentParser(
        prog="loraplex", description="One base model, many LoRA task adapters, one gRPC server."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    adapters = commands.add_parser("adapters", help="manage adapters in a package or a running server")
    adapter_commands = adapters.add_subparsers(dest="adapters_command", required=True, metavar="ACTION")

    trainer_cli.register(commands)
    base_cli.register(commands)
    export_cli.register(commands, adapter_commands)
    runtime_commands.register(commands, adapter_commands)
    return parser


def quiet_when_piped() -> None:
    """Progress bars only where a person watches a terminal; no third-party deprecation notices.

    Piped (logs, CI, `make demo > file`) a progress bar writes a carriage-return update per step;
    tqdm and Hugging Face's bars read these variables when first used. PEFT calls a transformers
    method that transformers 5 deprecates (`is_gradient_checkpointing`): not the user's concern.
    """
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_when_piped()
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
