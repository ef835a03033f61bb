"""Agent cards: one per agent of the registry (docs/a2a.md)."""

from __future__ import annotations

from collections.abc import Mapping

from a2a.types import a2a_pb2 as a2a
from a2a.utils.constants import PROTOCOL_VERSION_1_0, TransportProtocol

from server.agents.registry import describe
from server.agents.types import AgentSpec

PREFIX = "/a2a"  # an agent's JSON-RPC endpoint: PREFIX/<agent id>
REST = "rest"  # an agent's HTTP+JSON binding: PREFIX/<agent id>/REST/...
CARD_PATH = "/.well-known/agent-card.json"
BEARER = "bearer"  # the security scheme's name


def jsonrpc_path(agent_id: str) -> str:
    return f"{PREFIX}/{agent_id}"


def card(
    agent_id: str,
    spec: AgentSpec,
    *,
    http_base: str,
    grpc_target: str,
    secured: bool,
) -> a2a.AgentCard:
    """The card of `agent_id`; `http_base`: the HTTP port's URL as the caller reached it
    ("http://host:port"); `grpc_target`: the gRPC port's ("host:port"), "" for none."""
    description = describe(spec)
    interfaces = [
        a2a.AgentInterface(
            url=http_base + jsonrpc_path(agent_id),
            protocol_binding=TransportProtocol.JSONRPC.value,
            protocol_version=PROTOCOL_VERSION_1_0,
        ),
        a2a.AgentInterface(
            url=f"{http_base}{jsonrpc_path(agent_id)}/{REST}",
            protocol_binding=TransportProtocol.HTTP_JSON.value,
            protocol_version=PROTOCOL_VERSION_1_0,
        ),
    ]
    if grpc_target:
        # The gRPC binding serves every agent: the request's tenant field names it,
        # and the SDK's client copies the interface's tenant into every request.
        interfaces.append(
            a2a.AgentInterface(
                url=grpc_target,
                protocol_binding=TransportProtocol.GRPC.value,
                protocol_version=PROTOCOL_VERSION_1_0,
                tenant=agent_id,
            )
        )
    result = a2a.AgentCard(
        name=agent_id,
        description=spec.description or f"the Keel agent {agent_id}",
        supported_interfaces=interfaces,
        version="1.0",
        capabilities=a2a.AgentCapabilities(
            streaming=True, push_notifications=True, extended_agent_card=False
        ),
        default_input_modes=["text/plain", "application/json"],
        default_output_modes=["text/plain", "application/json"],
        skills=[
            a2a.AgentSkill(
                id=tool.name,
                name=tool.name,
                description=tool.description or tool.name,
                tags=["tool"]
                + (["requires-approval"] if tool.requires_approval else [])
                + (["background"] if tool.background else []),
            )
            for tool in description.tools
        ]
        or [
            a2a.AgentSkill(
                id=agent_id,
                name=agent_id,
                description=spec.description or agent_id,
                tags=["agent"],
            )
        ],
    )
    if secured:
        result.security_schemes[BEARER].http_auth_security_scheme.CopyFrom(
            a2a.HTTPAuthSecurityScheme(
                scheme="Bearer",
                description="a Keel API key: 'Authorization: Bearer <key>'",
            )
        )
        requirement = result.security_requirements.add()
        requirement.schemes[BEARER].SetInParent()
    return result


def default_agent(agents: Mapping[str, AgentSpec], configured: str) -> str:
    """The agent of /.well-known/agent-card.json: the configured one, or the registry's first."""
    if configured:
        return configured
    return next(iter(agents), "")
