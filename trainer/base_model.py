"""The base model: its identity (what adapters were trained on), loading it, and what LoRA may target.

An adapter only makes sense on the exact weights it was trained on, so every stage records the
base's identity: `base_identity()` is read by the trainer (training.json), by export (manifest) and
by `loraplex adapters add` (refuses an adapter trained on other weights). Identity needs no torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
BASE_RECORD = "loraplex_base.json"  # where a base came from (e.g. the GGUF file it was imported from)

# LoRA-targetable projections per model_type: every attention and MLP projection (never lm_head).
TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
}


class BaseModelError(ValueError):
    """The base directory is not a usable causal language model; the message says what is missing."""


def weight_files(base_dir: str | Path) -> list[Path]:
    """The weight files of a model directory, sorted by relative path (checkpoint folders excluded)."""
    base_dir = Path(base_dir)
    files = [
        p
        for p in base_dir.rglob("*")
        if p.is_file() and p.suffix in WEIGHT_SUFFIXES and "checkpoints" not in p.relative_to(base_dir).parts
    ]
    return sorted(files, key=lambda p: p.relative_to(base_dir).as_posix())


def weights_sha256(base_dir: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 over every weight file in sorted order: for each, its relative path, a NUL, its bytes.

    Deterministic for the same files whatever the file system's listing order; independent of
    config or tokenizer edits, which do not change what an adapter was trained against.
    """
    base_dir = Path(base_dir)
    files = weight_files(base_dir)
    if not files:
        raise BaseModelError(
            f"{base_dir} holds no weight files ({', '.join(WEIGHT_SUFFIXES)}); "
            "pass a Hugging Face model directory (e.g. one written by `loraplex tiny-base`)"
        )
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(base_dir).as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            while block := f.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def read_config(base_dir: str | Path) -> dict[str, Any]:
    """config.json of a model directory, with an error that says what the directory should be."""
    base_dir = Path(base_dir)
    path = base_dir / "config.json"
    if not base_dir.is_dir():
        raise BaseModelError(f"base model directory {base_dir} does not exist")
    if not path.is_file():
        raise BaseModelError(
            f"{base_dir} is not a Hugging Face model directory (no config.json); pass a causal LM "
            "directory such as one written by `loraplex tiny-base --out DIR` or `save_pretrained`"
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BaseModelError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict) or "model_type" not in config:
        raise BaseModelError(f"{path} has no 'model_type': it is not a transformers model config")
    architectures = config.get("architectures") or []
    if not any(str(a).endswith("ForCausalLM") for a in architectures):
        raise BaseModelError(
            f"{base_dir} is not a causal language model: config.json lists architectures "
            f"{architectures or 'none'}, expected one ending in 'ForCausalLM' (e.g. LlamaForCausalLM)"
        )
    return config


def check_tokenizer(base_dir: Path) -> None:
    """The tokenizer files training, export and the server all need."""
    if not any((base_dir / name).is_file() for name in TOKENIZER_FILES):
        raise BaseModelError(
            f"{base_dir} has no tokenizer ({' or '.join(TOKENIZER_FILES)}); save it beside the model with "
            "`tokenizer.save_pretrained(DIR)` (`loraplex base import-gguf` and `loraplex tiny-base` write one)"
        )


def base_identity(base_dir: str | Path) -> dict[str, object]:
    """What an adapter was trained on: {path, architecture, model_type, sha256} (+ `source` when the
    base was imported, e.g. the GGUF file's name and sha256). No torch needed."""
    base_dir = Path(base_dir)
    config = read_config(base_dir)
    check_tokenizer(base_dir)
    architecture = next(a for a in config["architectures"] if str(a).endswith("ForCausalLM"))
    identity: dict[str, object] = {
        "path": str(base_dir.resolve()),
        "architecture": architecture,
        "model_type": config["model_type"],
        "sha256": weights_sha256(base_dir),
    }
    if (base_dir / BASE_RECORD).is_file():
        identity["source"] = json.loads((base_dir / BASE_RECORD).read_text())
    return identity


def target_modules_for(model_type: str, model: Any = None) -> list[str]:
    """The LoRA-targetable module names of an architecture.

    Known architectures use the fixed list above; for others, pass the loaded model and the
    names of its Linear layers (except the output head) are used.
    """
    if model_type in TARGET_MODULES:
        return list(TARGET_MODULES[model_type])
    if model is None:
        raise BaseModelError(
            f"no LoRA target list for model_type {model_type!r}; known: {', '.join(TARGET_MODULES)} "
            "(or pass target_modules explicitly)"
        )
    import torch

    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
    }
    return sorted(names)


def resolve_target_modules(requested: list[str] | None, model_type: str, model: Any = None) -> list[str]:
    """`requested` checked against the architecture (None = all projections); errors list the valid names."""
    valid = target_modules_for(model_type, model)
    if requested is None:
        return valid
    unknown = [m for m in requested if m not in valid]
    if unknown:
        raise BaseModelError(
            f"target module {unknown[0]!r} does not exist in {model_type} models; "
            f"valid target modules: {', '.join(valid)}"
        )
    return [m for m in valid if m in requested]


def load_base_model(base_dir: str | Path, *, quantize_4bit: bool = False):
    """(model, tokenizer) for training: float32 on CPU, or 4-bit (QLoRA) on CUDA. Frozen, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = Path(base_dir)
    read_config(base_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"{base_dir} has no loadable tokenizer ({exc}); save one beside the model") from exc
    if tokenizer.eos_token_id is None:
        raise BaseModelError(f"the tokenizer in {base_dir} has no EOS token; completions could never stop")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if quantize_4bit:
        from transformers import BitsAndBytesConfig

        kwargs = {
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
            ),
            "device_map": {"": 0},
        }
    try:
        model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise BaseModelError(f"{base_dir} could not be loaded as a causal LM: {exc}") from exc
    model.requires_grad_(False)
    model.eval()
    return model, tokenizer
