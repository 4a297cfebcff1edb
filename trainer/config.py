"""The trainer's one typed configuration: used by the CLI, the YAML task file and `training.json`.

Every field carries its help text in `metadata["help"]` (the CLI builds its options from it), so
the three surfaces cannot drift apart. Stdlib + PyYAML only: the export stage and the server's
demo read task files without importing torch.

A task file (`loraplex train --config tasks.yaml`, `loraplex export --config tasks.yaml`):

    base: ../tiny_base          # optional; relative paths resolve against the YAML's folder
    out: ../artifacts/adapters  # each task's adapter is written to <out>/<task>/
    defaults:                   # any TaskConfig field, applied to every task
      rank: 8
      learning_rate: 0.003
    tasks:
      sentiment:                # the task name; per-task keys override the defaults
        data: sentiment.jsonl
        prompt_template: "Review: {text}\\nSentiment:"
        completion_template: " {label}"
        metric: accuracy        # optional: auto (default) infers it from the data
        search:                 # optional: the space of `loraplex train --search N` (see search_space.py)
          learning_rate: [0.001, 0.01]
          rank: [4, 8]
        output:                 # optional: the output contract the server enforces by default
          kind: choice          # regex | json_schema | grammar | choice; `output: none` for free text;
          spec: [" positive", " negative"]  # unset: the labels, when the completions form a small closed set
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from loraplex.adapters.package.output import OutputConstraint, OutputSpecError
from loraplex.adapters.package.template import PromptTemplate, TemplateError
from loraplex.trainer.search_space import SearchSpace, SearchSpaceError

NO_OUTPUT = "none"  # `output: none`: no output contract, not even an inferred one

Method = Literal["lora", "qlora"]
LrScheduler = Literal["linear", "cosine", "constant"]
MetricChoice = Literal["auto", "exact_match", "accuracy", "macro_f1", "rouge_l", "bleu", "perplexity"]
ReportTo = Literal["none", "tensorboard"]
METHODS: tuple[str, ...] = get_args(Method)
LR_SCHEDULERS: tuple[str, ...] = get_args(LrScheduler)
METRIC_CHOICES: tuple[str, ...] = get_args(MetricChoice)
REPORT_TO: tuple[str, ...] = get_args(ReportTo)

TRAINING_JSON = "training.json"
CHECKPOINT_DIR = "checkpoints"
# The step budget when neither max_steps nor epochs is set: generous, early stopping decides.
DEFAULT_MAX_STEPS = 1000
# Evaluate once per epoch, but at least this often (steps), when eval_steps is not set.
DEFAULT_EVAL_STEPS = 50


class ConfigError(ValueError):
    """A training configuration or task file is invalid; the message names the field and the fix."""


def _help(text: str, **extra: Any) -> dict[str, Any]:
    """Field metadata: `help` for the CLI and docs; `cli=False` for options only a task file can set."""
    return {"help": text, **extra}


@dataclass
class TaskConfig:
    """Everything that defines one task's adapter: data, template, LoRA shape and training schedule."""

    # What to learn.
    task: str = field(metadata=_help("task name; also the adapter's name and its output sub-directory"))
    data: Path = field(metadata=_help("training data: a JSON array or JSONL file of records (objects)"))
    prompt_template: str = field(
        metadata=_help("what the model is given, fields in braces, e.g. 'Review: {text}\\nSentiment:'")
    )
    completion_template: str = field(
        metadata=_help("what the model must produce after the prompt, e.g. ' {label}'; loss is taken on it only")
    )
    out: Path = field(default=Path("adapters"), metadata=_help("output root: the adapter is written to OUT/TASK/"))
    method: Method = field(default="lora", metadata=_help("lora, or qlora (4-bit base; needs CUDA and bitsandbytes)"))
    metric: MetricChoice = field(
        default="auto",
        metadata=_help(
            "the eval metric that selects the checkpoint and the search's best trial: accuracy or macro_f1 "
            "(label tasks), rouge_l or bleu (generated text), exact_match, perplexity; auto = accuracy when the "
            "completions form a small closed set, else rouge_l"
        ),
    )

    # LoRA shape.
    rank: int = field(default=8, metadata=_help("LoRA rank r"))
    alpha: float = field(default=16.0, metadata=_help("LoRA alpha; the update is scaled by alpha/r"))
    dropout: float = field(default=0.0, metadata=_help("dropout on the LoRA branch input"))
    target_modules: list[str] | None = field(
        default=None,
        metadata=_help("module names to adapt; default: every attention and MLP projection of the architecture"),
    )
    use_rslora: bool = field(default=False, metadata=_help("rank-stabilised LoRA: scale by alpha/sqrt(r)"))

    # Schedule.
    learning_rate: float = field(default=2e-3, metadata=_help("peak learning rate (AdamW)"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay"))
    lr_scheduler: LrScheduler = field(
        default="linear", metadata=_help("linear | cosine | constant, after warmup; decays over the step budget")
    )
    warmup_steps: int = field(default=0, metadata=_help("optimizer steps of linear warmup from 0"))
    max_steps: int | None = field(
        default=None,
        metadata=_help(
            f"step budget (optimizer steps); early stopping usually ends training sooner; "
            f"default: epochs if set, else {DEFAULT_MAX_STEPS}"
        ),
    )
    epochs: float | None = field(
        default=None, metadata=_help("step budget in passes over the training split (ignored with max_steps)")
    )
    batch_size: int = field(default=16, metadata=_help("records per micro-batch"))
    gradient_accumulation: int = field(default=1, metadata=_help("micro-batches per optimizer step"))
    max_grad_norm: float | None = field(default=1.0, metadata=_help("gradient clipping norm; null = off"))
    seed: int = field(default=0, metadata=_help("seed for LoRA init, eval split, data order and dropout"))

    # Evaluation, early stopping, checkpoints.
    eval_split: float = field(
        default=0.1,
        metadata=_help("fraction of records held out for evaluation (0 = none: no metric, no early stopping)"),
    )
    eval_steps: int | None = field(
        default=None,
        metadata=_help(f"evaluate every N optimizer steps; default: each epoch, at most {DEFAULT_EVAL_STEPS} apart"),
    )
    eval_metric_limit: int | None = field(
        default=256,
        metadata=_help(
            "score the eval metric on at most this many eval records at each evaluation (a fixed sample; "
            "the final figures use the whole eval split); null = all"
        ),
    )
    early_stopping_patience: int | None = field(
        default=3,
        metadata=_help(
            "stop after this many evaluations in which neither the eval metric nor the eval loss improved; "
            "needs an eval split; null = train the whole step budget"
        ),
    )
    restore_best: bool = field(
        default=True,
        metadata=_help("save the weights of the evaluation with the best eval metric (ties: lower eval loss)"),
    )
    logging_steps: int = field(default=1, metadata=_help("record the mean train loss every N optimizer steps"))
    report_to: ReportTo = field(
        default="none", metadata=_help("none, or tensorboard: event files in OUT/TASK/tensorboard")
    )
    checkpoint_every: int | None = field(
        default=None, metadata=_help("write a resumable checkpoint every N optimizer steps; null = never")
    )
    resume: bool = field(default=False, metadata=_help("continue from the last checkpoint in OUT/TASK/checkpoints"))
    search: SearchSpace | None = field(
        default=None,
        metadata=_help("the space `--search N` samples (task file only; see loraplex.trainer.search_space)", cli=False),
    )
    output: dict[str, Any] | str | None = field(
        default=None,
        metadata=_help(
            "the task's output contract the server enforces by default (task file only): {kind, spec} with kind "
            "regex, json_schema, grammar or choice; 'none' for free text; unset = a choice of the labels when "
            "the completions form a small closed set, else none",
            cli=False,
        ),
    )

    def __post_init__(self) -> None:
        self.data = Path(self.data)
        self.out = Path(self.out)
        if self.search is not None and not isinstance(self.search, SearchSpace):
            try:
                self.search = SearchSpace.from_dict(self.search)
            except SearchSpaceError as exc:
                raise ConfigError(f"task {self.task!r}: {exc} (under 'search:' in the task file)") from exc
        if self.output is not None and self.output != NO_OUTPUT:
            try:
                OutputConstraint.from_dict(self.output)  # type: ignore[arg-type]
            except OutputSpecError as exc:
                raise ConfigError(f"task {self.task!r}: {exc} (under 'output:' in the task file; or 'none')") from exc
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                self.target_modules = [m.strip() for m in self.target_modules.split(",") if m.strip()]
            self.target_modules = list(self.target_modules)
        self.validate()

    @property
    def template(self) -> PromptTemplate:
        return PromptTemplate(prompt=self.prompt_template, completion=self.completion_template)

    @property
    def adapter_dir(self) -> Path:
        """Where the PEFT adapter and `training.json` are written: OUT/TASK."""
        return self.out / self.task

    @property
    def checkpoint_dir(self) -> Path:
        return self.adapter_dir / CHECKPOINT_DIR

    def step_budget(self, steps_per_epoch: int) -> int:
        """Optimizer steps to train at most: max_steps, else epochs' worth, else DEFAULT_MAX_STEPS."""
        if self.max_steps is not None:
            return self.max_steps
        if self.epochs is not None:
            return max(1, math.ceil(self.epochs * steps_per_epoch))
        return DEFAULT_MAX_STEPS

    def eval_interval(self, steps_per_epoch: int) -> int:
        """Optimizer steps between evaluations: eval_steps, else one epoch but at most DEFAULT_EVAL_STEPS."""
        return self.eval_steps or max(1, min(steps_per_epoch, DEFAULT_EVAL_STEPS))

    def validate(self) -> None:
        where = f"task {self.task!r}"
        if not self.task or "/" in self.task or self.task in (".", ".."):
            raise ConfigError(f"task name {self.task!r} is invalid: it names a directory, use e.g. 'sentiment'")
        try:
            template = self.template
        except TemplateError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        if not template.completion_fields and not self.completion_template.strip():
            raise ConfigError(f"{where}: completion_template is empty; say what the model must learn to produce")
        closed_sets = {"method": METHODS, "lr_scheduler": LR_SCHEDULERS, "metric": METRIC_CHOICES,
                       "report_to": REPORT_TO}  # fmt: skip
        for name, choices in closed_sets.items():
            if getattr(self, name) not in choices:
                raise ConfigError(
                    f"{where}: {name} {getattr(self, name)!r} is unknown; choose one of {', '.join(choices)}"
                )
        positive = dict(rank=self.rank, batch_size=self.batch_size, gradient_accumulation=self.gradient_accumulation,
                        logging_steps=self.logging_steps)  # fmt: skip
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{where}: {name} must be a positive integer, got {value!r}")
        if not 0.0 <= self.eval_split < 1.0:
            raise ConfigError(f"{where}: eval_split must be in [0, 1), got {self.eval_split!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{where}: dropout must be in [0, 1), got {self.dropout!r}")
        if self.learning_rate <= 0 or not math.isfinite(self.learning_rate):
            raise ConfigError(f"{where}: learning_rate must be positive, got {self.learning_rate!r}")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"{where}: epochs must be > 0, got {self.epochs!r}; or leave it unset (step budget)")
        optional_positive = {
            "max_steps": self.max_steps,
            "eval_steps": self.eval_steps,
            "eval_metric_limit": self.eval_metric_limit,
            "early_stopping_patience": self.early_stopping_patience,
            "checkpoint_every": self.checkpoint_every,
        }
        for name, value in optional_positive.items():
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{where}: {name} must be a positive integer or null, got {value!r}")
        if self.target_modules is not None and not self.target_modules:
            raise ConfigError(f"{where}: target_modules is empty; leave it unset for all projections")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the hyper-parameters recorded in `training.json` and read back by `from_dict`."""
        data = dataclasses.asdict(self)
        data["data"] = str(self.data)
        data["out"] = str(self.out)
        data["search"] = self.search.to_dict() if self.search is not None else None
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "config") -> TaskConfig:
        unknown = sorted(set(data) - set(field_names()))
        if unknown:
            raise ConfigError(
                f"{where}: unknown option {unknown[0]!r}; valid options are: {', '.join(field_names())}"
            )
        missing = [f.name for f in dataclasses.fields(cls) if _required(f) and f.name not in data]
        if missing:
            raise ConfigError(f"{where}: missing required option {missing[0]!r}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"{where}: {exc}") from exc


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TaskConfig)]


def config_fields() -> list[dataclasses.Field]:
    """The fields with their types and help, for building command-line options (task-file-only ones left out)."""
    return [f for f in dataclasses.fields(TaskConfig) if f.metadata.get("cli", True)]


def load_tasks_yaml(
    path: str | Path, *, base: str | Path | None = None, out: str | Path | None = None
) -> tuple[Path | None, list[TaskConfig]]:
    """Read a multi-task file: returns (base model dir or None, one TaskConfig per task, in file order).

    `base` and `out` given here override the file's. Relative `base`, `out` and `data` paths in the
    file resolve against the file's folder, so a task file travels with its data.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"task file {path} not found")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"task file {path} is not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"task file {path}: expected a mapping with 'tasks', got {type(doc).__name__}")
    unknown = sorted(set(doc) - {"base", "out", "defaults", "tasks"})
    if unknown:
        raise ConfigError(f"task file {path}: unknown top-level key {unknown[0]!r}; use base, out, defaults, tasks")
    folder = path.resolve().parent

    def resolve(value: str | Path) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else (folder / p).resolve()

    base_dir = Path(base) if base is not None else (resolve(doc["base"]) if doc.get("base") else None)
    out_dir = Path(out) if out is not None else resolve(doc.get("out") or "adapters")
    defaults = doc.get("defaults") or {}
    tasks = doc.get("tasks")
    if not isinstance(defaults, dict):
        raise ConfigError(f"task file {path}: 'defaults' must be a mapping of options")
    if not isinstance(tasks, dict) or not tasks:
        raise ConfigError(f"task file {path}: 'tasks' must map each task name to its options (data, templates)")

    configs = []
    for name, options in tasks.items():
        options = options or {}
        if not isinstance(options, dict):
            raise ConfigError(f"task file {path}: task {name!r} must be a mapping of options")
        merged: dict[str, Any] = {**defaults, **options, "task": str(name)}
        if isinstance(defaults.get("search"), dict) and isinstance(options.get("search"), dict):
            merged["search"] = {**defaults["search"], **options["search"]}  # the task's keys win
        # The caller's out wins, then the task's, the defaults', the file's.
        merged["out"] = out_dir if out is not None or "out" not in merged else resolve(merged["out"])
        if "data" in merged:
            merged["data"] = resolve(merged["data"])
        configs.append(TaskConfig.from_dict(merged, where=f"task file {path}, task {name!r}"))
    return base_dir, configs
