"""Generated gRPC/protobuf code for the public contract `loraplex.v1` (never edit by hand; `make proto`)."""
