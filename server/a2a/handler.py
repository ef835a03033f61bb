"""Keel's A2A RequestHandler: A2A operations on Keel runs (docs/a2a.md).

No task store of its own: a task is a run, read from the event log; sending
starts or resumes runs with the executor; streams follow the run's log
(server/observe/follow.py) and translate its events (tasks.py). The caller is
the Gate's (current_caller), set by the transport (web.py, service.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Mapping
from typing import Any, ParamSpec, TypeVar

from a2a.server.context import ServerCallContext
from a2a.server.request_handlers.request_handler import RequestHandler
from a2a.types import a2a_pb2 as a2a
from a2a.utils.errors import (
    A2AError,
    ExtendedAgentCardNotConfiguredError,
    InternalError,
    InvalidParamsError,
    InvalidRequestError,
    PushNotificationNotSupportedError,
    TaskNotCancelableError,
    TaskNotFoundError,
    UnsupportedOperationError,
)
from google.protobuf import json_format
from google.rpc import code_pb2
from keel.v1 import agent_service_pb2 as pb
from keel.v1.agent_service_pb2 import AgentEvent

from server.a2a import tasks
from server.a2a.push.dispatcher import Dispatcher
from server.a2a.push.sender import url_problem
from server.a2a.push.store import PushConfig
from server.a2a.tasks import Event
from server.agents.types import AgentSpec
from server.api import status, validate
from server.auth.gate import A2A_METHOD_ROLES, authorize, current_caller
from server.errors import KeelError, RunNotFound, ThreadBusy, ThreadNotFound
from server.events.log import EventLog, RunPageCursor, RunRecord, RunState
from server.observe.follow import Events, FollowLimits, Snapshot, follow
from server.observe.observer import Draining
from server.runs.executors import Executor
from server.threads.service import Threads

OFFSET_PARAMETER = "keel-next-offset"  # SubscribeToTask: the Keel event index to resume from
AGENT_STATE = "keel_agent"  # ServerCallContext.state: the agent of the HTTP route called
DECISIONS = "decisions"  # the data part that answers an input-required task
MAX_PAGE_SIZE = 100
_READ_PAGE = 1000  # events read at a time to rebuild a task's text artifact
MAX_CONFIG_ID_CHARS = 64
MAX_TOKEN_CHARS = 1024

P = ParamSpec("P")
R = TypeVar("R")

_STATES_FROM_A2A = {
    value: key for key, value in tasks.STATES.items() if key is not RunState.ENQUEUED
}


def a2a_error(exc: KeelError) -> A2AError:
    """The A2A error for a Keel error (by its gRPC status, server/api/status.py)."""
    code = status.to_status(exc).code
    message = str(exc)
    if isinstance(exc, (RunNotFound, ThreadNotFound)):
        return TaskNotFoundError(message)
    if isinstance(exc, ThreadBusy):
        return InvalidRequestError(
            f"context {exc.thread_id!r} is busy with task {exc.active_run_id!r}: wait for it "
            "to end, or cancel it"
        )
    if code == code_pb2.INVALID_ARGUMENT or code == code_pb2.OUT_OF_RANGE:
        return InvalidParamsError(message)
    if code in (code_pb2.FAILED_PRECONDITION, code_pb2.ALREADY_EXISTS, code_pb2.ABORTED):
        return InvalidRequestError(message)
    if code == code_pb2.NOT_FOUND:
        return TaskNotFoundError(message)
    if code == code_pb2.PERMISSION_DENIED:
        return InvalidRequestError(message)
    return InternalError(message)


def _mapped(method: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(*args, **kwargs)
        except KeelError as exc:
            raise a2a_error(exc) from None

    return wrapper


def _mapped_stream(
    method: Callable[P, AsyncGenerator[Event]],
) -> Callable[P, AsyncGenerator[Event]]:
    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> AsyncGenerator[Event]:
        inner = method(*args, **kwargs)
        try:
            async for item in inner:
                yield item
        except KeelError as exc:
            raise a2a_error(exc) from None
        finally:
            await inner.aclose()

    return wrapper


def _require(operation: str) -> None:
    authorize(current_caller(), operation, A2A_METHOD_ROLES)


def _visible(record: RunRecord) -> None:
    if record.tenant != current_caller().tenant:
        raise RunNotFound(record.run_id)


class KeelRequestHandler(RequestHandler):
    """Serves every agent of the registry; the agent is the HTTP route's (AGENT_STATE)
    or, on gRPC, the request's `tenant` field; the default agent otherwise."""

    def __init__(
        self,
        log: EventLog,
        executor: Executor,
        *,
        limits: FollowLimits,
        draining: Draining,
        default_agent: str,
        push: Dispatcher | None = None,
        push_allow_private: bool = False,
    ) -> None:
        self._log = log
        self.push = push  # set once, after the dispatcher that reads this handler's tasks
        self._push_allow_private = push_allow_private
        self._executor = executor
        self._threads = Threads(log)
        self._limits = limits
        self._draining = draining
        self._default_agent = default_agent

    @property
    def agents(self) -> Mapping[str, AgentSpec]:
        return self._executor.agents

    def agent_of(self, context: ServerCallContext) -> str:
        agent_id = str(context.state.get(AGENT_STATE) or context.tenant or self._default_agent)
        if agent_id not in self._executor.agents:
            raise InvalidParamsError(f"no agent {agent_id!r} here")
        return agent_id

    async def _run_of(self, task_id: str) -> RunRecord:
        if not task_id:
            raise InvalidParamsError("the task id is required")
        try:
            validate.run_id(task_id, "id")
        except KeelError:
            raise TaskNotFoundError(f"task {task_id!r} not found") from None
        try:
            record = await self._log.get_run(task_id)
            _visible(record)
        except RunNotFound:
            raise TaskNotFoundError(f"task {task_id!r} not found") from None
        return record

    async def _replay(
        self, record: RunRecord, upto: int
    ) -> tuple[tasks.Translator, AgentEvent | None]:
        """A translator that has seen the run's events below `upto` (read from the log, the
        text a stream of the whole run builds), and the last of them."""
        translator = tasks.Translator(record)
        last: AgentEvent | None = None
        if record.live_only or record.earliest_index > 0:
            return translator, None  # the log does not hold them all
        offset = 0
        while offset < upto:
            page = await self._log.read(record.run_id, offset, min(_READ_PAGE, upto - offset))
            if not page:
                break
            translator.translate(page)
            offset = page[-1].index + 1
            last = page[-1]
        return translator, last

    async def task_of(self, record: RunRecord) -> a2a.Task:
        """The task of a run as GetTask shows it (what a push notification carries)."""
        return await self._task(record)

    async def _task(
        self, record: RunRecord, history_length: int | None = None, *, artifacts: bool = True
    ) -> a2a.Task:
        final: AgentEvent | None = None
        text: str | None = None
        if artifacts and not record.live_only and record.earliest_index == 0:
            translator, final = await self._replay(record, record.next_index)
            text = translator.text
        elif (
            artifacts
            and not record.live_only
            and record.state is RunState.SUCCEEDED
            and record.next_index > record.earliest_index
        ):
            # A trimmed log (KEEL_RETAIN_EVENTS): the output of the finish event.
            last = await self._log.read(record.run_id, record.next_index - 1, 1)
            final = last[0] if last else None
        return tasks.task(record, final, history_length, text)

    # Reading.

    @_mapped
    async def on_get_task(self, params: a2a.GetTaskRequest, context: ServerCallContext) -> a2a.Task:
        _require("GetTask")
        record = await self._run_of(params.id)
        length = params.history_length if params.HasField("history_length") else None
        if length is not None and length < 0:
            raise InvalidParamsError("history_length must not be negative")
        return await self._task(record, length)

    @_mapped
    async def on_list_tasks(
        self, params: a2a.ListTasksRequest, context: ServerCallContext
    ) -> a2a.ListTasksResponse:
        _require("ListTasks")
        page_size = params.page_size if params.HasField("page_size") else 50
        if not 0 < page_size <= MAX_PAGE_SIZE:
            raise InvalidParamsError(f"page_size must be 1 to {MAX_PAGE_SIZE}")
        states: frozenset[RunState] = frozenset()
        if params.status:
            state = _STATES_FROM_A2A.get(params.status)
            if state is None:
                raise InvalidParamsError(f"no task has status {params.status}")
            states = frozenset({state}) | (
                frozenset({RunState.ENQUEUED}) if state is RunState.QUEUED else frozenset()
            )
        thread_id = validate.thread_id(params.context_id, "context_id") if params.context_id else ""
        agent_id = self.agent_of(context)
        cursor = validate.decode_page_token(params.page_token, agent_id, states, thread_id, "")
        records = await self._log.list_runs(
            agent_id=agent_id,
            states=states,
            thread_id=thread_id,
            tenant=current_caller().tenant,
            limit=page_size + 1,
            after=cursor,
        )
        token = ""
        if len(records) > page_size:
            records = records[:page_size]
            last = records[-1]
            token = validate.encode_page_token(
                RunPageCursor(last.create_time_ms, last.run_id), agent_id, states, thread_id, ""
            )
        if params.HasField("status_timestamp_after"):
            # Filtered within the page: a page may hold fewer tasks than page_size.
            since_ms = params.status_timestamp_after.ToMilliseconds()
            records = [r for r in records if r.update_time_ms >= since_ms]
        length = params.history_length if params.HasField("history_length") else None
        if length is not None and length < 0:
            raise InvalidParamsError("history_length must not be negative")
        artifacts = params.include_artifacts if params.HasField("include_artifacts") else False
        listed = [await self._task(r, length, artifacts=artifacts) for r in records]
        return a2a.ListTasksResponse(
            tasks=listed, next_page_token=token, page_size=page_size, total_size=len(listed)
        )

    # Running.

    @_mapped
    async def on_cancel_task(
        self, params: a2a.CancelTaskRequest, context: ServerCallContext
    ) -> a2a.Task:
        _require("CancelTask")
        record = await self._run_of(params.id)
        if record.state.terminal:
            raise TaskNotCancelableError(
                f"task {params.id!r} has ended "
                f"({a2a.TaskState.Name(tasks.STATES[record.state])}): it cannot be canceled"
            )
        record = await self._executor.cancel(params.id, "cancelled over A2A")
        return await self._task(record)

    @_mapped
    async def on_message_send(
        self, params: a2a.SendMessageRequest, context: ServerCallContext
    ) -> a2a.Task | a2a.Message:
        _require("SendMessage")
        record, launch, offset = await self._send(params, context)
        launch()
        if params.configuration.return_immediately:
            return await self._task(record)
        async for _ in self._follow(record.run_id, offset):
            pass
        return await self._task(await self._log.get_run(record.run_id))

    @_mapped_stream
    async def on_message_send_stream(
        self, params: a2a.SendMessageRequest, context: ServerCallContext
    ) -> AsyncGenerator[Event]:
        _require("SendStreamingMessage")
        record, launch, offset = await self._send(params, context)
        try:
            # The run starts once the stream listens to it, as AgentService's Stream does.
            async for item in self._translate(record.run_id, offset, on_subscribed=launch):
                yield item
        finally:
            launch()

    @_mapped_stream
    async def on_subscribe_to_task(
        self, params: a2a.SubscribeToTaskRequest, context: ServerCallContext
    ) -> AsyncGenerator[Event]:
        _require("SubscribeToTask")
        record = await self._run_of(params.id)
        offset = _offset(context)
        if offset is None:
            offset = 0
        if record.state.terminal and offset >= record.next_index:
            raise UnsupportedOperationError(
                f"task {params.id!r} is {a2a.TaskState.Name(tasks.STATES[record.state])}: "
                "there is nothing to subscribe to (GetTask reads it)"
            )
        async for item in self._translate(record.run_id, offset):
            yield item

    async def _send(
        self, params: a2a.SendMessageRequest, context: ServerCallContext
    ) -> tuple[RunRecord, Callable[[], None], int]:
        """Start the message's run, or resume its task: (the run, its launch, the offset
        its stream starts at)."""
        message = params.message
        push: PushConfig | None = None  # checked before anything starts
        if params.configuration.HasField("task_push_notification_config"):
            push = await self._push_config(params.configuration.task_push_notification_config)
        if message.task_id:
            record, launch, offset = await self._answer(message)
            if push is not None:
                await self._store_push(record.run_id, push)
            return record, launch, offset
        texts = [part.text for part in message.parts if part.WhichOneof("content") == "text"]
        if not texts:
            raise InvalidParamsError("the message has no text part: a run's input is its text")
        agent_id = self.agent_of(context)
        tenant = current_caller().tenant
        thread_id = ""
        if message.context_id:
            thread_id = validate.thread_id(message.context_id, "message.context_id")
            try:
                thread = await self._threads.get(thread_id)
                if thread.owner != tenant:
                    raise ThreadNotFound(thread_id)
            except ThreadNotFound:
                await self._threads.create(thread_id=thread_id, tenant=tenant)
        else:
            thread_id = (await self._threads.create(tenant=tenant)).thread_id
        text = "\n".join(texts)
        request_id = (
            validate.run_id(message.message_id, "message.message_id")
            if _uuid_like(message.message_id)
            else ""
        )
        validate.start(agent_id, text, request_id, thread_id)
        started = await self._executor.start(
            agent_id, text, request_id, thread_id=thread_id, tenant=tenant
        )
        if push is not None:
            try:
                await self._store_push(started.run.run_id, push)
            except BaseException:
                started.launch()  # the run exists: it runs, without the config
                raise
        return started.run, started.launch, 0

    async def _answer(self, message: a2a.Message) -> tuple[RunRecord, Callable[[], None], int]:
        """A message on an input-required task: its decisions resume the run."""
        record = await self._run_of(message.task_id)
        if message.context_id and message.context_id != record.thread_id:
            raise InvalidParamsError(
                f"task {record.run_id!r} is in context {record.thread_id!r}, not "
                f"{message.context_id[:200]!r}"
            )
        state_name = a2a.TaskState.Name(tasks.STATES[record.state])
        if record.state.terminal:
            raise UnsupportedOperationError(
                f"task {record.run_id!r} is {state_name}: it takes no more messages; send a "
                "message without a taskId (with its contextId to continue the conversation)"
            )
        if record.state is not RunState.SUSPENDED:
            raise InvalidParamsError(
                f"task {record.run_id!r} is {state_name}: it takes a message only when "
                "input-required"
            )
        decisions = _decisions(message)
        answers = validate.decisions(decisions)
        resumed = await self._executor.resume(record.run_id, answers)
        return record, resumed.launch, resumed.offset

    async def _follow(
        self,
        run_id: str,
        offset: int,
        on_subscribed: Callable[[], None] | None = None,
    ) -> AsyncIterator[tuple[Snapshot | Events, RunRecord | None]]:
        """The run's snapshot and events from `offset` on, until it ends or waits for
        input: a batch with a `suspended` event comes with the run's record, and is the
        last when the run still waits there (an earlier suspension, answered since, is
        followed through)."""
        async for item in follow(
            self._log,
            run_id,
            offset,
            limits=self._limits,
            draining=self._draining,
            on_subscribed=on_subscribed,
            check=_visible,
        ):
            if isinstance(item, Snapshot):
                yield item, None
                if item.run.state is RunState.SUSPENDED and offset >= item.run.next_index:
                    return
            elif isinstance(item, Events):
                suspensions = [e.index for e in item.events if e.HasField("suspended")]
                if not suspensions:
                    yield item, None
                    continue
                record = await self._log.get_run(run_id)
                waits = (
                    record.state is RunState.SUSPENDED and record.next_index == suspensions[-1] + 1
                )
                if waits:
                    events = [e for e in item.events if e.index <= suspensions[-1]]
                    yield Events(events), record
                    return
                yield item, record

    async def _translate(
        self,
        run_id: str,
        offset: int,
        *,
        on_subscribed: Callable[[], None] | None = None,
    ) -> AsyncIterator[Event]:
        """The task, then the A2A events of the run's events from `offset` on. A stream from
        an offset has seen the text before it: its chunks append, and a superseded
        attempt's text is taken back from all of it."""
        translator: tasks.Translator | None = None
        async for item, record in self._follow(run_id, offset, on_subscribed):
            if isinstance(item, Snapshot):
                translator, _ = await self._replay(item.run, offset)
                yield await self._task(item.run)
                continue
            assert translator is not None
            for event in translator.translate(item.events, record):
                yield event

    # Push notifications (push/): configs stored with the run, delivered by the dispatcher.

    def _dispatcher(self) -> Dispatcher:
        if self.push is None:
            raise PushNotificationNotSupportedError()
        return self.push

    async def _push_config(self, params: a2a.TaskPushNotificationConfig) -> PushConfig:
        """`params` checked, as a config (of no run yet; a new id unless it names one)."""
        self._dispatcher()
        config_id = params.id or uuid.uuid4().hex
        if len(config_id) > MAX_CONFIG_ID_CHARS or not config_id.isprintable():
            raise InvalidParamsError(
                f"a push notification config id is at most {MAX_CONFIG_ID_CHARS} printable "
                "characters"
            )
        if len(params.token) > MAX_TOKEN_CHARS:
            raise InvalidParamsError(f"the token is longer than {MAX_TOKEN_CHARS} characters")
        auth = params.authentication
        if len(auth.scheme) + len(auth.credentials) > MAX_TOKEN_CHARS:
            raise InvalidParamsError(
                f"the authentication is longer than {MAX_TOKEN_CHARS} characters"
            )
        problem = await url_problem(params.url, allow_private=self._push_allow_private)
        if problem:
            raise InvalidParamsError(f"push notification url {params.url[:200]!r}: {problem}")
        return PushConfig(
            config_id=config_id,
            run_id="",
            url=params.url,
            token=params.token,
            auth_scheme=auth.scheme,
            auth_credentials=auth.credentials,
            create_time_ms=time.time_ns() // 1_000_000,
        )

    async def _store_push(self, run_id: str, config: PushConfig) -> PushConfig:
        dispatcher = self._dispatcher()
        config = dataclasses.replace(config, run_id=run_id)
        await dispatcher.store.put_config(config)
        dispatcher.poke(run_id)
        return config

    @_mapped
    async def on_create_task_push_notification_config(
        self, params: a2a.TaskPushNotificationConfig, context: ServerCallContext
    ) -> a2a.TaskPushNotificationConfig:
        _require("CreateTaskPushNotificationConfig")
        self._dispatcher()
        record = await self._run_of(params.task_id)
        config = await self._push_config(params)
        return _config_message(await self._store_push(record.run_id, config))

    async def _config(self, task_id: str, config_id: str) -> PushConfig:
        record = await self._run_of(task_id)
        for config in await self._dispatcher().store.configs(record.run_id):
            if config.config_id == config_id:
                return config
        raise TaskNotFoundError(
            f"task {task_id!r} has no push notification config {config_id[:200]!r}"
        )

    @_mapped
    async def on_get_task_push_notification_config(
        self, params: a2a.GetTaskPushNotificationConfigRequest, context: ServerCallContext
    ) -> a2a.TaskPushNotificationConfig:
        _require("GetTaskPushNotificationConfig")
        self._dispatcher()
        return _config_message(await self._config(params.task_id, params.id))

    @_mapped
    async def on_list_task_push_notification_configs(
        self, params: a2a.ListTaskPushNotificationConfigsRequest, context: ServerCallContext
    ) -> a2a.ListTaskPushNotificationConfigsResponse:
        _require("ListTaskPushNotificationConfigs")
        dispatcher = self._dispatcher()
        record = await self._run_of(params.task_id)
        if params.page_size < 0:
            raise InvalidParamsError("page_size must not be negative")
        start = 0
        if params.page_token:
            try:
                start = int(params.page_token)
            except ValueError:
                raise InvalidParamsError("page_token is not one this server gave") from None
        configs = await dispatcher.store.configs(record.run_id)
        size = params.page_size or len(configs) or 1
        page = configs[start : start + size]
        token = str(start + size) if start + size < len(configs) else ""
        return a2a.ListTaskPushNotificationConfigsResponse(
            configs=[_config_message(c) for c in page], next_page_token=token
        )

    @_mapped
    async def on_delete_task_push_notification_config(
        self, params: a2a.DeleteTaskPushNotificationConfigRequest, context: ServerCallContext
    ) -> None:
        _require("DeleteTaskPushNotificationConfig")
        dispatcher = self._dispatcher()
        record = await self._run_of(params.task_id)
        if not await dispatcher.store.delete_config(record.run_id, params.id):
            raise TaskNotFoundError(
                f"task {params.task_id!r} has no push notification config {params.id[:200]!r}"
            )

    async def on_get_extended_agent_card(
        self, params: a2a.GetExtendedAgentCardRequest, context: ServerCallContext
    ) -> a2a.AgentCard:
        raise ExtendedAgentCardNotConfiguredError(
            "no extended agent card: the public card (GET .../.well-known/agent-card.json) "
            "says everything"
        )


def _config_message(config: PushConfig) -> a2a.TaskPushNotificationConfig:
    message = a2a.TaskPushNotificationConfig(
        id=config.config_id, task_id=config.run_id, url=config.url, token=config.token
    )
    if config.auth_scheme:
        message.authentication.scheme = config.auth_scheme
        message.authentication.credentials = config.auth_credentials
    return message


def _uuid_like(value: str) -> bool:
    try:
        validate.run_id(value, "message_id")
    except KeelError:
        return False
    return True


def _offset(context: ServerCallContext) -> int | None:
    """The OFFSET_PARAMETER the call was sent with (an HTTP header or gRPC metadata)."""
    value: str | None = None
    headers = context.state.get("headers")
    if isinstance(headers, Mapping):
        value = headers.get(OFFSET_PARAMETER)
    grpc_context = context.state.get("grpc_context")
    if value is None and grpc_context is not None:
        for key, item in grpc_context.invocation_metadata() or ():
            if key.lower() == OFFSET_PARAMETER and isinstance(item, str):
                value = item
    if value is None:
        return None
    try:
        offset = int(value)
    except ValueError:
        raise InvalidParamsError(f"{OFFSET_PARAMETER} must be an integer, not {value!r}") from None
    if offset < 0:
        raise InvalidParamsError(f"{OFFSET_PARAMETER} must not be negative")
    return offset


def _decisions(message: a2a.Message) -> list[pb.Decision]:
    """The decisions of a message answering an input-required task (docs/a2a.md)."""
    data: list[Any] = []
    for part in message.parts:
        if part.WhichOneof("content") == "data":
            value = json_format.MessageToDict(part.data)
            if isinstance(value, dict) and DECISIONS in value:
                data.append(value[DECISIONS])
    if not data:
        raise InvalidParamsError(
            "the task is input-required: answer it with a data part "
            '{"decisions": [{"tool_call_id": ..., "approve": true} | {"tool_call_id": ..., '
            '"deny": "why"} | {"tool_call_id": ..., "result": <JSON>}]}'
        )
    decisions: list[pb.Decision] = []
    for n, items in enumerate(data):
        if not isinstance(items, list):
            raise InvalidParamsError(f"decisions (part {n}) must be a list")
        for m, item in enumerate(items):
            where = f"decisions[{m}]"
            if not isinstance(item, dict) or not isinstance(item.get("tool_call_id"), str):
                raise InvalidParamsError(f"{where} must be an object with a tool_call_id")
            decision = pb.Decision(tool_call_id=item["tool_call_id"])
            kinds = [k for k in ("approve", "deny", "result") if k in item]
            if len(kinds) != 1:
                raise InvalidParamsError(f"{where} must have one of approve, deny or result")
            if kinds[0] == "approve":
                if item["approve"] is not True:
                    raise InvalidParamsError(f"{where}.approve must be true (deny refuses)")
                decision.approve.SetInParent()
            elif kinds[0] == "deny":
                decision.deny.message = str(item["deny"])
            else:
                decision.result_json = json.dumps(item["result"])
            decisions.append(decision)
    return decisions
