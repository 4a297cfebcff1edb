"""Trainer subcommands: `loraplex tiny-base` and `loraplex train`.

`train`'s options are generated from `TaskConfig`'s fields and help, so the CLI, the YAML task
file and training.json name every option the same way (`--learning-rate` = `learning_rate`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Any

# Given on the command line as their own flags (and required without --config).
_TASK_FIELDS = ("task", "data", "prompt_template", "completion_template", "out")


def register(commands: argparse._SubParsersAction) -> None:
    tiny = commands.add_parser("tiny-base", help="write a small random-init model and tokenizer (tests, demo)")
    tiny.add_argument("--out", required=True, help="directory to write the model to")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--arch", default="llama", help="llama | mistral | qwen2 | phi3")
    tiny.set_defaults(func=_tiny_base)

    train = commands.add_parser(
        "train",
        help="train one LoRA adapter per task on a base model",
        description="Train a LoRA adapter: either one task from flags, or every task of a YAML file (--config). "
        "Options given with --config override the file's for every task.",
    )
    train.add_argument("--base", help="base model directory (Hugging Face format); overrides the YAML's base")
    train.add_argument("--config", help="YAML task file (base, out, defaults, tasks); see loraplex.trainer.config")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 suits tiny models)")
    train.add_argument("--search", dest="search_trials", type=int, default=0, metavar="N",
                       help="hyper-parameter search: train N trials per task (Optuna TPE) within the task file's "
                       "'search' space (default: learning rate, rank, batch size) and keep the best by the eval "
                       "metric")  # fmt: skip
    train.add_argument("--search-timeout", type=float, metavar="SECONDS",
                       help="stop each task's search after this many seconds (the running trial keeps its best)")
    add_config_options(train)
    train.set_defaults(func=_train)


def _option_type(f: dataclasses.Field) -> dict[str, Any]:
    from loraplex.trainer.config import TaskConfig

    hint = typing.get_type_hints(TaskConfig)[f.name]
    if typing.get_origin(hint) is typing.Literal:
        return {"type": str, "choices": typing.get_args(hint)}
    kind = str(f.type)
    if kind.startswith("bool"):
        return {"action": argparse.BooleanOptionalAction}
    if kind.startswith("list"):
        return {"nargs": "+", "metavar": "NAME"}
    if kind.startswith("int"):
        return {"type": int}
    if kind.startswith("float"):
        return {"type": float}
    return {"type": str}


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One `--kebab-name` per TaskConfig field; unset options stay out of the namespace (SUPPRESS)."""
    from loraplex.trainer.config import config_fields

    for f in config_fields():
        default = "" if f.default is dataclasses.MISSING else f" (default: {f.default})"
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=argparse.SUPPRESS,
            help=f.metadata["help"] + default,
            **_option_type(f),
        )


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    from loraplex.trainer.config import config_fields

    return {f.name: getattr(args, f.name) for f in config_fields() if hasattr(args, f.name)}


def _train(args: argparse.Namespace) -> int:
    from loraplex.adapters.package.template import TemplateError
    from loraplex.trainer.base_model import BaseModelError
    from loraplex.trainer.config import ConfigError, TaskConfig, load_tasks_yaml
    from loraplex.trainer.dataset import DatasetError
    from loraplex.trainer.train import QLoRAUnavailable, train_tasks

    options = overrides_from_args(args)
    try:
        if args.config:
            base, configs = load_tasks_yaml(args.config, base=args.base, out=options.pop("out", None))
            only = options.pop("task", None)
            if only is not None:
                configs = [c for c in configs if c.task == only]
                if not configs:
                    raise ConfigError(f"task {only!r} is not in {args.config}")
            configs = [TaskConfig.from_dict({**c.to_dict(), **options}, where=f"task {c.task!r}") for c in configs]
        else:
            missing = [f"--{name.replace('_', '-')}" for name in _TASK_FIELDS if name not in options]
            if missing or not args.base:
                raise ConfigError(
                    f"missing {', '.join((['--base'] if not args.base else []) + missing)}; "
                    "give every one of them, or --config tasks.yaml"
                )
            base, configs = args.base, [TaskConfig.from_dict(options, where="command line")]
        if base is None:
            raise ConfigError("no base model: pass --base DIR or set 'base' in the task file")
        train_tasks(base, configs, progress=not args.no_progress, num_threads=args.threads, search=args.search_trials,
                    search_timeout=args.search_timeout)
    except (ConfigError, DatasetError, TemplateError, BaseModelError, QLoRAUnavailable) as exc:
        print(f"loraplex train: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _tiny_base(args: argparse.Namespace) -> int:
    from loraplex.trainer.tiny_base import build_tiny_base

    out = build_tiny_base(args.out, seed=args.seed, architecture=args.arch)
    print(f"wrote tiny {args.arch} base model to {out}")
    return 0
