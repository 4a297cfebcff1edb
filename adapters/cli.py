"""Export subcommands: `loraplex export` and `loraplex adapters add`."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction, adapter_commands: argparse._SubParsersAction) -> None:
    """Export commands are registered here (issue 3)."""
