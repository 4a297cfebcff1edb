"""Verification of an exported package against PyTorch, before its manifest is written.

Two checks per adapter, both recorded in the manifest:
- parity (`parity.py`): greedy tokens and logits on a few prompts through onnxruntime-genai vs
  PyTorch PEFT. fp32 must give the same tokens (and logits within 1e-3); int4 and fp16 record them.
- accuracy (`accuracy.py`): task accuracy on held-out examples through the serving engine vs
  PyTorch PEFT in fp32; the package may lose at most `max_drop`. This is the check that matters
  for a quantized package. Adapters without held-out examples get parity only, with a warning
  for reduced precisions.
The bare base model gets the same parity check.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from loraplex.adapters.export import accuracy, parity
from loraplex.adapters.export.peft_adapter import PeftAdapter
from loraplex.adapters.package.manifest import Manifest
from loraplex.adapters.package.output import OutputConstraint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verification:
    """How export verifies a package (the CLI's --max-accuracy-drop, --eval-data, --eval-examples)."""

    max_accuracy_drop: float = accuracy.DEFAULT_MAX_DROP
    eval_data: Mapping[str, Path] = field(default_factory=dict)  # adapter name -> JSON/JSONL records
    eval_examples: int = accuracy.DEFAULT_EXAMPLES

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_accuracy_drop <= 1.0:
            raise ValueError(f"max accuracy drop {self.max_accuracy_drop} must be in [0, 1] (0.02 = 2 points)")
        if self.eval_examples < 1:
            raise ValueError(f"eval examples must be at least 1, got {self.eval_examples}")


def verify_package(package_dir: Path, base_dir: Path, manifest: Manifest, adapters: Mapping[str, PeftAdapter],
                   options: Verification, files: Mapping[str, Path] | None = None, check_base: bool = True) -> None:
    """Fill `manifest`'s parity and accuracy records; raises ParityError or AccuracyError naming the adapter.

    `files` overrides an adapter's file (a candidate not yet in the package).
    """
    exact = manifest.precision == "fp32"
    tolerance = parity.FP32_LOGIT_TOLERANCE if exact else None
    onnx = parity.OnnxDecoder(package_dir)
    ref = parity.TorchDecoder(base_dir, eos_token_id=None)
    engine = accuracy.EngineDecoder(package_dir, manifest, "batched" if manifest.device == "cpu" else "genai")
    try:
        for name, adapter in adapters.items():
            file = (files or {}).get(name) or package_dir / manifest.adapters[name].file
            onnx.load(name, file)
            ref.load(name, adapter.path)
            prompts = parity.prompts_for(adapter)
            ids = [onnx.encode(p) for p in prompts]
            got, want = [onnx.greedy(i, name) for i in ids], [ref.greedy(i, name) for i in ids]
            onnx.unload(name)
            manifest.adapters[name].parity = parity.compare(
                name, prompts, ids, got, want, reference="pytorch-peft", tokens_must_match=exact, tolerance=tolerance)
            manifest.adapters[name].accuracy = _accuracy(name, adapter, file, engine, ref, options, manifest.precision,
                                                        manifest.adapters[name].output)
        if check_base:
            prompts = list(parity.GENERIC_PROMPTS)
            ids = [onnx.encode(p) for p in prompts]
            got, want = [onnx.greedy(i, None) for i in ids], [ref.greedy(i, None) for i in ids]
            manifest.base_parity = parity.compare("(base, no adapter)", prompts, ids, got, want, reference="pytorch",
                                                  tokens_must_match=exact, tolerance=tolerance)
    finally:
        engine.close()


def _accuracy(name: str, adapter: PeftAdapter, file: Path, engine: accuracy.EngineDecoder,
              ref: parity.TorchDecoder, options: Verification, precision: str, output: dict | None):
    found = accuracy.task_examples(adapter, options.eval_data.get(name), options.eval_examples)
    if found is None:
        if precision != "fp32":
            log.warning("adapter %s has no held-out examples (no training.json eval split, no --eval-data): its "
                        "task accuracy in the %s package is not verified", name, precision)
        return None
    examples, source = found
    engine.load(name, file)
    constraint = OutputConstraint.from_dict(output) if output else None  # as the server applies it
    result = accuracy.measure(name, examples, source, engine, ref, options.max_accuracy_drop,
                              accuracy.task_metric(adapter.task_metric), constraint)
    accuracy.check(name, result, precision)
    return result
