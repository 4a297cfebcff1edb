"""PEFT adapter -> `.onnx_adapter` file that fits a package graph.

The file holds the adapter's own tensors, at its own rank, for the graph inputs of the modules it
adapts (the graph's other LoRA inputs keep their zero-rank default: those modules are not adapted):
- names mapped to builder names (see `module_map`), A and B transposed to [in, r] / [r, out];
- B pre-multiplied by PEFT's scaling (alpha/r, or alpha/sqrt(r) for rsLoRA), as the builder does;
- in the graph's dtype (float32, or float16 for an fp16 package).

Written with onnxruntime's own `AdapterFormat` in graph input order, which is also how Olive's
ExtractAdapters writes it, so for an adapter the graph was built from the two files are byte-equal.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from loraplex.adapters.export.module_map import graph_kinds, graph_module_name
from loraplex.adapters.export.peft_adapter import AdapterError, PeftAdapter
from loraplex.adapters.package.adapter_file import write_adapter_file
from loraplex.adapters.package.lora_inputs import LoraInputs, lora_input_name


class IncompatibleAdapter(AdapterError):
    """The adapter cannot be expressed with the graph's LoRA inputs (missing module, shape or rank)."""


def adapter_tensors(adapter: PeftAdapter, inputs: LoraInputs) -> dict[str, np.ndarray]:
    """The adapter's tensors as the graph wants them (names, layout, scaling, dtype), in graph input order."""
    peft = adapter.tensors()
    mapped: dict[str, np.ndarray] = {}
    for module in adapter.modules.values():
        a = peft[f"base_model.model.{module.path}.lora_A.weight"]  # [r, in]
        b = peft[f"base_model.model.{module.path}.lora_B.weight"]  # [out, r]
        b = b * module.scaling  # float32 * python float, as the builder's `weight *= scaling` in torch
        prefix = graph_module_name(module.path).rsplit(".", 1)[0]
        row = 0
        for kind in graph_kinds(module.kind):
            name_a = lora_input_name(f"{prefix}.{kind}", "A")
            name_b = lora_input_name(f"{prefix}.{kind}", "B")
            if name_a not in inputs or name_b not in inputs:
                raise IncompatibleAdapter(
                    f"adapter {adapter.path} targets {module.path} but the package graph has no LoRA input "
                    f"{name_a}; re-export the package with this adapter included"
                )
            out = inputs[name_b].fixed
            part = b[row : row + out]
            row += out
            if inputs[name_a].fixed != a.shape[1] or part.shape[0] != out:
                raise IncompatibleAdapter(
                    f"adapter {adapter.path}: {module.path} has shape A{list(a.shape)} B{list(b.shape)}, the graph "
                    f"wants [{inputs[name_a].fixed}, r] / [r, {out}]: was it trained on another base model?"
                )
            mapped[name_a] = a.T
            mapped[name_b] = part.T
        if row != b.shape[0]:
            raise IncompatibleAdapter(f"adapter {adapter.path}: {module.path} B has {b.shape[0]} rows, graph {row}")

    return {inp.name: np.ascontiguousarray(mapped[inp.name], dtype=inp.dtype) for inp in inputs.inputs
            if inp.name in mapped}


def convert_adapter(adapter: PeftAdapter, inputs: LoraInputs, out_path: str | Path) -> Path:
    """PEFT adapter -> `out_path` (.onnx_adapter) fitting the graph's LoRA `inputs`."""
    return write_adapter_file(adapter_tensors(adapter, inputs), out_path)
