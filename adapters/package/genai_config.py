"""`genai_config.json`: the model facts the builder writes, read once into typed values.

onnxruntime-genai reads this file itself; loraplex reads it for the context length, the vocabulary,
the EOS ids and, for the batched engine, the decoder's input/output names and KV-cache shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.adapters.package.manifest import read_package_json

GENAI_CONFIG_NAME = "genai_config.json"


class GenaiConfigError(ValueError):
    """genai_config.json is missing or lacks a field loraplex needs."""


@dataclass(frozen=True)
class KVNames:
    """Graph input/output names of one decoder layer's KV cache."""

    past_key: str
    past_value: str
    present_key: str
    present_value: str


@dataclass(frozen=True)
class GenaiConfig:
    context_length: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    model_file: str  # the decoder graph, relative to the package
    num_layers: int
    num_kv_heads: int
    head_size: int
    kv_names: tuple[KVNames, ...]  # one per layer
    input_ids_name: str
    attention_mask_name: str
    logits_name: str

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = GENAI_CONFIG_NAME) -> GenaiConfig:
        try:
            model = data["model"]
            decoder = model["decoder"]
            inputs, outputs = decoder["inputs"], decoder["outputs"]
            layers = int(decoder["num_hidden_layers"])
            eos = model.get("eos_token_id", [])
            return cls(
                context_length=int(model["context_length"]),
                vocab_size=int(model["vocab_size"]),
                eos_token_ids=tuple(int(e) for e in (eos if isinstance(eos, list) else [eos])),
                pad_token_id=int(model.get("pad_token_id", 0)),
                model_file=str(decoder["filename"]),
                num_layers=layers,
                num_kv_heads=int(decoder["num_key_value_heads"]),
                head_size=int(decoder["head_size"]),
                kv_names=tuple(
                    KVNames(
                        inputs["past_key_names"] % i,
                        inputs["past_value_names"] % i,
                        outputs["present_key_names"] % i,
                        outputs["present_value_names"] % i,
                    )
                    for i in range(layers)
                ),
                input_ids_name=inputs.get("input_ids", "input_ids"),
                attention_mask_name=inputs.get("attention_mask", "attention_mask"),
                logits_name=outputs.get("logits", "logits"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise GenaiConfigError(f"{where} lacks or mangles {exc}: re-export the package") from exc

    @classmethod
    def load(cls, package_dir: str | Path) -> GenaiConfig:
        data = read_package_json(package_dir, GENAI_CONFIG_NAME, GenaiConfigError)
        return cls.from_dict(data, where=str(Path(package_dir) / GENAI_CONFIG_NAME))
