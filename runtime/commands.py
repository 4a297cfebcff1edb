"""Runtime subcommands: serve, generate, demo, adapters list|load|unload."""

from __future__ import annotations

import argparse
import sys


def register(commands: argparse._SubParsersAction, adapter_commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser("demo", help="the main job: train, export, serve and query the demo tasks")
    demo.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    print("loraplex demo: the server is not built yet (issue 4); nothing to run.", file=sys.stderr)
    return 2
