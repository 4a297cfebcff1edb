"""Task accuracy of each adapter: PyTorch PEFT in fp32 against the package through its serving engine.

A logit tolerance is the wrong test for a quantized package: int4 moves every logit by design. What
a user needs is the task accuracy at the precision they ship, next to fp32's. For each adapter,
held-out examples (the eval split its training recorded, or `--eval-data`) are decoded greedily by
PyTorch PEFT (fp32, the reference) and by the exported package through the engine the server will
use for it (the batched engine for a CPU package; onnxruntime-genai on the CPU for GPU/NPU targets,
which cannot run here), under the adapter's output contract as the server applies it by default.
Both see the same prompt token ids (the package's tokenizer), and their text is decoded the same
way. A prediction is right when decoding stops (EOS, or its contract complete) with exactly the
completion's text, as a client of the server would see it. The adapter is judged by the metric its
training selected it by (training.json `metric`: accuracy, macro_f1, rouge_l or bleu from
`loraplex.trainer.metrics`), exact match where none is recorded; exact match is always recorded too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loraplex.adapters.export.peft_adapter import PeftAdapter
from loraplex.adapters.package.manifest import Accuracy, Manifest
from loraplex.adapters.package.output import OutputConstraint
from loraplex.adapters.package.template import PromptTemplate, TemplateError

if TYPE_CHECKING:
    from loraplex.adapters.export.parity import TorchDecoder

log = logging.getLogger(__name__)

DEFAULT_MAX_DROP = 0.02  # 2 points of the metric
DEFAULT_EXAMPLES = 64  # held-out examples per adapter (the first ones in file order)
PRIMARY_METRIC = "exact_match"


class AccuracyError(RuntimeError):
    """The package loses more task accuracy than allowed; the message names the adapter, both numbers, the fixes."""


@dataclass(frozen=True)
class TaskExample:
    prompt: str
    completion: str


def task_examples(adapter: PeftAdapter, eval_data: Path | None = None,
                  limit: int = DEFAULT_EXAMPLES) -> tuple[list[TaskExample], str] | None:
    """Held-out examples for `adapter` and where they come from; None when there are none.

    `eval_data` (JSON/JSONL records) is used whole; otherwise the records the adapter's training
    held out. Records are rendered with the adapter's template, or must carry `prompt` and
    `completion` fields when the adapter has none.
    """
    from loraplex.trainer.dataset import held_out_records, read_records

    if eval_data is not None:
        records, source = read_records(eval_data), f"{eval_data}"
    else:
        data, split = adapter.data_path, adapter.eval_split
        if data is None or split is None:
            return None
        if not data.is_file():
            log.warning("adapter %s: its training data %s is gone; pass --eval-data to verify accuracy",
                        adapter.path, data)
            return None
        records, source = held_out_records(data, *split), f"eval split of {data}"
    template = PromptTemplate.from_dict(adapter.template or {"prompt": "{prompt}", "completion": "{completion}"})
    examples = []
    for index, record in enumerate(records[:limit]):
        try:
            examples.append(TaskExample(template.render_prompt(record, where=f"{source}: record {index}"),
                                        template.render_completion(record, where=f"{source}: record {index}")))
        except TemplateError as exc:
            raise ValueError(f"cannot evaluate adapter {adapter.path.name}: {exc}") from exc
    return (examples, source) if examples else None


@dataclass(frozen=True)
class Prediction:
    tokens: list[int]  # completion tokens, EOS excluded
    stopped: bool  # decoding ended at EOS


class EngineDecoder:
    """Greedy decoding through loraplex's in-process API (`loraplex.runtime.api.LLM`), on the CPU:
    the server's own request path, with the engine the server will use for the package.

    Every prompt of a call is submitted at once: the batched engine decodes them together (its
    greedy tokens equal one-at-a-time decoding, whatever shares the batch).
    """

    def __init__(self, package_dir: Path, manifest: Manifest, engine: str):
        from loraplex.adapters.package.reader import Package
        from loraplex.runtime.api import LLM

        self.engine_name = engine
        self.llm = LLM(Package.open(package_dir, manifest), engine=engine, device="cpu", load_adapters=False,
                       max_batch=16)
        self.tokenizer = self.llm.tokenizer  # the server's

    def load(self, name: str, file: Path) -> None:
        self.llm.load_adapter(name, file, version="verify")

    def greedy(self, adapter: str | None, prompts: Sequence[str], max_new_tokens: int,
               constraint: OutputConstraint | None = None) -> list[Prediction]:
        from loraplex.runtime.api import FinishReason

        replies = self.llm.generate(list(prompts), adapter=adapter or "", max_new_tokens=max_new_tokens,
                                    output=constraint, no_default_output=True)
        # a complete output constraint ends a reply with STOP where a free one ends with EOS
        return [Prediction(r.token_ids, r.finish_reason in (FinishReason.EOS, FinishReason.STOP)) for r in replies]

    def close(self) -> None:
        self.llm.close()


def exact_match(predictions: Sequence[Prediction], examples: Sequence[TaskExample], decode: Callable) -> float:
    right = sum(p.stopped and decode(p.tokens) == e.completion for p, e in zip(predictions, examples, strict=True))
    return right / len(examples)


def task_metric(recorded: str | None) -> str:
    """The metric an adapter is judged by: the one its training selected it by when that is a text
    metric (accuracy, macro_f1, rouge_l, bleu, exact_match); exact match otherwise (perplexity, none)."""
    from loraplex.trainer.metrics import TEXT_METRICS

    return recorded if recorded in TEXT_METRICS else PRIMARY_METRIC


def _scores(predictions: Sequence[Prediction], examples: Sequence[TaskExample], decode: Callable,
            metric: str) -> dict[str, float]:
    scores = {PRIMARY_METRIC: exact_match(predictions, examples, decode)}
    if metric != PRIMARY_METRIC:
        from loraplex.trainer.metrics import compute_metrics

        texts = [decode(p.tokens) for p in predictions]
        scores.update(compute_metrics([metric], texts, [e.completion for e in examples]))
    return scores


def measure(name: str, examples: list[TaskExample], source: str, package: EngineDecoder, reference: TorchDecoder,
            max_drop: float, metric: str = PRIMARY_METRIC, constraint: OutputConstraint | None = None) -> Accuracy:
    """Decode `examples` both ways and compare by `metric` (exact match is always recorded too); the
    adapter must be loaded in both decoders as `name`. The package decodes under the adapter's output
    `constraint`, as the server applies it by default; PyTorch, the reference, decodes free."""
    encode, decode = package.tokenizer.encode, package.tokenizer.decode
    prompts = [encode(e.prompt) for e in examples]  # PyTorch's; the package's server encodes the same texts alike
    budget = max(len(encode(e.completion)) for e in examples) + 2  # the completion, EOS, one token of slack
    texts = [e.prompt for e in examples]
    ours = package.greedy(name, texts, budget, constraint)
    base = package.greedy(None, texts, budget)
    eos = reference.eos_ids
    theirs = [_prediction(tokens, eos) for tokens in reference.greedy_many(prompts, name, budget)]
    agreement = sum(a.tokens == b.tokens and a.stopped == b.stopped for a, b in zip(ours, theirs, strict=True))
    scores = {side: _scores(predictions, examples, decode, metric)
              for side, predictions in (("pytorch", theirs), ("package", ours), ("base", base))}
    drop = scores["pytorch"][metric] - scores["package"][metric]
    return Accuracy(metric=metric, examples=len(examples), source=source, **scores, engine=package.engine_name,
                    token_agreement=agreement / len(examples), max_drop=max_drop, passed=drop <= max_drop + 1e-9)


def _prediction(tokens: list[int], eos: set[int]) -> Prediction:
    stopped = bool(tokens) and tokens[-1] in eos
    return Prediction(tokens[:-1] if stopped else tokens, stopped)


def check(name: str, accuracy: Accuracy, precision: str) -> None:
    """Raise AccuracyError when the package lost more than allowed, naming both numbers and the fixes."""
    if accuracy.passed:
        return
    fixes = ("export in fp32" if precision == "fp16" else
             "export in fp16 (GPU) or fp32, or raise int4 quality: a smaller --int4-block-size (e.g. 16) "
             "or --int4-algo k_quant; or train the adapter longer; or allow more with --max-accuracy-drop")
    raise AccuracyError(
        f"adapter {name!r} loses task accuracy in the {precision} package: {accuracy.metric} "
        f"{accuracy.package[accuracy.metric]:.1%} vs {accuracy.pytorch[accuracy.metric]:.1%} in PyTorch fp32 on "
        f"{accuracy.examples} examples ({accuracy.source}), a drop of {accuracy.drop:.1%} > {accuracy.max_drop:.1%}; "
        f"fixes: {fixes}"
    )
