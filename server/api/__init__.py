"""① The gRPC edge: a thin servicer, request validation and the one error mapping."""
