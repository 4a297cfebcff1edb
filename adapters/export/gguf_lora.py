"""A trained adapter as a llama.cpp LoRA GGUF: one trainer, both runtimes.

llama.cpp (and Ollama, built on it) loads LoRA adapters as GGUF files and switches them per
request. What its loader (`src/llama-adapter.cpp`) reads:
- KV `general.architecture` equal to the base model's (`llama`, `qwen2`, `phi3`), `general.type =
  "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha` (float32). The scale it applies is
  `user_scale * alpha / rank`, the rank read per tensor; alpha 0 (or absent) means `user_scale`.
- For each adapted projection, `blk.N.<attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down>
  .weight.lora_a` holding PEFT's `lora_A.weight` as is (numpy `[r, in]`, GGUF ne `[in, r]`) and
  `...lora_b` holding `lora_B.weight` (`[out, r]`).
- For llama-family bases, llama.cpp's own HF -> GGUF conversion permutes the rows of the q and
  k projections (HF's rotate-half RoPE layout -> GGML's interleaved pairs): within each head of
  size d, row j of the GGUF is row `j // 2 + (j % 2) * d / 2` of HF. A LoRA delta `B @ A` adds to
  those rows, so `lora_b` of q and k gets the same row permutation (q over the attention heads, k
  over the KV heads); A, v, o and the MLP are not permuted. Without it an adapter still loads but
  computes the wrong thing (logits off by ~0.7 instead of ~0.02 on SmolLM2).

PEFT's scaling is kept as `adapter.lora.alpha` when llama.cpp's rule reproduces it (alpha / r per
module); rsLoRA (alpha / sqrt(r)) and per-module alphas (`alpha_pattern`) are folded into `lora_b`
with alpha written as 0. Module names come from the `gguf` package's tensor-name map (the one
llama.cpp's converters use). Needs numpy, safetensors and gguf; no torch.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from loraplex.adapters.export.peft_adapter import PeftAdapter, load_peft_adapter

GGUF_SUFFIX = ".gguf"
GgufDtype = Literal["f32", "f16"]
# transformers model_type -> llama.cpp architecture (what `general.architecture` of the base says)
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "phi3": "phi3"}
# llama.cpp's converter permutes q/k rows (rotate-half -> interleaved RoPE) for these only.
PERMUTED_ARCHITECTURES = ("llama",)


class GgufExportError(ValueError):
    """The adapter or base cannot become a llama.cpp LoRA GGUF; the message says why and what to do."""


@dataclass(frozen=True)
class GgufBase:
    """What the conversion needs to know about the base model."""

    architecture: str  # llama.cpp's name: llama, qwen2, phi3
    num_layers: int
    num_heads: int
    num_kv_heads: int

    @classmethod
    def from_hf_config(cls, config: dict, where: str) -> GgufBase:
        model_type = config.get("model_type")
        if model_type not in ARCHITECTURES:
            raise GgufExportError(
                f"{where}: model_type {model_type!r} has no llama.cpp LoRA mapping here; supported: "
                f"{', '.join(sorted(ARCHITECTURES))}"
            )
        try:
            heads = int(config["num_attention_heads"])
            return cls(ARCHITECTURES[model_type], int(config["num_hidden_layers"]), heads,
                       int(config.get("num_key_value_heads") or heads))
        except (KeyError, TypeError, ValueError) as exc:
            raise GgufExportError(f"{where} lacks {exc}: is it a transformers config.json?") from exc

    @classmethod
    def from_base_dir(cls, base_dir: str | Path) -> GgufBase:
        """From a Hugging Face base model directory (its config.json)."""
        path = Path(base_dir) / "config.json"
        if not path.is_file():
            raise GgufExportError(f"{path} not found: pass the base model directory the adapter was trained on")
        return cls.from_hf_config(json.loads(path.read_text()), str(path))

    @classmethod
    def from_package(cls, package_dir: str | Path) -> GgufBase:
        """From a loraplex package (the manifest's base model type, genai_config's head counts)."""
        from loraplex.adapters.package.manifest import Manifest, read_package_json

        manifest = Manifest.load(package_dir)
        decoder = read_package_json(package_dir, "genai_config.json", GgufExportError)["model"]["decoder"]
        config = {"model_type": manifest.base.model_type, "num_hidden_layers": decoder["num_hidden_layers"],
                  "num_attention_heads": decoder["num_attention_heads"],
                  "num_key_value_heads": decoder["num_key_value_heads"]}
        return cls.from_hf_config(config, f"{package_dir}/manifest.json")


def rope_permute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a q/k output matrix from HF's rotate-half order to GGML's interleaved order."""
    out = weight.shape[0]
    if out % (2 * heads):
        raise GgufExportError(f"cannot permute {out} rows over {heads} heads (not a multiple of 2 x heads)")
    return weight.reshape(heads, 2, out // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tensor_name_map(base: GgufBase):
    import gguf

    arch = next((a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == base.architecture), None)
    if arch is None:
        raise GgufExportError(f"the installed gguf package does not know architecture {base.architecture!r}")
    return gguf.get_tensor_name_map(arch, base.num_layers)


def _folds_scale(adapter: PeftAdapter) -> bool:
    """True when llama.cpp's alpha / rank rule cannot express the adapter's scaling."""
    return adapter.rslora or any(m.alpha != adapter.alpha for m in adapter.modules.values())


def gguf_lora_tensors(adapter: PeftAdapter, base: GgufBase) -> tuple[dict[str, np.ndarray], float]:
    """(GGUF tensor name -> float32 array in numpy layout, the alpha to record) for `adapter`."""
    names = _tensor_name_map(base)
    fold = _folds_scale(adapter)
    raw = adapter.tensors()
    out: dict[str, np.ndarray] = {}
    for path, module in sorted(adapter.modules.items()):
        target = names.get_name(path)
        if target is None:
            raise GgufExportError(
                f"adapter {adapter.path}: module {path} has no llama.cpp tensor for a {base.architecture} base"
            )
        a = raw[f"base_model.model.{path}.lora_A.weight"]  # [r, in]
        b = raw[f"base_model.model.{path}.lora_B.weight"]  # [out, r]
        if base.architecture in PERMUTED_ARCHITECTURES and module.kind in ("q_proj", "k_proj"):
            b = rope_permute_rows(b, base.num_heads if module.kind == "q_proj" else base.num_kv_heads)
        if fold:
            b = b * np.float32(module.scaling)
        out[f"{target}.weight.lora_a"] = np.ascontiguousarray(a, dtype=np.float32)
        out[f"{target}.weight.lora_b"] = np.ascontiguousarray(b, dtype=np.float32)
    return out, 0.0 if fold else adapter.alpha


def _check_layers(adapter: PeftAdapter, base: GgufBase) -> None:
    for path in adapter.modules:
        parts = path.split(".")
        if "layers" in parts:
            layer = int(parts[parts.index("layers") + 1])
            if layer >= base.num_layers:
                raise GgufExportError(
                    f"adapter {adapter.path} adapts layer {layer} but the base has {base.num_layers} layers: "
                    "was it trained on another base model?"
                )


def export_gguf_lora(adapter_dir: str | Path, out: str | Path, base: GgufBase, *, name: str | None = None,
                     dtype: GgufDtype = "f32") -> Path:
    """Write the PEFT adapter in `adapter_dir` as a llama.cpp LoRA GGUF at `out` (atomically).

    `dtype` f16 halves the file; f32 (the default, as llama.cpp's own converter) is exact.
    """
    import gguf

    if dtype not in ("f32", "f16"):
        raise GgufExportError(f"dtype {dtype!r} is not supported; choose f32 or f16")
    adapter = load_peft_adapter(adapter_dir)
    _check_layers(adapter, base)
    tensors, alpha = gguf_lora_tensors(adapter, base)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, base.architecture)  # writes general.architecture
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        writer.add_name(name or adapter.path.name)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
        np_dtype = np.float16 if dtype == "f16" else np.float32
        for tensor_name, value in tensors.items():
            writer.add_tensor(tensor_name, value.astype(np_dtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out

