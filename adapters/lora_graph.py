"""The LoRA inputs of an exported graph, and how PEFT module paths map onto them.

The onnxruntime-genai builder names LoRA weights `model.layers.N.attn.q_proj.lora_A.MatMul.weight`
([in, r]) and `...lora_B.MatMul.weight` ([r, out]); PEFT saves
`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` ([r, in]). Fused projections
(Phi-3's `qkv_proj` and `gate_up_proj`) are unpacked by the builder into q/k/v and gate/up
branches that share A and split B row-wise; the mapping below does the same.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_INPUT = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.MatMul\.weight$")
LORA_RANK_DIM = "lora_r"
# PEFT module kind -> graph module kinds it becomes (in B's row order)
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass(frozen=True)
class LoraInput:
    name: str
    shape: tuple[int, int]  # [in, r] for A, [r, out] for B; r is the graph's symbolic dim (0 here)
    dtype: np.dtype

    @property
    def module(self) -> str:
        return _INPUT.match(self.name)["module"]

    @property
    def is_a(self) -> bool:
        return _INPUT.match(self.name)["ab"] == "A"

    @property
    def kind(self) -> str:
        return self.module.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class LoraGraph:
    """What an adapter file must provide: every input here, all at one rank."""

    inputs: tuple[LoraInput, ...]  # in graph order (the order Olive writes its adapter file in)

    @property
    def names(self) -> list[str]:
        return [i.name for i in self.inputs]

    @property
    def kinds(self) -> list[str]:
        """Module kinds with LoRA inputs (graph names: q_proj, never qkv_proj), sorted."""
        return sorted({i.kind for i in self.inputs})

    def by_name(self) -> dict[str, LoraInput]:
        return {i.name: i for i in self.inputs}


def read_lora_graph(model_path: str | Path) -> LoraGraph:
    """LoRA inputs of `model_path` (weights are not loaded: only the graph's input list)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(model_path), load_external_data=False)
    inputs = []
    for value in model.graph.input:
        if not _INPUT.match(value.name):
            continue
        dims = value.type.tensor_type.shape.dim
        shape = tuple(d.dim_value if d.HasField("dim_value") else 0 for d in dims)
        dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        inputs.append(LoraInput(value.name, shape, np.dtype(dtype)))
    if not inputs:
        raise ValueError(f"{model_path} has no LoRA inputs: it was not built by `loraplex export`")
    return LoraGraph(tuple(inputs))


def graph_module_name(peft_module_path: str) -> str:
    """`model.layers.0.self_attn.q_proj` -> `model.layers.0.attn.q_proj` (builder naming)."""
    return peft_module_path.replace(".self_attn.", ".attn.")


def graph_kinds(peft_kind: str) -> tuple[str, ...]:
    """Graph module kinds a PEFT module kind becomes (fused projections unpack into several)."""
    return FUSED.get(peft_kind, (peft_kind,))
