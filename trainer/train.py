"""The training loop: one fresh LoRA per task on a base model loaded once.

A plain PyTorch loop (no HF Trainer): on a tiny model and 2 CPU cores the Trainer's per-step
overhead is larger than the step itself, and a loop whose data order is a pure function of
(seed, step) makes checkpoint/resume exact.

Output per task, in OUT/TASK/: a standard PEFT adapter (`adapter_config.json`,
`adapter_model.safetensors`) and `training.json` (template, base identity, every option,
loss curves, eval perplexity, exact match with and without the adapter, wall time).
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraplex.trainer.base_model import base_identity, load_base_model, resolve_target_modules
from loraplex.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from loraplex.trainer.config import TRAINING_JSON, ConfigError, TaskConfig
from loraplex.trainer.dataset import Example, collate, load_examples, split_indices
from loraplex.trainer.evaluate import eval_loss, exact_match, greedy_predictions, perplexity

StepHook = Callable[[int, float], None]  # (optimizer step just finished, its train loss)


class QLoRAUnavailable(RuntimeError):
    """QLoRA was asked for on a machine without CUDA or bitsandbytes."""


@dataclass
class TrainingResult:
    task: str
    adapter_dir: Path
    training: dict[str, Any] = field(repr=False)  # the contents of training.json


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
) -> list[TrainingResult]:
    """Train one adapter per config on the base in `base_dir`, loading the base once.

    `num_threads` sets torch's CPU threads for the run (restored after). On a tiny model one
    thread is as fast as two, and on a busy machine far faster: a spinning second thread that
    shares a core with another process made a step 13x slower in our measurements.
    """
    import torch

    if not configs:
        raise ConfigError("no tasks to train")
    methods = {c.method for c in configs}
    if len(methods) > 1:
        raise ConfigError(f"tasks trained together share one loaded base; they mix methods {sorted(methods)}")
    check_method(configs[0].method)
    identity = base_identity(base_dir)
    threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        model, tokenizer = load_base_model(base_dir, quantize_4bit=configs[0].method == "qlora")
        results = [
            train_task(model, tokenizer, config, identity, progress=progress, on_step=on_step) for config in configs
        ]
    finally:
        torch.set_num_threads(threads)
    if summary:
        from loraplex.trainer.summary import print_summary

        print_summary(results)
    return results


def train(base_dir: str | Path, config: TaskConfig, **kwargs: Any) -> TrainingResult:
    """One task: `train_tasks(base_dir, [config])[0]`."""
    return train_tasks(base_dir, [config], **kwargs)[0]


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


def train_task(
    model: Any,
    tokenizer: Any,
    config: TaskConfig,
    identity: dict[str, str],
    *,
    progress: bool = True,
    on_step: StepHook | None = None,
) -> TrainingResult:
    """Train a fresh LoRA on `model` (left unchanged afterwards), write the adapter and training.json."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    started = time.perf_counter()
    template = config.template
    max_length = getattr(model.config, "max_position_embeddings", None)
    examples = load_examples(config.data, template, tokenizer, max_length=max_length)
    train_idx, eval_idx = split_indices(len(examples), config.eval_split, config.seed, where=str(config.data))
    train_set = [examples[i] for i in train_idx]
    eval_set = [examples[i] for i in eval_idx]
    targets = resolve_target_modules(config.target_modules, identity["model_type"], model)

    per_step = config.batch_size * config.gradient_accumulation
    steps_per_epoch = math.ceil(len(train_set) / per_step)
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    eval_every = config.eval_every or steps_per_epoch

    torch.manual_seed(config.seed)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=targets,
        use_rslora=config.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    try:
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, total_steps))
        run = _Run(config=config, total_steps=total_steps)
        checkpoint = latest_checkpoint(config.checkpoint_dir) if config.resume else None
        if checkpoint is not None:
            state = load_checkpoint(checkpoint, config)
            _load_lora_state(peft_model, state["lora"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
            run.restore(state["run"])

        pad_id = tokenizer.pad_token_id
        bar = tqdm(total=total_steps, initial=run.step, desc=config.task, unit="step", disable=not progress)
        peft_model.train()
        while run.step < total_steps and not run.stopped_early:
            loss = _optimizer_step(peft_model, optimizer, scheduler, params, train_set, pad_id, config, run.step)
            run.step += 1
            run.train_loss.append([run.step, loss])
            if eval_set and (run.step % eval_every == 0 or run.step == total_steps):
                run.record_eval(eval_loss(peft_model, eval_set, pad_id), _lora_state(peft_model))
            bar.set_postfix(loss=f"{loss:.4f}", eval=f"{run.last_eval:.4f}" if run.eval_loss else "-")
            bar.update(1)
            if config.checkpoint_every and run.step % config.checkpoint_every == 0:
                save_checkpoint(
                    config.checkpoint_dir,
                    run.step,
                    {
                        "config": config.to_dict(),
                        "lora": _lora_state(peft_model),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "rng": torch.get_rng_state(),
                        "run": run.snapshot(),
                    },
                )
            if on_step is not None:
                on_step(run.step, loss)
        bar.close()
        if config.restore_best and run.best_state is not None:
            _load_lora_state(peft_model, run.best_state)
        training = _finish(peft_model, tokenizer, config, identity, run, train_set, eval_set, targets, started)
        return TrainingResult(config.task, config.adapter_dir, training)
    finally:
        peft_model.unload()  # removes the LoRA layers: the next task starts from the bare base


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


@dataclass
class _Run:
    """Progress of one task's training: everything a checkpoint must restore besides tensors' owners."""

    config: TaskConfig
    total_steps: int
    step: int = 0
    train_loss: list[list[float]] = field(default_factory=list)
    eval_loss: list[list[float]] = field(default_factory=list)
    best_loss: float = math.inf
    best_step: int | None = None
    best_state: dict[str, Any] | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False

    @property
    def last_eval(self) -> float:
        return self.eval_loss[-1][1]

    def record_eval(self, loss: float, lora_state: dict[str, Any]) -> None:
        self.eval_loss.append([self.step, loss])
        if loss < self.best_loss:
            self.best_loss, self.best_step, self.best_state = loss, self.step, lora_state
            self.evals_without_improvement = 0
            return
        self.evals_without_improvement += 1
        patience = self.config.early_stopping_patience
        if patience is not None and self.evals_without_improvement >= patience:
            self.stopped_early = True

    _SAVED = ("step", "train_loss", "eval_loss", "best_loss", "best_step", "best_state",
              "evals_without_improvement", "stopped_early")  # fmt: skip

    def snapshot(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._SAVED}

    def restore(self, saved: dict[str, Any]) -> None:
        for name in self._SAVED:
            setattr(self, name, saved[name])


def _finish(
    model: Any,
    tokenizer: Any,
    config: TaskConfig,
    identity: dict[str, str],
    run: _Run,
    train_set: list[Example],
    eval_set: list[Example],
    targets: list[str],
    started: float,
) -> dict[str, Any]:
    """Score the final adapter, save it with training.json, drop the checkpoints of the finished run."""
    import shutil

    import peft
    import torch
    import transformers

    trained = time.perf_counter()
    final_loss = eval_loss(model, eval_set, tokenizer.pad_token_id) if eval_set else None
    predictions = greedy_predictions(model, tokenizer, eval_set) if eval_set else []
    with model.disable_adapter():
        base_predictions = greedy_predictions(model, tokenizer, eval_set) if eval_set else []
    out = config.adapter_dir
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    training = {
        "task": config.task,
        "template": config.template.to_dict(),
        "base": identity,
        "config": config.to_dict(),
        "lora": {"rank": config.rank, "alpha": config.alpha, "use_rslora": config.use_rslora,
                 "target_modules": targets,
                 "trainable_parameters": sum(v.numel() for v in _lora_state(model).values())},
        "data": {"path": str(config.data), "records": len(train_set) + len(eval_set),
                 "train_records": len(train_set), "eval_records": len(eval_set)},
        "steps": run.step,
        "total_steps": run.total_steps,
        "stopped_early": run.stopped_early,
        "best_step": run.best_step if config.restore_best and run.best_state is not None else run.step,
        "train_loss": run.train_loss,
        "eval_loss": run.eval_loss,
        "final_eval_loss": final_loss,
        "eval_perplexity": perplexity(final_loss) if final_loss is not None else None,
        "eval_exact_match": exact_match(predictions) if eval_set else None,
        "base_eval_exact_match": exact_match(base_predictions) if eval_set else None,
        "eval_samples": [
            {"prompt": p.prompt, "expected": p.expected, "generated": p.generated, "correct": p.correct}
            for p in predictions[:5] + [p for p in predictions[5:] if not p.correct][:5]
        ],  # the first five, then up to five misses
        "train_time_s": round(trained - started, 3),
        "wall_time_s": round(time.perf_counter() - started, 3),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }  # fmt: skip
    (out / TRAINING_JSON).write_text(json.dumps(training, indent=2) + "\n")
    shutil.rmtree(config.checkpoint_dir, ignore_errors=True)
    return training
