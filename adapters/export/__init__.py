"""Export: base model -> ONNX graph with LoRA inputs, PEFT adapters -> .onnx_adapter files,
parity checks, the package manifest written last. Imports torch, peft and Olive lazily.

- `package_export`: `export_package` and `add_adapter`, the stage's public API;
- `base_graph`: the onnxruntime-genai builder and Olive's ExtractAdapters;
- `peft_adapter`, `module_map`, `convert`: PEFT adapter directory -> .onnx_adapter file;
- `parity`: the package against PyTorch PEFT; `device_target`: genai_config's provider;
- `cli`: `loraplex export`, `loraplex adapters add`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["add_adapter", "export_package"]


def __getattr__(name: str) -> Any:  # lazy: `loraplex serve` parses its CLI without loading export code
    if name in __all__:
        from loraplex.adapters.export import package_export

        return getattr(package_export, name)
    raise AttributeError(name)
