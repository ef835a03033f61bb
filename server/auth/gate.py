"""The one gate every AgentService call passes: who is calling, and may they call this.

A server interceptor wraps each AgentService method of the gRPC server (the
HTTP port's transports call the same Gate, server/web/); the gate, given
the call's metadata and its TLS peer, finds the caller:

1. `authorization: Bearer <key>` metadata: the key's tenant and role
   (keys.py). Malformed metadata or an unknown key: UNAUTHENTICATED.
2. Otherwise, with mutual TLS, the client certificate: its common name is
   the tenant, its organizational unit the role (reader, runner or admin).
3. Otherwise: UNAUTHENTICATED.

A server with neither API keys nor client certificates configured is open
(local development): every call is the admin of the default tenant "", and
credentials are not looked at.

Then the method's role (METHOD_ROLES): a caller whose role is lower gets
PERMISSION_DENIED. The caller is kept in a context variable for the call
(`current_caller`), which the servicer uses to scope every resource to
the caller's tenant. Health and reflection never pass the gate.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any

import grpc
from grpc_status import rpc_status

from server import logs
from server.api import status
from server.auth.keys import Caller, KeyRing, Role, check_tenant
from server.errors import PermissionDenied, Unauthenticated

SERVICE = "keel.v1.AgentService"
_BEARER = re.compile(r"Bearer ([^\s]+)")
_OPEN = Caller("", Role.ADMIN)

METHOD_ROLES: dict[str, Role] = {
    # Reading.
    "Observe": Role.READER,
    "GetRun": Role.READER,
    "ListRuns": Role.READER,
    "ListAgents": Role.READER,
    "GetThread": Role.READER,
    "ListThreads": Role.READER,
    "ListThreadMessages": Role.READER,
    "GetTask": Role.READER,
    "ListTasks": Role.READER,
    "GetSchedule": Role.READER,
    "ListSchedules": Role.READER,
    "ListScheduleRuns": Role.READER,
    # Running: runs, and the threads and tasks they work on.
    "Stream": Role.RUNNER,
    "StartRun": Role.RUNNER,
    "Resume": Role.RUNNER,
    "CancelRun": Role.RUNNER,
    "CreateThread": Role.RUNNER,
    "DeleteThread": Role.RUNNER,
    "CancelTask": Role.RUNNER,
    "RetryTask": Role.RUNNER,
    # Administering: schedules start runs with nobody watching.
    "CreateSchedule": Role.ADMIN,
    "UpdateSchedule": Role.ADMIN,
    "DeleteSchedule": Role.ADMIN,
    "TriggerSchedule": Role.ADMIN,
}

A2A_SERVICE = "lf.a2a.v1.A2AService"
# A2A's methods (server/a2a/), on the gRPC port and the HTTP port alike.
A2A_METHOD_ROLES: dict[str, Role] = {
    # Reading tasks (runs) and their push configurations.
    "GetTask": Role.READER,
    "ListTasks": Role.READER,
    "SubscribeToTask": Role.READER,
    "GetTaskPushNotificationConfig": Role.READER,
    "ListTaskPushNotificationConfigs": Role.READER,
    "GetExtendedAgentCard": Role.READER,
    # Running: sending a message starts or resumes a run.
    "SendMessage": Role.RUNNER,
    "SendStreamingMessage": Role.RUNNER,
    "CancelTask": Role.RUNNER,
    "CreateTaskPushNotificationConfig": Role.RUNNER,
    "DeleteTaskPushNotificationConfig": Role.RUNNER,
}

_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar("caller", default=_OPEN)


def current_caller() -> Caller:
    """The caller of the AgentService call being handled (the open admin outside any)."""
    return _caller.get()


def identify(
    metadata: Mapping[str, str], auth_context: Mapping[str, Iterable[bytes]], keys: KeyRing | None
) -> Caller:
    """The caller of a call with this metadata and TLS peer, on a server that requires
    credentials (see the module docstring)."""
    header = metadata.get("authorization")
    if header is not None:
        match = _BEARER.fullmatch(header.strip())
        if match is None:
            raise Unauthenticated("malformed authorization metadata: expected 'Bearer <key>'")
        caller = keys.caller(match.group(1)) if keys is not None else None
        if caller is None:
            raise Unauthenticated("unknown API key")
        return caller
    subject = list(auth_context.get("x509_subject", ()))
    if subject:
        return _from_certificate(subject[0].decode())
    raise Unauthenticated("missing authorization metadata: send 'authorization: Bearer <key>'")


def _from_certificate(subject: str) -> Caller:
    """Tenant and role from a client certificate's subject ("CN=acme,OU=runner,...")."""
    parts = dict(part.split("=", 1) for part in re.split(r"(?<!\\),", subject) if "=" in part)
    tenant, role = parts.get("CN", ""), parts.get("OU", "")
    try:
        check_tenant(tenant)
    except ValueError as exc:
        raise Unauthenticated(f"the client certificate's common name: {exc}") from None
    try:
        return Caller(tenant, Role(role))
    except ValueError:
        raise Unauthenticated(
            f"the client certificate's organizational unit {role!r} is not a role "
            "(reader, runner or admin)"
        ) from None


def authorize(caller: Caller, method: str, roles: Mapping[str, Role] = METHOD_ROLES) -> None:
    """PermissionDenied unless the caller's role is at least the one `roles` gives `method`."""
    needed = roles[method]
    if not caller.role.allows(needed):
        raise PermissionDenied(method, caller.role.value, needed.value)


class Gate:
    """Admits calls: finds the caller (see the module docstring) and checks its role.

    One gate serves every transport: gRPC (AuthInterceptor) and the HTTP port's
    Connect, gRPC-Web and Server-Sent Events (server/web/). `keys` None: no API keys.
    """

    def __init__(self, keys: KeyRing | None, *, client_certificates: bool = False) -> None:
        self._keys = keys
        self._strict = keys is not None or client_certificates

    @property
    def open(self) -> bool:
        """No credentials are looked at: every call is the default tenant's admin."""
        return not self._strict

    def admit(
        self,
        method: str,
        metadata: Mapping[str, str],
        auth_context: Mapping[str, Iterable[bytes]] | None = None,
        roles: Mapping[str, Role] = METHOD_ROLES,
    ) -> Caller:
        """The caller, now the current one (current_caller) for the rest of the call;
        Unauthenticated or PermissionDenied (its role is below what `roles` says) otherwise."""
        caller = self._identify(metadata, auth_context)
        authorize(caller, method, roles)
        return _set_current(caller)

    def identify(
        self,
        metadata: Mapping[str, str],
        auth_context: Mapping[str, Iterable[bytes]] | None = None,
    ) -> Caller:
        """The caller, whatever its role, now the current one (a call whose method is
        known later is authorized then); Unauthenticated otherwise."""
        return _set_current(self._identify(metadata, auth_context))

    def _identify(
        self, metadata: Mapping[str, str], auth_context: Mapping[str, Iterable[bytes]] | None
    ) -> Caller:
        return identify(metadata, auth_context or {}, self._keys) if self._strict else _OPEN


def _set_current(caller: Caller) -> Caller:
    _caller.set(caller)
    logs.tenant_var.set(caller.tenant)
    return caller


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Puts every method of one service of the gRPC server (`roles` names them) behind
    the gate: AgentService by default; A2AService with A2A_METHOD_ROLES."""

    def __init__(
        self, gate: Gate, *, service: str = SERVICE, roles: Mapping[str, Role] = METHOD_ROLES
    ) -> None:
        self._gate = gate
        self._service = service
        self._roles = roles

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        service, _, method = handler_call_details.method.lstrip("/").rpartition("/")
        if handler is None or service != self._service or method not in self._roles:
            return handler
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_unary_rpc_method_handler(
            self._unary(method, handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    async def _admit(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> bool:
        """Set the call's caller; False after aborting the call (UNAUTHENTICATED, ...)."""
        try:
            if self._gate.open:
                self._gate.admit(method, {}, roles=self._roles)
            else:
                metadata = {
                    key: value
                    for key, value in context.invocation_metadata() or ()
                    if isinstance(value, str)
                }
                self._gate.admit(method, metadata, context.auth_context(), self._roles)
        except (Unauthenticated, PermissionDenied) as exc:
            await context.abort_with_status(rpc_status.to_status(status.to_status(exc)))
            return False
        return True

    def _unary(self, method: str, behavior: Any) -> Any:
        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if not await self._admit(method, context):
                return None
            return await behavior(request, context)

        return unary

    def _streaming(self, method: str, behavior: Any) -> Any:
        async def streaming(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            if not await self._admit(method, context):
                return
            async for response in behavior(request, context):
                yield response

        return streaming
