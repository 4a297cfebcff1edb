"""The systems under test behind one interface: loraplex over gRPC and its peers (onnxruntime-genai,
PyTorch PEFT, llama.cpp)."""
