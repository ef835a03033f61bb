"""Authentication and authorization: API keys (keys.py) or client certificates, roles per
RPC, and the caller of the current call (gate.py)."""
