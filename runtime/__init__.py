"""Serving: engines, scheduler, adapter registry, gRPC server, client and CLI.

Imports only onnxruntime, onnxruntime-genai, grpcio and protobuf: never torch, peft or olive.
"""
