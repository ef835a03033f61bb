"""A remote A2A agent as a pydantic-ai tool for Keel agents (docs/a2a-client.md).

    from server.a2a.remote import a2a_agent_tool

    research = a2a_agent_tool(
        "https://agents.example.com/a2a/researcher", name="ask_researcher"
    )
    agent = Agent(model, tools=[research])

The model calls the tool with a message (text); the tool sends it to the
remote agent (SendStreamingMessage over JSON-RPC or HTTP+JSON, as its card
offers), turns every event of the remote task into a ToolOutput event of
the calling run (server/runs/journal.py, JournaledCall.output), and returns
the remote's answer: the text of its artifacts (or of its last message), or
{"text": ..., "data": [...]} when its artifacts hold data too.

Durability, through the tool journal (server/runs/journal.py):

- a call that returned is journaled like any tool call: a step re-run after
  a takeover gets the journaled answer and the remote is not called again;
- the moment the remote names its task, the task id is noted in the
  journal; a call interrupted after that (its process died) runs again on
  the run's next owner, finds the note, and follows the same remote task
  (GetTask, then SubscribeToTask) instead of sending the message again;
- the message's id and context id are derived from the run and tool call
  ids (uuid5), so a call interrupted before the note landed sends the very
  same message again. Keel's own A2A server takes such a message id as the
  run's request id in that context, so the resend finds the task the first
  send started; another server may start a second task.

A remote task that fails, is canceled or rejected, or waits for input (which
this tool cannot give), and a remote that cannot be reached, are a
ModelRetry: the model sees why (a tool_error event) and may try again (a new
tool call, so a new remote task) or give up; past the tool's retries the
run fails.

The a2a client is made inside the call (on the running event loop) and
closed when the call ends; the agent card is fetched on every call.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
from a2a.client import A2ACardResolver, A2AClientError, Client, ClientConfig, ClientFactory
from a2a.types import a2a_pb2 as a2a
from a2a.utils.constants import TransportProtocol
from a2a.utils.errors import A2AError, TaskNotFoundError
from google.protobuf import json_format
from pydantic_ai import ModelRetry, Tool

from server.runs.journal import current_call

# The namespace of the message and context ids derived from a run's tool call.
ID_NAMESPACE = uuid.UUID("2d7f4c1e-8a3b-4f6d-9c2e-5b1a7e3d9f40")
DEFAULT_MAX_RETRIES = 3
RECONNECTS = 5  # times a lost remote task is looked for again before the call gives up
RECONNECT_DELAY_S = 1.0  # the first wait before looking again; doubled each time

_ENDED = frozenset(
    {
        a2a.TASK_STATE_COMPLETED,
        a2a.TASK_STATE_FAILED,
        a2a.TASK_STATE_CANCELED,
        a2a.TASK_STATE_REJECTED,
    }
)
# The remote waits for someone: its stream ends, and this tool cannot answer.
_WAITING = frozenset({a2a.TASK_STATE_INPUT_REQUIRED, a2a.TASK_STATE_AUTH_REQUIRED})
# What goes wrong talking to a remote agent (the a2a client maps HTTP and JSON-RPC
# failures to A2AError; a card it cannot use is a ValueError or a protobuf parse error).
_REMOTE_ERRORS = (A2AError, httpx.HTTPError, ValueError, json_format.Error)


class CallJournal(Protocol):
    """What a call needs of its journal (server/runs/journal.py, JournaledCall)."""

    @property
    def run_id(self) -> str: ...

    @property
    def tool_call_id(self) -> str: ...

    async def noted(self) -> bytes | None: ...

    async def note(self, value: bytes) -> None: ...

    async def output(self, value: Any) -> None: ...


def state_name(state: int) -> str:
    """An A2A task state as A2A's JSON spells it: TASK_STATE_INPUT_REQUIRED -> input-required."""
    return a2a.TaskState.Name(state).removeprefix("TASK_STATE_").lower().replace("_", "-")


def message_ids(run_id: str, tool_call_id: str) -> tuple[str, str]:
    """The message id and context id of the message a run's tool call sends: the same on
    every re-run of the call."""
    base = f"{run_id}/{tool_call_id}"
    return str(uuid.uuid5(ID_NAMESPACE, base)), str(uuid.uuid5(ID_NAMESPACE, base + "#context"))


def _texts(parts: Any) -> str:
    return "".join(part.text for part in parts if part.WhichOneof("content") == "text")


def _data(parts: Any) -> list[Any]:
    return [
        json_format.MessageToDict(part.data)
        for part in parts
        if part.WhichOneof("content") == "data"
    ]


@dataclass
class RemoteTask:
    """What a caller knows of a remote task, built from its stream, its GetTask, or a
    message the remote answered with instead of a task."""

    task_id: str = ""
    state: int = a2a.TASK_STATE_UNSPECIFIED
    status_text: str = ""
    artifacts: dict[str, list[a2a.Part]] = field(default_factory=dict)  # in arrival order
    last_message: str = ""  # the last agent message in its history, or the direct answer
    answered: bool = False  # the remote answered with a message: there is no task

    @property
    def ended(self) -> bool:
        return self.answered or self.state in _ENDED

    @property
    def waiting(self) -> bool:
        return self.state in _WAITING

    def add(self, response: a2a.StreamResponse) -> list[dict[str, Any]]:
        """Take one stream response in; return the ToolOutput values it makes."""
        kind = response.WhichOneof("payload")
        if kind == "task":
            return self.add_task(response.task)
        if kind == "message":
            self.answered = True
            self.last_message = _texts(response.message.parts)
            return [
                _without_empty(
                    {"message": self.last_message, "data": _data(response.message.parts)}
                )
            ]
        if kind == "status_update":
            status = response.status_update
            self.task_id = self.task_id or status.task_id
            return [self._status(status.status)]
        if kind == "artifact_update":
            update = response.artifact_update
            self.task_id = self.task_id or update.task_id
            artifact = update.artifact
            parts = self.artifacts.setdefault(artifact.artifact_id, [])
            if not update.append:
                parts.clear()
            parts.extend(artifact.parts)
            return [
                _without_empty(
                    {
                        "task_id": self.task_id,
                        "artifact_id": artifact.artifact_id,
                        "text": _texts(artifact.parts),
                        "data": _data(artifact.parts),
                        "append": update.append,
                        "last_chunk": update.last_chunk,
                    }
                )
            ]
        return []

    def add_task(self, task: a2a.Task) -> list[dict[str, Any]]:
        """Take a task (a stream's first event, or GetTask's answer) in; its artifacts
        replace those known."""
        self.task_id = task.id
        agent = [m for m in task.history if m.role == a2a.ROLE_AGENT]
        if agent:
            self.last_message = _texts(agent[-1].parts)
        self.artifacts = {a.artifact_id: list(a.parts) for a in task.artifacts}
        outputs = [self._status(task.status)]
        for artifact in task.artifacts:
            outputs.append(
                _without_empty(
                    {
                        "task_id": self.task_id,
                        "artifact_id": artifact.artifact_id,
                        "text": _texts(artifact.parts),
                        "data": _data(artifact.parts),
                        "append": False,
                    }
                )
            )
        return outputs

    def _status(self, status: a2a.TaskStatus) -> dict[str, Any]:
        self.state = status.state
        parts = status.message.parts if status.HasField("message") else []
        self.status_text = _texts(parts)
        return _without_empty(
            {
                "task_id": self.task_id,
                "state": state_name(status.state),
                "message": self.status_text,
                "data": _data(parts),
            }
        )

    def answer(self) -> str | dict[str, Any]:
        """The tool's result for a completed task: its artifacts' text (else its last
        message, else its status message), with their data when they hold any."""
        parts = [part for parts in self.artifacts.values() for part in parts]
        text = _texts(parts) or self.last_message or self.status_text
        data = _data(parts)
        return {"text": text, "data": data} if data else text


def _without_empty(value: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in value.items() if v not in ("", [], None)}


class RemoteAgent:
    """Calls one remote A2A agent; `tool()` is the pydantic-ai tool (see a2a_agent_tool)."""

    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float | None = 600.0,
        reconnects: int = RECONNECTS,
        reconnect_delay_s: float = RECONNECT_DELAY_S,
    ) -> None:
        self.url = url
        self._headers = dict(headers or {})
        self._timeout = httpx.Timeout(connect_timeout_s, read=read_timeout_s)
        self._reconnects = reconnects
        self._reconnect_delay_s = reconnect_delay_s

    @contextlib.asynccontextmanager
    async def _client(self) -> AsyncIterator[Client]:
        """A client for the agent of the card at `url` (a card's own URL ending in .json,
        or an agent's URL: its card is at <url>/.well-known/agent-card.json)."""
        async with httpx.AsyncClient(headers=self._headers, timeout=self._timeout) as http:
            resolver = A2ACardResolver(http, self.url)
            card = await resolver.get_agent_card(
                relative_card_path="/" if self.url.endswith(".json") else None
            )
            config = ClientConfig(
                httpx_client=http,
                supported_protocol_bindings=[
                    TransportProtocol.JSONRPC.value,
                    TransportProtocol.HTTP_JSON.value,
                ],
            )
            client = ClientFactory(config).create(card)
            try:
                yield client
            finally:
                await client.close()

    async def call(self, message: str, journaled: CallJournal | None) -> str | dict[str, Any]:
        """Send `message` (or follow the task an earlier run of this call started) until the
        remote task ends; return its answer. Raises ModelRetry (module docstring)."""
        task = RemoteTask()
        noted = await journaled.noted() if journaled is not None else None
        try:
            async with self._client() as client:
                if noted is None:
                    await self._send(client, message, journaled, task)
                else:
                    task.task_id = noted.decode()
                if not (task.ended or task.waiting):
                    await self._follow(client, journaled, task)
        except _REMOTE_ERRORS as exc:
            where = f" (task {task.task_id}, which may still be running)" if task.task_id else ""
            raise ModelRetry(f"the remote agent at {self.url} failed{where}: {exc}") from exc
        if task.waiting:
            raise ModelRetry(
                f"the remote agent's task {task.task_id} is {state_name(task.state)}"
                + (f" ({task.status_text})" if task.status_text else "")
                + ": this tool cannot give it what it waits for"
            )
        if not task.answered and task.state != a2a.TASK_STATE_COMPLETED:
            raise ModelRetry(
                f"the remote agent's task {task.task_id} ended {state_name(task.state)}"
                + (f": {task.status_text}" if task.status_text else "")
            )
        return task.answer()

    async def _send(
        self, client: Client, text: str, journaled: CallJournal | None, task: RemoteTask
    ) -> None:
        if journaled is not None:
            message_id, context_id = message_ids(journaled.run_id, journaled.tool_call_id)
        else:  # outside a Keel run: nothing to recognise a resend by
            message_id, context_id = str(uuid.uuid4()), ""
        request = a2a.SendMessageRequest(
            message=a2a.Message(
                message_id=message_id,
                context_id=context_id,
                role=a2a.ROLE_USER,
                parts=[a2a.Part(text=text)],
            )
        )
        try:
            await self._stream(client.send_message(request), journaled, task, noted=False)
        except _REMOTE_ERRORS:
            if not task.task_id:
                raise  # nothing started that we know of
            # The stream broke after the task was named: follow it (below).

    async def _follow(
        self, client: Client, journaled: CallJournal | None, task: RemoteTask
    ) -> None:
        """Follow the known task to its end: GetTask, then SubscribeToTask while it is not
        over, looking again (with growing waits) when a stream breaks."""
        delay = self._reconnect_delay_s
        for attempt in range(self._reconnects + 1):
            try:
                got = await client.get_task(a2a.GetTaskRequest(id=task.task_id))
                task.state = got.status.state
                if got.status.state in _ENDED or got.status.state in _WAITING:
                    await _emit(journaled, task.add_task(got))
                    return
                subscription = client.subscribe(a2a.SubscribeToTaskRequest(id=task.task_id))
                await self._stream(subscription, journaled, task, noted=True)
                if task.ended or task.waiting:
                    return
            except TaskNotFoundError:
                raise  # it will not come back (the remote forgot it, or never had it)
            except _REMOTE_ERRORS:
                if attempt == self._reconnects:
                    raise
            if attempt < self._reconnects:
                await asyncio.sleep(delay)
                delay *= 2
        raise A2AClientError(
            f"task {task.task_id} is still {state_name(task.state)} after "
            f"{self._reconnects + 1} looks at it"
        )

    async def _stream(
        self,
        stream: AsyncIterator[a2a.StreamResponse],
        journaled: CallJournal | None,
        task: RemoteTask,
        *,
        noted: bool,
    ) -> None:
        async with contextlib.aclosing(stream) as responses:  # type: ignore[type-var]
            async for response in responses:
                outputs = task.add(response)
                if not noted and task.task_id and journaled is not None:
                    await journaled.note(task.task_id.encode())
                    noted = True
                await _emit(journaled, outputs)
                if task.ended or task.waiting:
                    return

    def tool(
        self, *, name: str, description: str | None = None, max_retries: int = DEFAULT_MAX_RETRIES
    ) -> Tool[Any]:
        """The tool the model calls with a message for this agent."""

        async def ask(message: str) -> str | dict[str, Any]:
            """Send a message to the remote agent and return its answer.

            Args:
                message: what to ask the remote agent, in plain text
            """
            return await self.call(message, current_call())

        return Tool(
            ask,
            takes_ctx=False,
            name=name,
            description=description
            or f"Ask the remote agent at {self.url} (over A2A) and get its answer.",
            max_retries=max_retries,
        )


async def _emit(journaled: CallJournal | None, outputs: list[dict[str, Any]]) -> None:
    if journaled is None:
        return
    for output in outputs:
        await journaled.output(output)


def a2a_agent_tool(
    url: str,
    *,
    name: str,
    description: str | None = None,
    headers: Mapping[str, str] | None = None,
    bearer_token: str | None = None,
    max_retries: int = DEFAULT_MAX_RETRIES,
    connect_timeout_s: float = 10.0,
    read_timeout_s: float | None = 600.0,
) -> Tool[Any]:
    """A pydantic-ai tool named `name` that asks the remote A2A agent at `url` (see the
    module docstring): `url` is the agent's card (a URL ending in .json) or the agent's
    URL, its card at <url>/.well-known/agent-card.json.

    `headers` go with every request (the card's too); `bearer_token` adds
    `Authorization: Bearer <token>` (a Keel remote's API key). `read_timeout_s`: the
    longest silence of the remote's stream before the call looks for its task again.
    `max_retries`: the ModelRetry budget of the tool (pydantic-ai's).
    """
    all_headers = dict(headers or {})
    if bearer_token:
        all_headers["Authorization"] = f"Bearer {bearer_token}"
    remote = RemoteAgent(
        url,
        headers=all_headers,
        connect_timeout_s=connect_timeout_s,
        read_timeout_s=read_timeout_s,
    )
    return remote.tool(name=name, description=description, max_retries=max_retries)
