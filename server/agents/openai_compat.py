"""An agent backed by any OpenAI-compatible chat completions endpoint.

The server registers it as agent id "assistant" when its settings give a base
URL and a model name (OpenAI itself, vLLM, Ollama, LiteLLM, OpenRouter, ...).

Two choices matter for durability (docs/durability.md):
- it uses the *chat completions* API (OpenAIChatModel, 'openai-chat:'), the
  one every compatible server implements; 'openai:' would mean the Responses
  API, which most of them do not;
- the OpenAI SDK client makes exactly one attempt per request
  (max_retries=0): Keel owns retrying, and SDK retries hidden inside a step,
  with their backoff sleeps, would stretch it past its lease and retry
  behind the executor's back.
"""

from __future__ import annotations

from openai import AsyncOpenAI
from pydantic_ai import Agent
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider

from server.agents.types import AgentSpec


def build_openai_agent(
    *, base_url: str, api_key: str, model_name: str, instructions: str | None = None
) -> AgentSpec:
    """An AgentSpec for a tool-less chat agent on an OpenAI-compatible endpoint.

    `base_url` includes the API version path (e.g. "https://api.openai.com/v1"
    or "http://localhost:11434/v1"); `api_key` may be any placeholder for
    servers that do not check it, but must not be empty (the SDK requires one).
    """
    if not base_url:
        raise ValueError("an OpenAI-compatible agent needs a base URL")
    if not model_name:
        raise ValueError("an OpenAI-compatible agent needs a model name")
    client = AsyncOpenAI(base_url=base_url, api_key=api_key or "not-set", max_retries=0)
    model = OpenAIChatModel(model_name, provider=OpenAIProvider(openai_client=client))
    description = f"A chat assistant on {model_name} (OpenAI-compatible chat completions)."
    agent: Agent[None, str] = Agent(
        model,
        instructions=instructions,
        name="assistant",
        description=description,
    )
    return AgentSpec(agent=agent, description=description)
