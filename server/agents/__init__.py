"""② The agent loop over pydantic-ai: the registry, event mapping and test agents."""
