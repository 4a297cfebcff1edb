"""The package format: the contract between export (which writes packages) and the server.

Light imports only (stdlib, numpy, onnx; onnxruntime to read adapter files), so the trainer, the
export stage and the runtime all import it:
- `manifest`: manifest.json's schema, adapter names, file hashes;
- `template`: task prompt templates (the trainer renders with them, the server renders inputs);
- `genai_config`: the model facts of genai_config.json;
- `lora_inputs`: the graph's LoRA inputs (name pattern, module, kind A/B, fixed dim, dtype);
- `adapter_file`: reading and checking an .onnx_adapter file against those inputs;
- `devices`: devices and execution providers;
- `reader`: `Package`, a package directory opened once.
"""
