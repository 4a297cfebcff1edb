"""PEFT adapter -> `.onnx_adapter` file that fits a package graph.

The file holds one tensor per LoRA input of the graph, all at the graph-wide rank:
- names mapped to builder names (see `module_map`), A and B transposed to [in, r] / [r, out];
- B pre-multiplied by PEFT's scaling (alpha/r, or alpha/sqrt(r) for rsLoRA), as the builder does;
- modules the adapter does not target, and ranks below the graph-wide rank, zero-padded. Padding
  is exact: zero columns of A meet zero rows of B, adding exact zeros to the output.

Written with onnxruntime's own `AdapterFormat` in graph input order, which is also how Olive's
ExtractAdapters writes it, so for an adapter the graph was built from the two files are byte-equal.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from loraplex.adapters.export.module_map import graph_kinds, graph_module_name
from loraplex.adapters.export.peft_adapter import AdapterError, PeftAdapter
from loraplex.adapters.package.lora_inputs import LoraInputs, lora_input_name


class IncompatibleAdapter(AdapterError):
    """The adapter cannot be expressed with the graph's LoRA inputs (missing module, shape or rank)."""


def adapter_tensors(adapter: PeftAdapter, inputs: LoraInputs, rank: int) -> dict[str, np.ndarray]:
    """The adapter's tensors as the graph wants them, in graph input order, every one at `rank`."""
    if adapter.rank > rank:
        raise IncompatibleAdapter(
            f"adapter {adapter.path} has rank {adapter.rank} but the package's adapters are padded to rank "
            f"{rank}; re-export the package with this adapter included (the graph rank is the largest rank)"
        )
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

    tensors = {}
    for inp in inputs.inputs:
        rows, cols = inp.shape(rank)
        value = mapped.get(inp.name)
        if value is None:
            tensors[inp.name] = np.zeros((rows, cols), dtype=inp.dtype)
        elif value.shape == (rows, cols):
            tensors[inp.name] = np.ascontiguousarray(value, dtype=inp.dtype)
        else:
            padded = np.zeros((rows, cols), dtype=inp.dtype)
            padded[: value.shape[0], : value.shape[1]] = value
            tensors[inp.name] = padded
    return tensors


def readable_mode() -> int:
    """0666 minus the process umask: what a plain `open(..., "w")` would have created."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_onnx_adapter(tensors: dict[str, np.ndarray], out_path: str | Path) -> Path:
    """Write tensors as an ONNX Runtime adapter file, atomically.

    A running server may have the old file memory-mapped: never truncate it in place; write a
    temporary file beside it and rename over it.
    """
    import onnxruntime as ort

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    os.close(fd)
    try:
        fmt = ort.AdapterFormat()
        fmt.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in tensors.items()})
        fmt.export_adapter(tmp)
        os.chmod(tmp, readable_mode())  # mkstemp makes 0600; a server under another user must read it
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_path


def convert_adapter(adapter: PeftAdapter, inputs: LoraInputs, rank: int, out_path: str | Path) -> Path:
    """PEFT adapter -> `out_path` (.onnx_adapter) fitting the graph's LoRA `inputs` at `rank`."""
    return write_onnx_adapter(adapter_tensors(adapter, inputs, rank), out_path)
