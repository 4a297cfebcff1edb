"""The LoRA inputs of a package graph: the one model of them that every stage uses.

The onnxruntime-genai builder bakes each LoRA branch into the graph as
`lora_A/MatMul -> lora_B/MatMul -> Add`; Olive's ExtractAdapters turns the two weights into graph
inputs named `<module>.lora_A.MatMul.weight` ([in, r]) and `<module>.lora_B.MatMul.weight`
([r, out], pre-scaled by alpha/r), where `module` is the builder's path of the projection
(`model.layers.0.attn.q_proj`) and `r` is a symbolic dim with a zero-rank default: an input left
unbound adds exactly nothing. Each input has one fixed dim (in for A, out for B).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

LoraKind = Literal["A", "B"]
_NAME = re.compile(r"^(?P<module>.+)\.lora_(?P<kind>[AB])\.MatMul\.weight$")


def lora_input_name(module: str, kind: LoraKind) -> str:
    """`model.layers.0.attn.q_proj`, "A" -> `model.layers.0.attn.q_proj.lora_A.MatMul.weight`."""
    return f"{module}.lora_{kind}.MatMul.weight"


def parse_lora_input_name(name: str) -> tuple[str, LoraKind] | None:
    """(module, kind) of a LoRA input name, None for any other name."""
    match = _NAME.match(name)
    return (match["module"], match["kind"]) if match else None  # type: ignore[return-value]


@dataclass(frozen=True)
class LoraInput:
    name: str
    module: str  # builder path of the projection, e.g. model.layers.0.attn.q_proj
    kind: LoraKind
    fixed: int  # the non-rank dim: in_features for A, out_features for B
    dtype: np.dtype

    @property
    def projection(self) -> str:
        """The projection's short name (q_proj, down_proj, ...)."""
        return self.module.rsplit(".", 1)[-1]

    def shape(self, rank: int) -> tuple[int, int]:
        return (self.fixed, rank) if self.kind == "A" else (rank, self.fixed)

    def split(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """(fixed, rank) of a 2-D tensor meant for this input."""
        return (shape[0], shape[1]) if self.kind == "A" else (shape[1], shape[0])


@dataclass(frozen=True)
class LoraPair:
    """One LoRA branch: its A and B inputs."""

    module: str
    a: LoraInput
    b: LoraInput

    @property
    def in_features(self) -> int:
        return self.a.fixed

    @property
    def out_features(self) -> int:
        return self.b.fixed


@dataclass(frozen=True)
class LoraInputs:
    """Every LoRA input of a graph, in graph order (the order Olive writes its adapter files in)."""

    inputs: tuple[LoraInput, ...]
    _by_name: dict[str, LoraInput] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {i.name: i for i in self.inputs})

    def __len__(self) -> int:
        return len(self.inputs)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> LoraInput:
        return self._by_name[name]

    def get(self, name: str) -> LoraInput | None:
        return self._by_name.get(name)

    @property
    def names(self) -> list[str]:
        return [i.name for i in self.inputs]

    @property
    def projections(self) -> list[str]:
        """Projection kinds with LoRA inputs (graph names: q_proj, never qkv_proj), sorted."""
        return sorted({i.projection for i in self.inputs})

    @property
    def pairs(self) -> list[LoraPair]:
        """A/B pairs in graph order; raises ValueError for an input without its partner."""
        pairs = []
        for a in self.inputs:
            if a.kind != "A":
                continue
            b = self._by_name.get(lora_input_name(a.module, "B"))
            if b is None:
                raise ValueError(f"graph input {a.name} has no matching lora_B input; re-export the package")
            pairs.append(LoraPair(a.module, a, b))
        if len(pairs) * 2 != len(self.inputs):
            raise ValueError("the graph has lora_B inputs without a lora_A partner; re-export the package")
        return pairs

    @classmethod
    def from_graph(cls, graph: Any) -> LoraInputs:
        """The LoRA inputs of an `onnx.GraphProto` (repeated inputs are listed once).

        Each must be 2-D with a fixed in (A) or out (B) dim, the shape ExtractAdapters(make_inputs)
        writes; anything else raises ValueError naming the input.
        """
        from onnx import helper

        inputs: dict[str, LoraInput] = {}
        for value in graph.input:
            parsed = parse_lora_input_name(value.name)
            if parsed is None or value.name in inputs:
                continue
            module, kind = parsed
            dims = value.type.tensor_type.shape.dim
            fixed_dim = dims[0] if kind == "A" else dims[1] if len(dims) == 2 else None
            if len(dims) != 2 or fixed_dim is None or not fixed_dim.HasField("dim_value"):
                shape = [d.dim_param or d.dim_value for d in dims]
                raise ValueError(
                    f"LoRA input {value.name} has shape {shape}; expected [in, lora_r] / [lora_r, out] with fixed "
                    "in/out: export the package with `loraplex export`"
                )
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))
            inputs[value.name] = LoraInput(value.name, module, kind, int(fixed_dim.dim_value), dtype)
        return cls(tuple(inputs.values()))


    def to_records(self) -> list[list]:
        """[name, fixed dim, dtype name] per input in graph order: what the manifest records (schema 3)."""
        return [[i.name, i.fixed, i.dtype.name] for i in self.inputs]

    @classmethod
    def from_records(cls, records: list[list]) -> LoraInputs:
        """The inputs a manifest recorded with `to_records`; ValueError naming a malformed record."""
        inputs = []
        for record in records:
            try:
                name, fixed, dtype = record
                parsed = parse_lora_input_name(name)
                if parsed is None:
                    raise ValueError(f"{name!r} is not a LoRA input name")
                inputs.append(LoraInput(name, parsed[0], parsed[1], int(fixed), np.dtype(dtype)))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"manifest lora_graph_inputs record {record!r} is malformed ({exc}): "
                                 "re-export the package") from exc
        return cls(tuple(inputs))


def read_lora_inputs(model_path: str | Path) -> LoraInputs:
    """The LoRA inputs of an ONNX file (its weights are not loaded, only the graph's input list)."""
    import onnx

    return LoraInputs.from_graph(onnx.load(str(model_path), load_external_data=False).graph)
