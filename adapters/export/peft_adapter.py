"""Read a PEFT LoRA adapter directory: its config, its tensors, and the trainer's `training.json`.

Only what export needs: the rank and scaling of every targeted module, taken from the saved
tensors themselves (so `rank_pattern`, `all-linear` and regex targets need no re-implementation),
and the alpha from `lora_alpha`/`alpha_pattern` as PEFT applies it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
TRAINING_NAME = "training.json"
# base_model.model.<module path>.lora_A.weight  (PEFT's saved key layout)
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


_NOT_PROJECTIONS = {"embed_tokens", "lm_head", "wte", "wpe", "embed_out"}


class AdapterError(ValueError):
    """An adapter directory cannot be exported; the message says which file or field and why."""


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear layer: `path` is the module path in the transformers model."""

    path: str  # e.g. model.layers.0.self_attn.q_proj
    rank: int
    alpha: float
    scaling: float  # alpha / rank, or alpha / sqrt(rank) for rsLoRA: what PEFT multiplies B @ A by

    @property
    def kind(self) -> str:
        """The module's short name (q_proj, gate_up_proj, ...), what `target_modules` lists."""
        return self.path.rsplit(".", 1)[-1]


@dataclass
class PeftAdapter:
    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule]  # by module path
    training: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def rank(self) -> int:
        """The largest rank over the adapter's modules (what the file is padded to at least)."""
        return max(m.rank for m in self.modules.values())

    @property
    def alpha(self) -> float:
        return float(self.config.get("lora_alpha", 8))

    @property
    def rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    @property
    def target_modules(self) -> list[str]:
        """Module kinds the adapter actually holds weights for, sorted."""
        return sorted({m.kind for m in self.modules.values()})

    @property
    def template(self) -> dict[str, str] | None:
        tpl = (self.training or {}).get("template")
        if isinstance(tpl, dict) and "prompt" in tpl:
            return {"prompt": str(tpl["prompt"]), "completion": str(tpl.get("completion", ""))}
        return None

    @property
    def output(self) -> dict[str, Any] | None:
        """The output contract training recorded ({kind, spec}), or None (free text, or an older training.json)."""
        value = (self.training or {}).get("output")
        return dict(value) if isinstance(value, dict) else None

    @property
    def base_sha256(self) -> str | None:
        """The base model's weight hash the trainer recorded, if any (None for adapters made elsewhere)."""
        base = (self.training or {}).get("base")
        if isinstance(base, dict) and base.get("sha256"):
            return str(base["sha256"])
        value = (self.training or {}).get("base_sha256")
        return str(value) if value else None

    @property
    def data_path(self) -> Path | None:
        """The data file the trainer recorded: `data.path` (dataset summary) or `config.data` (options)."""
        training = self.training or {}
        for holder in (training, training.get("config")):
            value = holder.get("data") if isinstance(holder, dict) else None
            if isinstance(value, dict):
                value = value.get("path")
            if isinstance(value, str) and value:
                return Path(value)
        return None

    @property
    def eval_split(self) -> tuple[float, int] | None:
        """(eval_split, seed) of the training run, to find the records it held out."""
        config = (self.training or {}).get("config")
        if isinstance(config, dict) and config.get("eval_split"):
            return float(config["eval_split"]), int(config.get("seed", 0))
        return None

    @property
    def task_metric(self) -> str | None:
        """The metric training selected this adapter by (`metric` in training.json), if recorded."""
        value = (self.training or {}).get("metric")
        return value if isinstance(value, str) and value else None

    @property
    def weights_size(self) -> int:
        return (self.path / WEIGHTS_NAME).stat().st_size

    def tensors(self) -> dict[str, np.ndarray]:
        """PEFT's saved tensors as float32 numpy arrays, keyed as saved."""
        from safetensors.numpy import load_file

        try:
            raw = load_file(str(self.path / WEIGHTS_NAME))
        except Exception as exc:  # safetensors raises its own error types
            raise AdapterError(f"{self.path / WEIGHTS_NAME} cannot be read: {exc}") from exc
        return {k: np.asarray(v, dtype=np.float32) for k, v in raw.items()}


def _pattern_value(patterns: dict[str, Any], module_path: str, default: Any) -> Any:
    """PEFT's `rank_pattern`/`alpha_pattern` lookup: a key matches a module path by suffix or regex."""
    for key, value in patterns.items():
        if module_path == key or module_path.endswith("." + key) or re.fullmatch(rf"(.*\.)?{key}", module_path):
            return value
    return default


def _check_config(path: Path, config: dict[str, Any]) -> None:
    """Refuse what the ONNX LoRA graph cannot express, naming the option and the fix."""
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path} is a {config.get('peft_type')!r} adapter; only LoRA adapters can be exported")
    for unsupported in ("use_dora", "lora_bias"):
        if config.get(unsupported):
            raise AdapterError(f"{path}: {unsupported}=true is not supported by the ONNX LoRA graph; retrain without")
    if config.get("fan_in_fan_out"):
        raise AdapterError(f"{path}: fan_in_fan_out=true (Conv1D models) is not supported")
    if config.get("modules_to_save"):
        raise AdapterError(
            f"{path} trains full copies of {', '.join(config['modules_to_save'])} (modules_to_save): whole weight "
            "matrices cannot be LoRA graph inputs; retrain without modules_to_save"
        )
    targets = config.get("target_modules") or []
    wrong = sorted({t for t in ([targets] if isinstance(targets, str) else targets) if t in _NOT_PROJECTIONS})
    if wrong:
        raise AdapterError(
            f"{path} puts LoRA on {', '.join(wrong)}: only the attention and MLP projections are LoRA graph "
            "inputs; retrain with target_modules among the projections (q_proj, k_proj, v_proj, o_proj, ...)"
        )


def _lora_shapes(path: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """module path -> {"A": shape, "B": shape} from the adapter's saved tensors."""
    from safetensors import safe_open

    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    with safe_open(str(path / WEIGHTS_NAME), framework="numpy") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            match = _KEY.match(key)
            if not match:
                what = "an embedding/LM-head LoRA" if "lora_embedding" in key or "lm_head" in key else "not a LoRA"
                raise AdapterError(
                    f"{path / WEIGHTS_NAME}: tensor {key!r} is {what} weight of a projection; only attention and "
                    "MLP projections can be exported: retrain targeting those"
                )
            shapes.setdefault(match["module"], {})[match["ab"]] = tuple(f.get_slice(key).get_shape())
    if not shapes:
        raise AdapterError(f"{path / WEIGHTS_NAME} holds no LoRA weights")
    return shapes


def load_peft_adapter(adapter_dir: str | Path) -> PeftAdapter:
    """Read an adapter directory written by `PeftModel.save_pretrained` (and, optionally, the trainer)."""
    path = Path(adapter_dir)
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterError(f"{path} has no {CONFIG_NAME}: pass a PEFT adapter directory (save_pretrained output)")
    if not (path / WEIGHTS_NAME).is_file():
        raise AdapterError(f"{path} has no {WEIGHTS_NAME}: save the adapter with safe_serialization=True")
    config = json.loads(config_path.read_text())
    _check_config(path, config)
    shapes = _lora_shapes(path)

    alpha_default = float(config.get("lora_alpha", 8))
    rslora = bool(config.get("use_rslora", False))
    modules = {}
    for module_path, ab in sorted(shapes.items()):
        if set(ab) != {"A", "B"} or ab["A"][0] != ab["B"][1]:
            raise AdapterError(f"{path}: module {module_path} has mismatched LoRA A/B weights {ab}")
        rank = int(ab["A"][0])
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module_path, alpha_default))
        # Same arithmetic as peft.tuners.lora.layer.LoraLayer.update_layer (python floats).
        scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        modules[module_path] = LoraModule(module_path, rank, alpha, scaling)

    training = None
    if (path / TRAINING_NAME).is_file():
        training = json.loads((path / TRAINING_NAME).read_text())
    return PeftAdapter(path=path, config=config, modules=modules, training=training)
