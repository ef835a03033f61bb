"""The AgentService servicer: validates, delegates, converts. Logic lives in runs/ and observe/."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import grpc
from google.protobuf.message import DecodeError, Message
from google.rpc import code_pb2
from grpc_status import rpc_status
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc

from server import metrics
from server.agents.registry import describe
from server.api import convert, schedules, status, validate
from server.auth.gate import current_caller
from server.auth.keys import Role
from server.errors import (
    FieldViolation,
    InvalidArgument,
    PermissionDenied,
    RunNotFound,
    ScheduleNotFound,
    TaskNotFound,
    ThreadNotFound,
)
from server.events.codec import Batch
from server.events.log import EventLog, RunPageCursor, RunRecord, ThreadPageCursor, ThreadRecord
from server.observe.follow import Events, FollowLimits, Heartbeat, Item, Snapshot, follow
from server.observe.observer import Draining
from server.runs.executor import Started
from server.runs.executors import Executor
from server.schedules.records import SchedulePageCursor, ThreadMode
from server.schedules.service import Schedules
from server.tasks.records import TaskPageCursor, TaskRecord
from server.threads.service import Threads

SERVICE = pb.DESCRIPTOR.services_by_name["AgentService"]
Request = TypeVar("Request")
Response = TypeVar("Response")
StreamResponse = pb.StreamResponse | pb.ObserveResponse | pb.ResumeResponse


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> None:
    await context.abort_with_status(rpc_status.to_status(status.to_status(exc)))


@dataclass(frozen=True)
class _Unparsable:
    """A request body that is not an encoding of its method's request message."""

    type_name: str
    reason: str


def _parser(request_type: type[Message]) -> Callable[[bytes], Message | _Unparsable]:
    """request_type.FromString, except that a body that does not parse goes to the handler
    as Unparsable, to answer INVALID_ARGUMENT (gRPC itself would answer UNKNOWN)."""
    type_name = request_type.DESCRIPTOR.full_name

    def parse(data: bytes) -> Message | _Unparsable:
        try:
            return request_type.FromString(data)
        except DecodeError as exc:
            return _Unparsable(type_name, str(exc).rpartition(": ")[2])

    return parse


def _check_parsed(request: object) -> None:
    if isinstance(request, _Unparsable):
        raise InvalidArgument(
            FieldViolation("request", f"is not a valid {request.type_name}: {request.reason}")
        )


def _code_of(exc: BaseException) -> str:
    """The gRPC code name an exception of a handler ends its call with."""
    return str(code_pb2.Code.Name(status.to_status(exc).code))


# What a handler gets besides its request: the transport's call (a grpc.aio
# ServicerContext, or the HTTP port's Connect RequestContext); no handler reads it.
Context = Any


def unary(
    method: Callable[[Any, Request, Context], Awaitable[Response]],
) -> Callable[[Any, Request, Context], Awaitable[Response]]:
    """Metrics of a unary handler. Its errors go on to the transport, which maps them
    to status (add_to_server for gRPC, server/web/connect.py for Connect)."""

    name = method.__name__

    @functools.wraps(method)
    async def handler(self: Any, request: Request, context: Context) -> Response:
        started = time.perf_counter()
        code = "OK"
        try:
            _check_parsed(request)
            return await method(self, request, context)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as exc:
            code = _code_of(exc)
            raise
        finally:
            metrics.RPC_DURATION.labels(name, code).observe(time.perf_counter() - started)

    return handler


def streaming(
    method: Callable[[Any, Request, Context], AsyncIterator[Response]],
) -> Callable[[Any, Request, Context], AsyncIterator[Response]]:
    """Metrics of a streaming handler; its errors go on to the transport, like unary's."""

    name = method.__name__

    @functools.wraps(method)
    async def handler(self: Any, request: Request, context: Context) -> AsyncIterator[Response]:
        started = time.perf_counter()
        code = "OK"
        metrics.STREAMS_OPEN.labels(name).inc()
        try:
            _check_parsed(request)
            async for response in method(self, request, context):
                yield response
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"  # the client went away
            raise
        except Exception as exc:
            code = _code_of(exc)
            raise
        finally:
            metrics.STREAMS_OPEN.labels(name).dec()
            metrics.RPC_DURATION.labels(name, code).observe(time.perf_counter() - started)

    return handler


def _grpc_unary(
    behavior: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]],
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
    """A handler's errors as rich gRPC status (status.to_status)."""

    async def handler(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await behavior(request, context)
        except Exception as exc:
            await _abort(context, exc)
            raise AssertionError("unreachable: abort raises") from exc

    return handler


def _grpc_streaming(
    behavior: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]],
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]:
    async def handler(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        try:
            async for response in behavior(request, context):
                yield response
        except Exception as exc:
            await _abort(context, exc)

    return handler


def add_to_server(servicer: AgentServicer, server: grpc.aio.Server) -> None:
    """Register `servicer` like the generated add_AgentServiceServicer_to_server, except that
    streaming responses may be pre-serialized bytes (see convert.events_response)."""
    handlers = {}
    for method in SERVICE.methods:
        request_type = getattr(pb, method.input_type.name)
        behavior = getattr(servicer, method.name)
        if method.server_streaming:
            handler = grpc.unary_stream_rpc_method_handler(
                _grpc_streaming(behavior),
                request_deserializer=_parser(request_type),
                response_serializer=_serialize,
            )
        else:
            handler = grpc.unary_unary_rpc_method_handler(
                _grpc_unary(behavior),
                request_deserializer=_parser(request_type),
                response_serializer=_serialize,
            )
        handlers[method.name] = handler
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),)
    )
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


def _serialize(message: Message | bytes) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


def _visible(owner: str) -> bool:
    """May the caller of this call see a resource of tenant `owner`? Only its own."""
    return owner == current_caller().tenant


def _check_run(record: RunRecord) -> None:
    if not _visible(record.tenant):
        raise RunNotFound(record.run_id)


def _tenant() -> str:
    return current_caller().tenant


def _listed_tenant(asked: str, method: str) -> str | None:
    """The tenant a List call lists: the caller's, or for an admin the one it names
    ("*": every tenant, None)."""
    caller = current_caller()
    if not asked or asked == caller.tenant:
        return caller.tenant
    if caller.role is not Role.ADMIN:
        raise PermissionDenied(f"{method} of another tenant", caller.role.value, Role.ADMIN.value)
    return None if asked == "*" else asked


class AgentServicer(pb_grpc.AgentServiceServicer):
    """Keel's AgentService (keel.v1): served over gRPC (add_to_server) and, on the HTTP
    port, over Connect and gRPC-Web (server/web/connect.py)."""

    def __init__(
        self,
        log: EventLog,
        executor: Executor,
        *,
        limits: FollowLimits,
        max_batch_bytes: int,
        draining: Draining,
        default_retention_s: float,
        schedules: Schedules,
    ) -> None:
        self._log = log
        self._executor = executor
        self._schedules = schedules
        self._threads = Threads(log)
        self._limits = limits
        self._max_batch_bytes = max_batch_bytes
        self._draining = draining
        self._default_retention_s = default_retention_s
        self._last_batch = convert.LastBatch[bytes]()  # its response (_events_response)

    # Tenants: every resource belongs to the tenant of the caller that made it. Another
    # tenant's resource is missing, with the same error and message as one that never
    # existed, whatever the caller's role. Lists hold the caller's tenant's only.

    async def _run_of(self, run_id: str) -> RunRecord:
        record = await self._log.get_run(run_id)
        _check_run(record)
        return record

    async def _thread_of(self, thread_id: str) -> ThreadRecord:
        record = await self._threads.get(thread_id)
        if not _visible(record.owner):
            raise ThreadNotFound(thread_id)
        return record

    async def _task_of(self, task_id: str) -> TaskRecord:
        record = await self._executor.task_store.get_task(task_id)
        if not _visible(record.tenant):
            raise TaskNotFound(task_id)
        return record

    async def _schedule_of(self, schedule_id: str) -> None:
        view = await self._schedules.get(schedule_id)
        if not _visible(view.record.owner):
            raise ScheduleNotFound(schedule_id)

    @streaming
    async def Stream(
        self, request: pb.StreamRequest, context: Context
    ) -> AsyncIterator[pb.StreamResponse]:
        started = await self._start(request)
        try:
            # The run starts once the stream listens to it (a live-only run's
            # first events would be lost otherwise), or when the stream fails.
            follows = self._follow(
                started.run.run_id, 0, pb.StreamResponse, on_subscribed=started.launch
            )
            async for response in follows:
                yield response
        finally:
            started.launch()

    @streaming
    async def Observe(
        self, request: pb.ObserveRequest, context: Context
    ) -> AsyncIterator[pb.ObserveResponse]:
        run_id = validate.run_id(request.run_id)
        offset = validate.offset(request.offset)
        incarnation = validate.incarnation(request.incarnation)
        follows = self._follow(
            run_id, offset, pb.ObserveResponse, request.stop_at_suspend, incarnation=incarnation
        )
        async for response in follows:
            yield response

    @streaming
    async def Resume(
        self, request: pb.ResumeRequest, context: Context
    ) -> AsyncIterator[pb.ResumeResponse]:
        run_id = validate.run_id(request.run_id)
        answers = validate.decisions(request.decisions)
        if request.request_id:
            validate.run_id(request.request_id, "request_id")
        try:
            await self._run_of(run_id)
            resumed = await self._executor.resume(run_id, answers, request.request_id)
        except Exception as exc:
            metrics.RESUMES.labels(_code_of(exc)).inc()
            raise
        metrics.RESUMES.labels("OK").inc()
        try:
            follows = self._follow(
                run_id, resumed.offset, pb.ResumeResponse, on_subscribed=resumed.launch
            )
            async for response in follows:
                yield response
        finally:
            resumed.launch()

    @unary
    async def StartRun(self, request: pb.StartRunRequest, context: Context) -> pb.StartRunResponse:
        started = await self._start(request)
        started.launch()
        return pb.StartRunResponse(run=convert.run(started.run))

    @unary
    async def GetRun(self, request: pb.GetRunRequest, context: Context) -> pb.GetRunResponse:
        record = await self._run_of(validate.run_id(request.run_id))
        return pb.GetRunResponse(run=convert.run(record))

    @unary
    async def ListRuns(self, request: pb.ListRunsRequest, context: Context) -> pb.ListRunsResponse:
        page_size = validate.page_size(request.page_size)
        states = validate.states(request.states)
        thread_id = validate.thread_id(request.thread_id) if request.thread_id else ""
        schedule_id = schedules.schedule_id(request.schedule_id) if request.schedule_id else ""
        filters = (request.agent_id, states, thread_id, schedule_id)
        cursor = validate.decode_page_token(request.page_token, *filters)
        records = await self._log.list_runs(
            agent_id=request.agent_id,
            states=states,
            thread_id=thread_id,
            schedule_id=schedule_id,
            tenant=_listed_tenant(request.tenant, "ListRuns"),
            limit=page_size + 1,
            after=cursor,
        )
        token = ""
        if len(records) > page_size:
            records = records[:page_size]
            last = records[-1]
            token = validate.encode_page_token(
                RunPageCursor(last.create_time_ms, last.run_id), *filters
            )
        return pb.ListRunsResponse(runs=[convert.run(r) for r in records], next_page_token=token)

    @unary
    async def CancelRun(
        self, request: pb.CancelRunRequest, context: Context
    ) -> pb.CancelRunResponse:
        run_id = validate.run_id(request.run_id)
        await self._run_of(run_id)
        record = await self._executor.cancel(run_id, request.reason)
        return pb.CancelRunResponse(run=convert.run(record))

    @unary
    async def ListAgents(
        self, request: pb.ListAgentsRequest, context: Context
    ) -> pb.ListAgentsResponse:
        agents = []
        for agent_id, spec in sorted(self._executor.agents.items()):
            model_name, tools = describe(spec)
            agents.append(
                convert.agent(
                    agent_id,
                    spec,
                    model_name,
                    [
                        pb.Tool(
                            name=t.name,
                            description=t.description,
                            requires_approval=t.requires_approval,
                            background=t.background,
                        )
                        for t in tools
                    ],
                    default_retention_s=self._default_retention_s,
                )
            )
        return pb.ListAgentsResponse(agents=agents)

    @unary
    async def CreateThread(
        self, request: pb.CreateThreadRequest, context: Context
    ) -> pb.CreateThreadResponse:
        record = await self._threads.create(
            thread_id=validate.thread_id(request.thread_id) if request.thread_id else "",
            resource_id=validate.resource_id(request.resource_id),
            metadata=validate.metadata(request.metadata),
            request_id=validate.run_id(request.request_id, "request_id")
            if request.request_id
            else "",
            tenant=_tenant(),
        )
        return pb.CreateThreadResponse(thread=convert.thread(record))

    @unary
    async def GetThread(
        self, request: pb.GetThreadRequest, context: Context
    ) -> pb.GetThreadResponse:
        record = await self._thread_of(validate.thread_id(request.thread_id))
        return pb.GetThreadResponse(thread=convert.thread(record))

    @unary
    async def ListThreads(
        self, request: pb.ListThreadsRequest, context: Context
    ) -> pb.ListThreadsResponse:
        page_size = validate.page_size(request.page_size)
        resource_id = validate.resource_id(request.resource_id)
        cursor = validate.decode_thread_page_token(request.page_token, resource_id)
        records = await self._threads.page(
            resource_id=resource_id,
            tenant=_listed_tenant(request.tenant, "ListThreads"),
            limit=page_size + 1,
            after=cursor,
        )
        token = ""
        if len(records) > page_size:
            records = records[:page_size]
            last = ThreadPageCursor(records[-1].create_time_ms, records[-1].thread_id)
            token = validate.encode_thread_page_token(last, resource_id)
        return pb.ListThreadsResponse(
            threads=[convert.thread(r) for r in records], next_page_token=token
        )

    @unary
    async def DeleteThread(
        self, request: pb.DeleteThreadRequest, context: Context
    ) -> pb.DeleteThreadResponse:
        thread_id = validate.thread_id(request.thread_id)
        await self._thread_of(thread_id)
        await self._threads.delete(thread_id)
        return pb.DeleteThreadResponse()

    @unary
    async def ListThreadMessages(
        self, request: pb.ListThreadMessagesRequest, context: Context
    ) -> pb.ListThreadMessagesResponse:
        thread_id = validate.thread_id(request.thread_id)
        page_size = validate.page_size(request.page_size)
        newest_first = request.newest_first
        start = validate.decode_message_page_token(request.page_token, thread_id, newest_first)
        await self._thread_of(thread_id)
        messages, next_start = await self._threads.messages(
            thread_id, limit=page_size, start=start, newest_first=newest_first
        )
        token = (
            ""
            if next_start is None
            else validate.encode_message_page_token(next_start, thread_id, newest_first)
        )
        return pb.ListThreadMessagesResponse(
            messages=[convert.thread_message(m) for m in messages], next_page_token=token
        )

    @unary
    async def GetTask(self, request: pb.GetTaskRequest, context: Context) -> pb.GetTaskResponse:
        record = await self._task_of(validate.task_id(request.task_id))
        return pb.GetTaskResponse(task=convert.task(record))

    @unary
    async def ListTasks(
        self, request: pb.ListTasksRequest, context: Context
    ) -> pb.ListTasksResponse:
        page_size = validate.page_size(request.page_size)
        run_id = validate.run_id(request.run_id) if request.run_id else ""
        statuses = validate.task_statuses(request.statuses)
        filters = (run_id, request.agent_id, statuses)
        cursor = validate.decode_task_page_token(request.page_token, *filters)
        records = await self._executor.task_store.list_tasks(
            run_id=run_id,
            agent_id=request.agent_id,
            statuses=statuses,
            tenant=_listed_tenant(request.tenant, "ListTasks"),
            limit=page_size + 1,
            after=cursor,
        )
        token = ""
        if len(records) > page_size:
            records = records[:page_size]
            last = TaskPageCursor(records[-1].create_time_ms, records[-1].task_id)
            token = validate.encode_task_page_token(last, *filters)
        return pb.ListTasksResponse(tasks=[convert.task(r) for r in records], next_page_token=token)

    @unary
    async def CancelTask(
        self, request: pb.CancelTaskRequest, context: Context
    ) -> pb.CancelTaskResponse:
        task_id = validate.task_id(request.task_id)
        await self._task_of(task_id)
        record = await self._executor.cancel_task(task_id, request.reason or "cancelled")
        return pb.CancelTaskResponse(task=convert.task(record))

    @unary
    async def RetryTask(
        self, request: pb.RetryTaskRequest, context: Context
    ) -> pb.RetryTaskResponse:
        task_id = validate.task_id(request.task_id)
        await self._task_of(task_id)
        record = await self._executor.retry_task(task_id)
        return pb.RetryTaskResponse(task=convert.task(record))

    @unary
    async def CreateSchedule(
        self, request: pb.CreateScheduleRequest, context: Context
    ) -> pb.CreateScheduleResponse:
        spec, schedule_id, request_id = schedules.create_request(request)
        if spec.thread_id and spec.thread_mode is ThreadMode.THREADED:
            await self._thread_of(spec.thread_id)  # only the caller's tenant's threads
        record = await self._schedules.create(
            spec, schedule_id=schedule_id, request_id=request_id, tenant=_tenant()
        )
        view = await self._schedules.get(record.schedule_id)
        return pb.CreateScheduleResponse(schedule=schedules.schedule(view))

    @unary
    async def GetSchedule(
        self, request: pb.GetScheduleRequest, context: Context
    ) -> pb.GetScheduleResponse:
        schedule_id = schedules.schedule_id(request.schedule_id)
        await self._schedule_of(schedule_id)
        view = await self._schedules.get(schedule_id)
        return pb.GetScheduleResponse(schedule=schedules.schedule(view))

    @unary
    async def ListSchedules(
        self, request: pb.ListSchedulesRequest, context: Context
    ) -> pb.ListSchedulesResponse:
        page_size = validate.page_size(request.page_size)
        cursor = schedules.decode_page_token(request.page_token, request.agent_id)
        views = await self._schedules.page(
            agent_id=request.agent_id,
            tenant=_listed_tenant(request.tenant, "ListSchedules"),
            limit=page_size + 1,
            after=cursor,
        )
        token = ""
        if len(views) > page_size:
            views = views[:page_size]
            last = views[-1].record
            token = schedules.encode_page_token(
                SchedulePageCursor(last.create_time_ms, last.schedule_id), request.agent_id
            )
        return pb.ListSchedulesResponse(
            schedules=[schedules.schedule(v) for v in views], next_page_token=token
        )

    @unary
    async def UpdateSchedule(
        self, request: pb.UpdateScheduleRequest, context: Context
    ) -> pb.UpdateScheduleResponse:
        schedule_id, changes = schedules.update_request(request)
        await self._schedule_of(schedule_id)
        view = await self._schedules.update(schedule_id, changes)
        return pb.UpdateScheduleResponse(schedule=schedules.schedule(view))

    @unary
    async def DeleteSchedule(
        self, request: pb.DeleteScheduleRequest, context: Context
    ) -> pb.DeleteScheduleResponse:
        schedule_id = schedules.schedule_id(request.schedule_id)
        await self._schedule_of(schedule_id)
        await self._schedules.delete(schedule_id)
        return pb.DeleteScheduleResponse()

    @unary
    async def TriggerSchedule(
        self, request: pb.TriggerScheduleRequest, context: Context
    ) -> pb.TriggerScheduleResponse:
        schedule_id = schedules.schedule_id(request.schedule_id)
        if request.request_id:
            validate.run_id(request.request_id, "request_id")
        await self._schedule_of(schedule_id)
        run, firing = await self._schedules.trigger(schedule_id, request.request_id)
        return pb.TriggerScheduleResponse(run=convert.run(run), firing=schedules.firing(firing))

    @unary
    async def ListScheduleRuns(
        self, request: pb.ListScheduleRunsRequest, context: Context
    ) -> pb.ListScheduleRunsResponse:
        schedule_id = schedules.schedule_id(request.schedule_id)
        page_size = validate.page_size(request.page_size)
        before = schedules.decode_firing_token(request.page_token, schedule_id)
        await self._schedule_of(schedule_id)
        firings = await self._schedules.firings(schedule_id, limit=page_size + 1, before_seq=before)
        token = ""
        if len(firings) > page_size:
            firings = firings[:page_size]
            token = schedules.encode_firing_token(firings[-1].seq, schedule_id)
        return pb.ListScheduleRunsResponse(
            firings=[schedules.firing(f) for f in firings], next_page_token=token
        )

    async def _start(self, request: pb.StreamRequest | pb.StartRunRequest) -> Started:
        """Validate and start the run of a Stream or StartRun (they share their fields)."""
        policy = validate.start(
            request.agent_id,
            request.input,
            request.request_id,
            request.thread_id,
            request.busy_policy,
        )
        goal = validate.goal(request.goal) if request.HasField("goal") else None
        if request.thread_id:
            await self._thread_of(request.thread_id)  # only the caller's tenant's threads
        return await self._executor.start(
            request.agent_id,
            request.input,
            request.request_id,
            thread_id=request.thread_id,
            policy=policy,
            until_idle=request.until_idle,
            goal=goal,
            tenant=_tenant(),
        )

    async def _follow(
        self,
        run_id: str,
        offset: int,
        response_type: type[Response],
        stop_at_suspend: bool = False,
        on_subscribed: Callable[[], None] | None = None,
        incarnation: str = "",
    ) -> AsyncIterator[Response]:
        # The three stream responses share one layout (snapshot=1, events=2, heartbeat=3).
        make: Callable[..., Response] = response_type
        items: AsyncIterator[Item] = follow(
            self._log,
            run_id,
            offset,
            limits=self._limits,
            draining=self._draining,
            stop_at_suspend=stop_at_suspend,
            on_subscribed=on_subscribed,
            check=_check_run,  # streams too reach only the caller's tenant's runs
            incarnation=incarnation,
        )
        async for item in items:
            match item:
                case Snapshot(run=record):
                    yield make(snapshot=pb.RunSnapshot(run=convert.run(record)))
                case Events(events=Batch() as batch) if len(batch.encoded) <= self._max_batch_bytes:
                    yield cast(Response, self._events_response(batch.encoded))
                case Events(events=events):
                    for part in convert.batches(events, self._max_batch_bytes):
                        yield make(events=pb.EventBatch(events=part))
                case Heartbeat(next_offset=next_offset, incarnation=incarnation):
                    heartbeat = pb.Heartbeat(next_offset=next_offset, incarnation=incarnation)
                    heartbeat.time.GetCurrentTime()
                    yield make(heartbeat=heartbeat)

    def _events_response(self, encoded: bytes) -> bytes:
        """convert.events_response, built once per batch: the streams of a run send the
        same batch one after another."""
        return self._last_batch.get(encoded, convert.events_response)
