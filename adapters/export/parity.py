"""Parity: the exported package computes what PyTorch PEFT computes.

For each adapter, greedy decoding of a few fixed prompts runs through onnxruntime-genai with the
adapter active and through `PeftModel.generate`; both start from the same token ids (genai's
tokenizer), stop at EOS or after `max_new_tokens`. fp32 must give identical tokens (else the
export fails, naming the adapter, prompt and first diverging position); the largest absolute
difference between the two logits at every decoded position is recorded. With no adapter bound
the package must reproduce the base model the same way.

For int4 and fp16 the tokens and logit differences are recorded but not required to match:
quantizing the base changes the numbers by design, and task accuracy (`accuracy.py`) is the check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from loraplex.adapters.export.peft_adapter import PeftAdapter
from loraplex.adapters.package.manifest import Parity

MAX_NEW_TOKENS = 8
FP32_LOGIT_TOLERANCE = 1e-3  # fp32 ORT vs fp32 torch: different kernels, same math
GENERIC_PROMPTS = ("Review: a quiet, lovely film\nSentiment:", "Reverse: cat dog sun\nOutput:", "The weather today")
PROMPTS_PER_ADAPTER = 3


class ParityError(RuntimeError):
    """The ONNX package does not reproduce PyTorch: the message names the adapter and where."""


@dataclass
class Decoded:
    tokens: list[int]
    logits: np.ndarray  # [steps, vocab], the distribution each token was chosen from


def prompts_for(adapter: PeftAdapter | None, count: int = PROMPTS_PER_ADAPTER) -> list[str]:
    """Prompts rendered from the adapter's template and training data when the trainer recorded them."""
    template = adapter.template if adapter else None
    data_path = adapter.data_path if adapter else None
    if template and data_path and data_path.is_file():
        from loraplex.adapters.package.template import PromptTemplate, TemplateError
        from loraplex.trainer.dataset import read_records

        tpl = PromptTemplate.from_dict(template)
        prompts = []
        for record in read_records(data_path):
            try:
                prompts.append(tpl.render_prompt(record))
            except TemplateError:
                continue
            if len(prompts) == count:
                return prompts
        if prompts:
            return prompts
    return list(GENERIC_PROMPTS[:count])


class OnnxDecoder:
    """Greedy decoding through onnxruntime-genai, on CPU whatever the package's device target."""

    def __init__(self, package_dir: str | Path) -> None:
        import onnxruntime_genai as og
        from loraplex.adapters.package.genai_config import GenaiConfig
        from loraplex.adapters.package.lora_inputs import read_lora_inputs

        self._og = og
        config = og.Config(str(package_dir))
        config.clear_providers()
        self.model = og.Model(config)
        self.tokenizer = og.Tokenizer(self.model)
        self.adapters = og.Adapters(self.model)
        self.inputs = read_lora_inputs(Path(package_dir) / GenaiConfig.load(package_dir).model_file)
        self._loaded: set[str] = set()

    def encode(self, prompt: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(prompt)]

    def load(self, name: str, adapter_file: str | Path) -> None:
        import tempfile

        from loraplex.adapters.package.adapter_file import loadable_file, read_adapter_file

        if name in self._loaded:
            self.adapters.unload(name)
        with tempfile.TemporaryDirectory(prefix="loraplex-parity-") as scratch:
            self.adapters.load(str(loadable_file(read_adapter_file(adapter_file, self.inputs), self.inputs,
                                                 Path(scratch))), name)
        self._loaded.add(name)

    def unload(self, name: str) -> None:
        if name in self._loaded:
            self.adapters.unload(name)
            self._loaded.discard(name)

    def greedy(self, ids: Sequence[int], adapter: str | None, max_new_tokens: int = MAX_NEW_TOKENS) -> Decoded:
        og = self._og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + max_new_tokens, do_sample=False)
        generator = og.Generator(self.model, params)
        if adapter:
            generator.set_active_adapter(self.adapters, adapter)
        generator.append_tokens(np.asarray(ids, dtype=np.int32))
        tokens, logits = [], []
        while not generator.is_done():
            logits.append(np.array(generator.get_logits(), dtype=np.float32).reshape(-1))
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        del generator
        return Decoded(tokens, np.stack(logits) if logits else np.zeros((0, 0), np.float32))


class TorchDecoder:
    """Greedy decoding with transformers + PEFT: the reference. Adapters are loaded by name."""

    def __init__(self, base_dir: str | Path, eos_token_id: int | None) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self._torch = torch
        self.base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        self.model = None  # PeftModel once the first adapter is loaded
        self.eos = eos_token_id if eos_token_id is not None else self.base.config.eos_token_id
        self.eos_ids = set(self.eos) if isinstance(self.eos, list) else {self.eos}

    def load(self, name: str, adapter_dir: str | Path) -> None:
        from peft import PeftModel

        if self.model is None:
            self.model = PeftModel.from_pretrained(self.base, str(adapter_dir), adapter_name=name).eval()
        else:
            if name in self.model.peft_config:
                self.model.delete_adapter(name)
            self.model.load_adapter(str(adapter_dir), adapter_name=name)

    def greedy(self, ids: Sequence[int], adapter: str | None, max_new_tokens: int = MAX_NEW_TOKENS) -> Decoded:
        import contextlib

        torch = self._torch
        model = self.model if self.model is not None else self.base
        if adapter:
            model.set_adapter(adapter)
            context = contextlib.nullcontext()
        else:
            context = model.disable_adapter() if self.model is not None else contextlib.nullcontext()
        input_ids = torch.tensor([list(ids)], dtype=torch.long)
        with torch.no_grad(), context:
            out = model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                do_sample=False, eos_token_id=self.eos, pad_token_id=self.eos,
                output_logits=True, return_dict_in_generate=True,
            )
        tokens = [int(t) for t in out.sequences[0, len(ids):]]
        logits = torch.stack([step[0] for step in out.logits]).float().numpy()
        return Decoded(tokens, logits)

    def greedy_many(self, prompts: Sequence[Sequence[int]], adapter: str | None, max_new_tokens: int,
                    batch_size: int = 32) -> list[list[int]]:
        """Greedy tokens (up to and including EOS) for many prompts; prompts of one length share a
        `generate` call, so no padding enters and each result equals an unbatched run."""
        import contextlib

        torch = self._torch
        model = self.model if self.model is not None else self.base
        if adapter:
            model.set_adapter(adapter)
        context = model.disable_adapter() if not adapter and self.model is not None else contextlib.nullcontext()
        by_length: dict[int, list[int]] = {}
        for i, ids in enumerate(prompts):
            by_length.setdefault(len(ids), []).append(i)
        results: list[list[int]] = [[] for _ in prompts]
        with torch.no_grad(), context:
            for length, members in sorted(by_length.items()):
                for start in range(0, len(members), batch_size):
                    chunk = members[start : start + batch_size]
                    input_ids = torch.tensor([list(prompts[i]) for i in chunk], dtype=torch.long)
                    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=self.eos,
                                         pad_token_id=self.eos)
                    for i, row in zip(chunk, out[:, length:].tolist(), strict=True):
                        ends = [k for k, token in enumerate(row) if token in self.eos_ids]
                        results[i] = row[: ends[0] + 1] if ends else row
        return results


def compare(name: str, prompts: list[str], ids: list[list[int]], onnx: list[Decoded], ref: list[Decoded], *,
            reference: str, tokens_must_match: bool, tolerance: float | None) -> Parity:
    """Build the Parity record; raise ParityError if tokens diverge (when required) or logits exceed
    `tolerance` (None: not checked)."""
    max_diff = 0.0
    tokens_equal = True
    first_problem = None
    for prompt, got, want in zip(prompts, onnx, ref, strict=True):
        steps = min(len(got.tokens), len(want.tokens))
        same = got.tokens == want.tokens
        if not same:
            tokens_equal = False
            position = next((i for i in range(steps) if got.tokens[i] != want.tokens[i]), steps)
            first_problem = first_problem or (
                f"adapter {name!r}: on prompt {prompt!r} the ONNX model's greedy token {position} differs from "
                f"{reference} (onnx {got.tokens}, {reference} {want.tokens})"
            )
            steps = position + 1
        if steps:
            diff = float(np.max(np.abs(got.logits[:steps] - want.logits[:steps])))
            max_diff = max(max_diff, diff)
    passed = (tokens_equal or not tokens_must_match) and (tolerance is None or max_diff <= tolerance)
    if not passed:
        problem = first_problem if (tokens_must_match and not tokens_equal) else (
            f"adapter {name!r}: max |logit difference| {max_diff:.3g} vs {reference} exceeds tolerance {tolerance}"
        )
        raise ParityError(f"parity check failed: {problem}; the package is not exact for this adapter")
    return Parity(
        reference=reference, prompts=list(prompts), tokens=[d.tokens for d in onnx], tokens_equal=tokens_equal,
        max_abs_logit_diff=max_diff, tolerance=tolerance, passed=True,
    )
