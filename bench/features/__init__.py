"""Standalone measurements of one loraplex feature each: Ray Serve, HTTP vs gRPC, output constraints."""
