"""Export: base model -> ONNX with LoRA inputs, PEFT adapters -> .onnx_adapter, parity, manifest.

Modules here import torch/olive lazily; `manifest` is stdlib-only so the runtime can read packages.
"""
