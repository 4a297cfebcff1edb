"""The training loop: one fresh LoRA per task on a base model loaded once.

A plain PyTorch loop (no HF Trainer): on a tiny model and 2 CPU cores the Trainer's per-step
overhead is larger than the step itself, and a loop whose data order is a pure function of
(seed, step) makes checkpoint/resume exact.

Training runs within a step budget (max_steps, else epochs, else DEFAULT_MAX_STEPS) and early
stopping on the task's eval metric decides when to stop (stopping.py); the weights of the best
evaluation are kept. Output per task, in OUT/TASK/: a standard PEFT adapter
(`adapter_config.json`, `adapter_model.safetensors`), `training.json` (record.py) and
`curves.png`, plus TensorBoard event files with `report_to: tensorboard`.
"""

from __future__ import annotations

import importlib.util
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraplex.trainer.base_model import base_identity, load_base_model, resolve_target_modules
from loraplex.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from loraplex.trainer.config import CHECKPOINT_DIR, ConfigError, TaskConfig
from loraplex.trainer.dataset import Example, check_records, collate, read_records, split_indices, tokenize_record
from loraplex.trainer.evaluate import Scores, TaskEvaluator
from loraplex.trainer.metrics import MetricError, check_metric_fits
from loraplex.trainer.output_contract import output_contract
from loraplex.trainer.stopping import TrainingState

StepHook = Callable[[int, float], None]  # (optimizer step just finished, its train loss)


class QLoRAUnavailable(RuntimeError):
    """QLoRA was asked for on a machine without CUDA or bitsandbytes."""


@dataclass
class TrainingResult:
    task: str
    adapter_dir: Path
    training: dict[str, Any] = field(repr=False)  # the contents of training.json


@dataclass
class TaskData:
    """A task's tokenized data, split, and how it is scored: prepared once, shared by search trials."""

    train_set: list[Example]
    eval_set: list[Example]
    evaluator: TaskEvaluator
    base_scores: Scores | None = None  # the base model's figures, computed once when first needed
    output: dict[str, Any] | None = None  # the task's output contract (declared or inferred), or None


def check_method(method: str) -> None:
    """Fail at once, before loading anything, when QLoRA cannot run here."""
    if method != "qlora":
        return
    import torch

    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package (pip install bitsandbytes)")
    if missing:
        raise QLoRAUnavailable(
            "--method qlora needs " + " and ".join(missing) + "; use --method lora to train in float32 on this machine"
        )


def train_tasks(
    base_dir: str | Path,
    configs: Sequence[TaskConfig],
    *,
    progress: bool = True,
    summary: bool = True,
    on_step: StepHook | None = None,
    num_threads: int | None = None,
    search: int = 0,
    search_timeout: float | None = None,
) -> list[TrainingResult]:
    """Train one adapter per config on the base in `base_dir`, loading the base once.

    `search` > 0 runs that many hyper-parameter trials per task (search.py) and keeps the best;
    `search_timeout` bounds each task's search in seconds. `num_threads` sets torch's CPU threads
    for the run (restored after). On a tiny model one thread is as fast as two, and on a busy
    machine far faster: a spinning second thread that shares a core with another process made a
    step 13x slower in our measurements.
    """
    import torch

    started = time.perf_counter()
    check_tasks(configs, search, search_timeout)
    identity = base_identity(base_dir)
    threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        with _quiet_library_progress(progress):
            model, tokenizer = load_base_model(base_dir, quantize_4bit=configs[0].method == "qlora")
            loaded = time.perf_counter()
            results = []
            for config in configs:
                if search:
                    from loraplex.trainer.search import search_task

                    result = search_task(model, tokenizer, config, identity, trials=search, timeout=search_timeout,
                                         progress=progress)  # fmt: skip
                else:
                    result = train_task(model, tokenizer, config, identity, progress=progress, on_step=on_step)
                results.append(result)
    finally:
        torch.set_num_threads(threads)
    if summary:
        from loraplex.trainer.summary import print_summary

        print_summary(results, total_s=time.perf_counter() - started, base_load_s=loaded - started)
    return results


def check_tasks(configs: Sequence[TaskConfig], search: int = 0, search_timeout: float | None = None) -> None:
    """Everything that can fail without the base model, for every task: before task 1 trains, not after."""
    if not configs:
        raise ConfigError("no tasks to train")
    methods = {c.method for c in configs}
    if len(methods) > 1:
        raise ConfigError(f"tasks trained together share one loaded base; they mix methods {sorted(methods)}")
    if search:
        from loraplex.trainer.search import check_search

        for config in configs:
            check_search(config, search, search_timeout)
    check_method(configs[0].method)
    for config in configs:
        task_kind(config, read_records(config.data))


def train(base_dir: str | Path, config: TaskConfig, **kwargs: Any) -> TrainingResult:
    """One task: `train_tasks(base_dir, [config])[0]`."""
    return train_tasks(base_dir, [config], **kwargs)[0]


@contextmanager
def _quiet_library_progress(progress: bool) -> Iterator[None]:
    """transformers draws its own bars (loading, saving weights): only on a terminal someone watches."""
    import sys

    from transformers.utils import logging as hf_logging

    quiet = not progress or not sys.stderr.isatty()
    was_disabled = hf_logging.is_progress_bar_enabled() is False
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and not was_disabled:
            hf_logging.enable_progress_bar()


def task_kind(config: TaskConfig, records: list[dict[str, Any]]) -> str:
    """Check the records against the template and the declared metric; the task's kind (errors name the task)."""
    check_records(records, config.template, config.data, task=config.task)
    completions = [config.template.render_completion(r) for r in records]
    try:
        return check_metric_fits(config.metric, completions, where=f"task {config.task!r}")
    except MetricError as exc:
        raise ConfigError(str(exc)) from exc


def prepare_task(config: TaskConfig, model: Any, tokenizer: Any) -> TaskData:
    """Read, check, split and tokenize a task's data; decide its kind and metrics (errors name the task)."""
    max_length = getattr(model.config, "max_position_embeddings", None)
    records = read_records(config.data)
    kind = task_kind(config, records)
    examples = [tokenize_record(r, i, config.template, tokenizer, max_length) for i, r in enumerate(records)]
    train_idx, eval_idx = split_indices(len(examples), config.eval_split, config.seed, where=str(config.data))
    eval_set = [examples[i] for i in eval_idx]
    evaluator = TaskEvaluator.for_task(examples, eval_set, kind=kind, metric=config.metric,
                                       limit=config.eval_metric_limit, seed=config.seed,
                                       pad_id=tokenizer.pad_token_id)  # fmt: skip
    completions = [config.template.render_completion(r) for r in records]
    return TaskData([examples[i] for i in train_idx], eval_set, evaluator,
                    output=output_contract(config, completions, kind))


def micro_batch_indices(n: int, batch_size: int, seed: int, micro_step: int) -> list[int]:
    """Training-split positions of micro-batch number `micro_step`: epoch e uses a permutation seeded by
    (seed, e). A pure function of its arguments, so resuming needs no data-loader state."""
    import torch

    per_epoch = math.ceil(n / batch_size)
    epoch, position = divmod(micro_step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    return order[position * batch_size : (position + 1) * batch_size]


def _lr_lambda(config: TaskConfig, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        if config.lr_scheduler == "constant":
            return 1.0
        progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
        if config.lr_scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1.0 - progress)

    return factor


def _lora_state(model: Any) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def _load_lora_state(model: Any, state: dict[str, Any]) -> None:
    params = dict(model.named_parameters())
    for name, value in state.items():
        params[name].data.copy_(value)


def _add_lora(model: Any, config: TaskConfig, targets: list[str]) -> Any:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets,
        use_rslora=config.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # PEFT reads the deprecated `is_gradient_checkpointing` property (transformers 5 warns; PEFT 0.21).
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora)


def train_task(
    model: Any,
    tokenizer: Any,
    config: TaskConfig,
    identity: dict[str, str],
    *,
    progress: bool = True,
    on_step: StepHook | None = None,
    data: TaskData | None = None,
    out_dir: Path | None = None,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> TrainingResult:
    """Train a fresh LoRA on `model` (left unchanged afterwards), write the adapter and training.json.

    `data`: the task prepared by `prepare_task` (search trials share it). `out_dir`: where to write
    (default OUT/TASK). `deadline` (on `clock`): stop training then and keep the best so far.
    """
    import torch
    from loraplex.trainer.logs import TENSORBOARD_DIR, TrainingLog
    from loraplex.trainer.record import finish_task
    from tqdm.auto import tqdm

    started = time.perf_counter()
    data = data or prepare_task(config, model, tokenizer)
    out = out_dir or config.adapter_dir
    checkpoint_dir = out / CHECKPOINT_DIR
    targets = resolve_target_modules(config.target_modules, identity["model_type"], model)
    steps_per_epoch = math.ceil(len(data.train_set) / (config.batch_size * config.gradient_accumulation))
    total_steps = config.step_budget(steps_per_epoch)
    eval_every = config.eval_interval(steps_per_epoch)

    torch.manual_seed(config.seed)
    peft_model = _add_lora(model, config, targets)
    log = None
    try:
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, total_steps))
        patience = config.early_stopping_patience if data.eval_set else None
        state = TrainingState(metric=data.evaluator.primary, patience=patience, total_steps=total_steps)
        checkpoint = latest_checkpoint(checkpoint_dir) if config.resume else None
        if checkpoint is not None:
            _resume(checkpoint, config, peft_model, optimizer, scheduler, state)
        tensorboard = out / TENSORBOARD_DIR if config.report_to == "tensorboard" else None
        log = TrainingLog(tensorboard, purge_step=state.step + 1 if checkpoint is not None else None)

        pad_id = tokenizer.pad_token_id
        bar = tqdm(total=total_steps, initial=state.step, desc=config.task, unit="step",
                   disable=None if progress else True, leave=False)  # fmt: skip
        peft_model.train()
        while state.step < total_steps and not state.stopped:
            if deadline is not None and clock() >= deadline:
                state.stop_reason = "timeout"
                break
            loss = _optimizer_step(peft_model, optimizer, scheduler, params, data.train_set, pad_id, config, state.step)
            state.step += 1
            logged = state.log_train_loss(loss, config.logging_steps)
            if logged is not None:
                log.train(state.step, logged, scheduler.get_last_lr()[0])
            if data.eval_set and (state.step % eval_every == 0 or state.step == total_steps):
                _evaluate(peft_model, tokenizer, data, state, log)
            bar.set_postfix(loss=f"{loss:.4f}", **({state.metric: f"{state.eval_metric[-1][1]:.4g}"}
                                                    if state.eval_metric else {}))  # fmt: skip
            bar.update(1)
            if config.checkpoint_every and state.step % config.checkpoint_every == 0:
                _checkpoint(checkpoint_dir, config, peft_model, optimizer, scheduler, state)
            if on_step is not None:
                on_step(state.step, loss)
        bar.close()
        if state.stop_reason == "timeout" and data.eval_set and state.step and (
            not state.eval_loss or state.eval_loss[-1][0] != state.step
        ):
            _evaluate(peft_model, tokenizer, data, state, log)  # the steps since the last evaluation count too
        state.finish()
        if config.restore_best and state.best_state is not None:
            _load_lora_state(peft_model, state.best_state)
        training = finish_task(peft_model, tokenizer, config, identity, state, data, targets, out, log,
                               eval_every=eval_every, started=started)  # fmt: skip
        return TrainingResult(config.task, out, training)
    finally:
        if log is not None:
            log.close()
        peft_model.unload()  # removes the LoRA layers: the next task starts from the bare base


def _checkpoint(directory: Path, config: TaskConfig, model: Any, optimizer: Any, scheduler: Any,
                state: TrainingState) -> None:
    import torch

    save_checkpoint(directory, state.step, {
        "config": config.to_dict(), "lora": _lora_state(model), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(), "run": state.snapshot(),
    })  # fmt: skip


def _resume(path: Path, config: TaskConfig, model: Any, optimizer: Any, scheduler: Any,
            state: TrainingState) -> None:
    import torch

    saved = load_checkpoint(path, config)
    _load_lora_state(model, saved["lora"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"])
    state.restore(saved["run"])


def _evaluate(model: Any, tokenizer: Any, data: TaskData, state: TrainingState, log: Any) -> None:
    loss, value = data.evaluator.during_training(model, tokenizer)
    if state.record_eval(loss, value):
        state.best_state = _lora_state(model)
    log.evaluation(state.step, loss, state.metric, value)


def _optimizer_step(
    model: Any,
    optimizer: Any,
    scheduler: Any,
    params: list[Any],
    train_set: list[Example],
    pad_id: int,
    config: TaskConfig,
    step: int,
) -> float:
    import torch

    total = 0.0
    for micro in range(config.gradient_accumulation):
        micro_step = step * config.gradient_accumulation + micro
        rows = micro_batch_indices(len(train_set), config.batch_size, config.seed, micro_step)
        batch = {k: v.to(model.device) for k, v in collate([train_set[i] for i in rows], pad_id).items()}
        loss = model(**batch).loss / config.gradient_accumulation
        loss.backward()
        total += loss.item()
    if config.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return total
