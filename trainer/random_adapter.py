"""Random LoRA adapters in PEFT's format: no data, no training.

For whatever needs adapters that change the output but need not be good at anything: export and
serving tests, and benchmarks of speed, memory and adapter switching. Values, per adapted module:
A ~ U(-1/sqrt(in), 1/sqrt(in)) (`nn.Linear`'s default init, which PEFT leaves on A with
`init_lora_weights=False`) and B ~ N(0, b_std), B non-zero so every LoRA branch does real work.

Two seeding schemes, each kept because callers depend on its exact values:
- `random_adapter`: one adapter per call; the global torch RNG is seeded with `seed` before the
  base is loaded, PEFT initialises A (and B), then B is drawn again. Tests' expectations (parity,
  "the adapter changes the output") were set on these values.
- `random_adapters`: many adapters on one loaded base (a 78M-parameter base is loaded once, not
  32 times); adapter i is drawn from its own `torch.Generator` seeded `seed * 1000 + i`, A then B
  for each LoRA parameter in PEFT's order, so one adapter's values do not depend on the others.

torch, transformers and peft are imported inside the functions: `loraplex.trainer` stays importable
without them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from loraplex.trainer.config import TRAINING_JSON


def random_adapter(base_dir: str | Path, out: str | Path, *, rank: int, targets: Iterable[str], seed: int,
                   alpha: float | None = None, rslora: bool = False, b_std: float = 0.05,
                   template: Mapping[str, str] | None = None) -> Path:
    """One random adapter on `base_dir` saved in `out`, with a `training.json` recording the base's
    identity, the rank and seed, and `template` when given (export reads it as the task template).

    `alpha` defaults to 2 * rank; b_std 0.05 gives a visible effect on a tiny base without saturating.
    """
    import torch

    torch.manual_seed(seed)
    peft_model = _lora_model(base_dir, rank=rank, alpha=alpha if alpha is not None else 2 * rank, targets=targets,
                             rslora=rslora, init_lora_weights=False)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, b_std)
    training: dict[str, Any] = {"base": _identity(base_dir), "hyperparameters": {"rank": rank, "seed": seed}}
    if template:
        training["template"] = dict(template)
    return _save(peft_model, Path(out), training, indent=2)


def random_adapters(base_dir: str | Path, outs: Mapping[str, str | Path], *, rank: int, alpha: float,
                    targets: Iterable[str], seed: int, b_std: float, record_base: bool = False,
                    progress: bool = False) -> dict[str, Path]:
    """One random adapter per entry of `outs` ({name: directory}, in order), all on one loaded base.

    With `record_base` each gets a `training.json` holding only the base's identity (what export
    checks an adapter against); without it, none.
    """
    import torch

    peft_model = _lora_model(base_dir, rank=rank, alpha=alpha, targets=targets)
    training = {"base": _identity(base_dir)} if record_base else None
    items: Iterable[tuple[str, str | Path]] = outs.items()
    if progress:
        from tqdm import tqdm

        items = tqdm(items, total=len(outs), desc="random adapters", unit="adapter")
    saved: dict[str, Path] = {}
    for i, (name, out) in enumerate(items):
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        with torch.no_grad():
            for pname, param in peft_model.named_parameters():
                if ".lora_A." in pname:
                    bound = 1.0 / param.shape[1] ** 0.5
                    param.copy_((torch.rand(param.shape, generator=gen) * 2 - 1) * bound)
                elif ".lora_B." in pname:
                    param.copy_(torch.randn(param.shape, generator=gen) * b_std)
        saved[name] = _save(peft_model, Path(out), training)
    return saved


def _lora_model(base_dir: str | Path, *, rank: int, alpha: float, targets: Iterable[str], rslora: bool = False,
                init_lora_weights: bool = True) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets), use_rslora=rslora,
                        init_lora_weights=init_lora_weights)
    return get_peft_model(model, config)


def _identity(base_dir: str | Path) -> dict[str, object]:
    from loraplex.trainer.base_model import base_identity

    return base_identity(base_dir)


def _save(peft_model: Any, out: Path, training: dict[str, Any] | None, indent: int | None = None) -> Path:
    peft_model.save_pretrained(out)
    if training is not None:
        (out / TRAINING_JSON).write_text(json.dumps(training, indent=indent))
    return out
