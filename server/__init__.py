"""Keel: a gRPC service that runs pydantic-ai agents durably, with resumable event streams."""
