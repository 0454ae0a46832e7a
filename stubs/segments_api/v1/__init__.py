"""Generated from protos/segments/v1."""
