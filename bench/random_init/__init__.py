"""The random part of `bench.run`: a larger random-init Llama against onnxruntime-genai and PyTorch PEFT."""
