"""Serving: engines, adapter registry, gRPC and HTTP servers, the in-process API, client, errors.

Imports only onnxruntime, onnxruntime-genai, grpcio and protobuf: never torch, peft or olive
(`runtime.app`, the command line and demos for every stage, imports the other stages lazily).
"""
