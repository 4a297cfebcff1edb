"""The package manifest: what `loraplex export` writes and the server reads.

A package is a directory that describes itself (docs/architecture.md, "The package"):

    package/
      manifest.json            this schema
      model.onnx (+ .data)     base graph, LoRA weights as inputs with symbolic rank `lora_r`
      genai_config.json, tokenizer files
      adapters/<name>.onnx_adapter

Stdlib only.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from loraplex.adapters.package.output import OutputConstraint, OutputSpecError

SCHEMA_VERSION = 4
# 2 adds per-adapter accuracy and PEFT sizes (files need no padding); 3 adds each adapter's output
# contract and records each LoRA graph input's fixed dim and dtype (`lora_graph_inputs`), so a
# server opens a package without parsing its graph; 4 records which library the server tokenizes
# with (`tokenizer`).
READABLE_SCHEMAS = (1, 2, 3, 4)
TOKENIZER_LIBRARIES = ("tokenizers", "genai")
Precision = Literal["fp32", "fp16", "int4"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16", "int4")
MANIFEST_NAME = "manifest.json"
ADAPTER_DIR = "adapters"
MODEL_FILE = "model.onnx"
ADAPTER_NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")


class ManifestError(ValueError):
    """The manifest is missing, malformed, or of a schema this version cannot read."""


@dataclass
class BaseModelInfo:
    architecture: str  # transformers architecture, e.g. "LlamaForCausalLM"
    model_type: str  # e.g. "llama"
    source: str  # the directory the package was exported from
    sha256: str  # of the base weights (see loraplex.trainer.base_model.weights_sha256)
    imported_from: dict[str, str] | None = None  # e.g. {"source": "gguf", "file": ..., "sha256": ...}


@dataclass
class Parity:
    """An adapter's ONNX output against PyTorch PEFT on fixed prompts (exact in fp32)."""

    reference: str  # "pytorch-peft" (an adapter) or "pytorch" (the base model)
    prompts: list[str]
    # Greedy token ids (completion only) the ONNX model produced, one list per prompt: the prompt
    # is encoded with the package tokenizer as is (no template applied, no special tokens added),
    # decoding stops after `max_new_tokens` or at EOS, and an EOS token that stopped it is
    # included as the last id. The server must reproduce them exactly for the same package.
    tokens: list[list[int]]
    tokens_equal: bool
    max_abs_logit_diff: float
    tolerance: float | None = None  # None: tokens and logits recorded, not required to match (int4, fp16)
    passed: bool = True
    max_new_tokens: int = 8


@dataclass
class Accuracy:
    """An adapter's task accuracy on held-out examples: PyTorch PEFT (fp32) vs this package.

    Metric values are fractions in [0, 1]. The package side runs through the engine the server
    uses for the package's device (the batched engine for CPU packages); `token_agreement` is the
    share of examples whose greedy tokens equal PyTorch's. `passed`: `metric` dropped by at most
    `max_drop` (absolute, e.g. 0.02 = 2 points) from PyTorch's to the package's.
    """

    metric: str  # the metric the check is on, e.g. "exact_match"
    examples: int
    source: str  # where the examples come from (the eval split of the training data, or --eval-data)
    pytorch: dict[str, float]
    package: dict[str, float]
    base: dict[str, float]  # the package with no adapter: what the adapter adds
    engine: str
    token_agreement: float
    max_drop: float
    passed: bool

    @property
    def drop(self) -> float:
        return self.pytorch[self.metric] - self.package[self.metric]


@dataclass
class AdapterEntry:
    name: str
    version: str
    file: str  # relative to the package root: adapters/<name>.onnx_adapter
    rank: int  # the adapter's largest rank over its modules (the file holds its own ranks, unpadded)
    alpha: float
    target_modules: list[str]
    template: dict[str, str] | None  # PromptTemplate.to_dict(), or None for prompt-only use
    sha256: str
    size_bytes: int  # of the .onnx_adapter file
    parity: Parity | None = None
    training: dict[str, Any] | None = None  # metrics and hyper-parameters from training.json
    accuracy: Accuracy | None = None
    peft_size_bytes: int = 0  # of the PEFT adapter's weights file it was converted from
    # The task's output contract ({kind, spec}, see loraplex.adapters.package.output): the server
    # applies it to every request on this adapter that brings no constraint of its own.
    output: dict[str, Any] | None = None

    def output_constraint(self) -> OutputConstraint | None:
        return OutputConstraint.from_dict(self.output) if self.output else None


@dataclass
class Manifest:
    base: BaseModelInfo
    precision: str  # fp32 | fp16 | int4
    device: str  # cpu | gpu | npu
    provider: str | None  # execution provider written into genai_config.json, None = CPU
    model_file: str  # "model.onnx"
    lora_rank: int  # the largest adapter rank (the graph's rank `lora_r` is symbolic: any rank loads)
    lora_modules: list[str]  # module kinds the graph has LoRA inputs for, e.g. ["q_proj", ...]
    lora_inputs: list[str]  # every LoRA graph input name, sorted
    adapters: dict[str, AdapterEntry] = field(default_factory=dict)
    # The package with no adapter bound vs the base model in PyTorch (same prompts, same rules).
    base_parity: Parity | None = None
    # Schema 3: every LoRA graph input in graph order, [name, fixed dim (in for A, out for B), numpy dtype
    # name]; None in older manifests (the graph is parsed instead).
    lora_graph_inputs: list[list] | None = None
    # Schema 4: the server's tokenizer library. "tokenizers" (Hugging Face's, what training used) when
    # export found it encodes like onnxruntime-genai's on the package's tokenizer; "genai" when they
    # differed; None in older manifests (read as "tokenizers").
    tokenizer: str | None = None
    schema_version: int = SCHEMA_VERSION
    created_by: str = "loraplex"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    def save(self, package_dir: str | Path) -> Path:
        path = Path(package_dir) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)  # atomic: a reader never sees half a manifest
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        version = data.get("schema_version")
        if version not in READABLE_SCHEMAS:
            raise ManifestError(
                f"manifest schema_version {version!r} is not supported (this loraplex reads "
                f"{', '.join(map(str, READABLE_SCHEMAS))}); re-export the package with this version of loraplex"
            )
        try:
            adapters = {}
            for name, entry in data.get("adapters", {}).items():
                entry = dict(entry)
                parity, accuracy = entry.pop("parity", None), entry.pop("accuracy", None)
                adapters[name] = AdapterEntry(**entry, parity=Parity(**parity) if parity else None,
                                              accuracy=Accuracy(**accuracy) if accuracy else None)
                adapters[name].output_constraint()  # a malformed contract fails here, naming the adapter
            fields = {k: v for k, v in data.items() if k not in ("base", "adapters", "base_parity")}
            if fields.get("tokenizer") not in (None, *TOKENIZER_LIBRARIES):
                raise ManifestError(f"manifest is malformed: tokenizer {str(fields['tokenizer'])[:40]!r} is not one "
                                    f"of {', '.join(TOKENIZER_LIBRARIES)}")
            base_parity = data.get("base_parity")
            return cls(
                base=BaseModelInfo(**data["base"]),
                adapters=adapters,
                base_parity=Parity(**base_parity) if base_parity else None,
                **fields,
            )
        except OutputSpecError as exc:
            raise ManifestError(f"manifest is malformed: adapter {name!r} has a bad output contract: {exc}") from exc
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"manifest is malformed: {exc}") from exc

    @classmethod
    def load(cls, package_dir: str | Path) -> Manifest:
        return cls.from_dict(read_package_json(package_dir, MANIFEST_NAME, ManifestError))


def read_package_json(package_dir: str | Path, name: str, error: type[ValueError]) -> dict[str, Any]:
    """A package's JSON file; `error` (naming the file and the fix) if it is missing or not JSON."""
    path = Path(package_dir) / name
    if not path.is_file():
        raise error(f"{path} not found: is {package_dir} a package written by `loraplex export`?")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise error(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise error(f"{path} holds a {type(data).__name__}, not an object: re-export the package")
    return data


def check_adapter_name(name: str) -> str:
    """Adapter names become file names: allow only `[A-Za-z0-9._-]{1,64}`, never '.' or '..'."""
    if not ADAPTER_NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"adapter name {name[:80]!r} is invalid: use 1-64 characters from A-Z a-z 0-9 . _ -")
    return name


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
