"""The generated messages and gRPC stubs of the Segments API (make generate)."""
