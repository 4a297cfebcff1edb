"""Trainer subcommands: `loraplex tiny-base` and `loraplex train`."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    tiny = commands.add_parser("tiny-base", help="write a small random-init model and tokenizer (tests, demo)")
    tiny.add_argument("--out", required=True, help="directory to write the model to")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--arch", default="llama", help="llama | mistral | qwen2 | phi3")
    tiny.set_defaults(func=_tiny_base)


def _tiny_base(args: argparse.Namespace) -> int:
    from loraplex.trainer.tiny_base import build_tiny_base

    out = build_tiny_base(args.out, seed=args.seed, architecture=args.arch)
    print(f"wrote tiny {args.arch} base model to {out}")
    return 0
