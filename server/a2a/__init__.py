"""A2A (the Agent2Agent protocol 1.0) over Keel runs: see docs/a2a.md."""
