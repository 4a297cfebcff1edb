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

# Server starts register only the runtime's commands: the other stages' argument modules take
# ~0.1 s to import, a tenth of a device's start-to-first-token budget.
SERVING_COMMANDS = frozenset({"serve", "serve-ray"})


def build_parser(serving_only: bool = False) -> argparse.ArgumentParser:
    """Every stage's subcommands, or (`serving_only`) the runtime's alone."""
    from loraplex.runtime.app import commands as runtime_commands

    parser = argparse.ArgumentParser(
        prog="loraplex", description="One base model, many LoRA task adapters, one gRPC server."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    adapters = commands.add_parser("adapters", help="manage adapters in a package or a running server")
    adapter_commands = adapters.add_subparsers(dest="adapters_command", required=True, metavar="ACTION")

    if not serving_only:
        from loraplex.adapters.export import cli as export_cli
        from loraplex.trainer import base_cli
        from loraplex.trainer import cli as trainer_cli

        trainer_cli.register(commands)
        base_cli.register(commands)
        export_cli.register(commands, adapter_commands)
    runtime_commands.register(commands, adapter_commands)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand `argv` names (its first word that is not an option), or None."""
    return next((word for word in argv if not word.startswith("-")), None)


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
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(serving_only=_command(argv) in SERVING_COMMANDS).parse_args(argv)
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
