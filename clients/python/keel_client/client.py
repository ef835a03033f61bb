"""KeelClient: an asyncio client of Keel's AgentService.

    async with KeelClient("127.0.0.1:50051") as client:
        handle = client.stream("scripted", '{"steps": [{"text": 5}]}')
        async for event in handle.events():
            ...

A thread is a conversation whose runs share one message history:

    async with KeelClient("127.0.0.1:50051") as client:
        thread = await client.create_thread(resource_id="user-1")
        turn = client.send(thread.thread_id, "scripted", '{"steps": [{"echo_history": true}]}')
        async for event in turn.events():  # resumes by itself, like stream()'s
            ...
        async for message in client.thread_messages(thread.thread_id):
            ...

A background tool call makes a task that runs off the agent loop; its life
(TaskUpdate events) is on the run's stream, and ``until_idle`` keeps the run
open until its tasks ended, giving each result to the model:

    async with KeelClient("127.0.0.1:50051") as client:
        slow = {"tool": "slow", "args": {"key": "k", "duration_ms": 300}}
        handle = client.stream("scripted", json.dumps({"steps": [slow]}), until_idle=True)
        async for event in handle.events():
            if event.WhichOneof("payload") == "task":  # a TaskUpdate: QUEUED, ..., COMPLETED
                task = await client.get_task(event.task.task_id)

A goal makes a run go on, attempt after attempt, until a judge agent is
satisfied (``goal_evaluated`` events; ``finish.goal_met``); a schedule starts
runs of an agent on a cron cadence:

    async with KeelClient("127.0.0.1:50051") as client:
        goal = pb.Goal(objective="say DONE", judge_agent_id="judge", max_attempts=3)
        async for event in client.stream("assistant", "...", goal=goal).events():
            ...
        weekdays = "0 9 * * 1-5"  # 09:00 Monday to Friday, in the schedule's time zone
        schedule = await client.create_schedule(
            "assistant", weekdays, "write the daily report", timezone="Europe/Paris"
        )
        await client.update_schedule(schedule.schedule_id, cron="0 8 * * 1-5")
        await client.pause_schedule(schedule.schedule_id)
        fired = await client.trigger_schedule(schedule.schedule_id)  # a run now, paused or not
        runs = await client.list_runs(schedule_id=schedule.schedule_id)

The unary helpers return the proto messages of ``keel.v1`` and raise
``grpc.aio.AioRpcError`` as gRPC does; only the handles' event streams, and
the delivery of decisions (Resume, idempotent by request_id), retry.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypedDict, Unpack

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask
from keel.v1 import agent_service_pb2 as pb
from keel.v1 import agent_service_pb2_grpc as pb_grpc

from keel_client import decisions as make
from keel_client.backoff import Backoff
from keel_client.decisions import deliver
from keel_client.handle import OnReconnect, RunHandle

if TYPE_CHECKING:
    from keel.v1.agent_service_pb2_grpc import AgentServiceAsyncStub

ChannelOptions = Sequence[tuple[str, Any]]


class ScheduleChanges(TypedDict, total=False):
    """The keyword arguments of ``update_schedule``: each one given is a change
    (an UpdateSchedule update_mask path of the same name), the others stay."""

    agent_id: str
    cron: str
    timezone: str  # "" is UTC
    input: str
    overlap_policy: pb.ScheduleOverlapPolicy.ValueType
    catch_up_window: float | None  # seconds; None: the default (365 days)
    paused: bool
    goal: pb.Goal | None  # None: no goal


# The fields UpdateSchedule can change, as ScheduleChanges (and the update_mask) name them.
SCHEDULE_UPDATABLE = frozenset(ScheduleChanges.__annotations__)


class _Bearer:
    """Adds ``authorization: Bearer <key>`` to a call's metadata."""

    def __init__(self, key: str) -> None:
        self._metadata = ("authorization", f"Bearer {key}")

    def with_key(self, details: Any) -> Any:
        return details._replace(metadata=[*(details.metadata or ()), self._metadata])


# grpc.aio files an interceptor under the first kind it is, so one class per kind.
class _BearerUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self.with_key(details), request)


class _BearerStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self.with_key(details), request)


class KeelClient:
    """A connection to one Keel server (or a load balancer in front of many).

    The grpc.aio channel is created on first use, inside the running event
    loop, so a client may be constructed anywhere; it belongs to the loop
    that first used it. ``close()`` (or leaving ``async with``) closes it and
    is safe to call more than once.

    ``initial_backoff_s``/``max_backoff_s`` bound the waits between the
    reconnects of a stream; ``max_reconnects`` is how many reconnects in a
    row without a new event a stream makes before raising UNAVAILABLE
    (None: no limit). ``channel_options`` go to the grpc.aio channel, after
    defaults that make the channel's own reconnect backoff match.

    ``api_key`` is sent with every call as ``authorization: Bearer <key>``
    (a server started with KEEL_API_KEYS_FILE requires one). ``tls`` makes
    the channel use TLS, trusting ``root_certificates`` (PEM; default: the
    system's); ``client_certificate`` (certificate chain, private key; PEM)
    is presented for mutual TLS.
    """

    def __init__(
        self,
        target: str,
        *,
        initial_backoff_s: float = 0.05,
        max_backoff_s: float = 2.0,
        max_reconnects: int | None = None,
        channel_options: ChannelOptions = (),
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        client_certificate: tuple[bytes, bytes] | None = None,
    ) -> None:
        if max_reconnects is not None and max_reconnects < 0:
            raise ValueError(f"max_reconnects must not be negative, got {max_reconnects}")
        self.target = target
        self.backoff = Backoff(initial_s=initial_backoff_s, max_s=max_backoff_s)
        self.max_reconnects = max_reconnects
        self._channel_options: list[tuple[str, Any]] = [
            ("grpc.initial_reconnect_backoff_ms", max(1, round(initial_backoff_s * 1000))),
            ("grpc.min_reconnect_backoff_ms", max(1, round(initial_backoff_s * 1000))),
            ("grpc.max_reconnect_backoff_ms", max(1, round(max_backoff_s * 1000))),
            *channel_options,
        ]
        self._api_key = api_key
        self._credentials: grpc.ChannelCredentials | None = None
        if tls or root_certificates is not None or client_certificate is not None:
            chain, key = client_certificate or (None, None)
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=root_certificates, private_key=key, certificate_chain=chain
            )
        self._channel: grpc.aio.Channel | None = None
        self._async_stub: AgentServiceAsyncStub | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel, cancelling its open calls. Safe to call twice."""
        channel, self._channel, self._async_stub, self._loop = self._channel, None, None, None
        if channel is not None:
            await channel.close()

    def _stub(self) -> AgentServiceAsyncStub:
        """The stub over the channel, creating both inside the running loop."""
        loop = asyncio.get_running_loop()  # raises outside a loop, as it should
        if self._async_stub is None or self._loop is not loop:
            if self._loop is not None:
                raise RuntimeError("a KeelClient is bound to the event loop that first used it")
            interceptors: list[grpc.aio.ClientInterceptor] | None = None
            if self._api_key:
                interceptors = [_BearerUnary(self._api_key), _BearerStream(self._api_key)]
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(
                    self.target, options=self._channel_options, interceptors=interceptors
                )
            else:
                self._channel = grpc.aio.secure_channel(
                    self.target,
                    self._credentials,
                    options=self._channel_options,
                    interceptors=interceptors,
                )
            self._async_stub = pb_grpc.AgentServiceStub(self._channel)
            self._loop = loop
        return self._async_stub

    # Streams.

    def stream(
        self,
        agent_id: str,
        input: str,
        *,
        request_id: str | None = None,
        on_reconnect: OnReconnect | None = None,
        thread_id: str = "",
        busy_policy: pb.ThreadBusyPolicy.ValueType = pb.THREAD_BUSY_POLICY_UNSPECIFIED,
        until_idle: bool = False,
        goal: pb.Goal | None = None,
    ) -> RunHandle:
        """A handle that starts a run with Stream on its first iteration.

        Without a request_id one is generated (uuid4), so the handle's own
        retries of a Stream that dropped before its snapshot start one run.
        With a ``thread_id`` the run is made on that thread (see ``send``);
        ``busy_policy`` says what happens when the thread has an active run
        (UNSPECIFIED: REJECT). With ``until_idle`` the run does not finish
        while background tasks it started are pending: it waits for them and
        gives each result to the model, so the stream carries every task's
        TaskUpdates up to its end; without it the run finishes when the model
        is done and its tasks go on by themselves (see ``get_task``).

        With a ``goal`` the run pursues it: after each attempt of the agent the
        goal's judge (an agent of the server) gives a verdict, a
        ``goal_evaluated`` event; an unsatisfied attempt is followed by
        another, with the judge's reason as a new message, in the same run, up
        to ``goal.max_attempts``. The ``finish`` event's ``goal_met`` (and the
        Run's) says whether the last verdict was satisfied. None: the agent's
        default goal, if it has one (``list_agents``). A missing objective or
        judge, a judge that is not a verdict agent of the server, or
        max_attempts out of range make the first iteration raise
        INVALID_ARGUMENT.
        """
        start = pb.StreamRequest(
            agent_id=agent_id,
            input=input,
            request_id=request_id or str(uuid.uuid4()),
            thread_id=thread_id,
            busy_policy=busy_policy,
            until_idle=until_idle,
            goal=goal,
        )
        return RunHandle(
            self._stub,
            backoff=self.backoff,
            max_reconnects=self.max_reconnects,
            start=start,
            on_reconnect=on_reconnect,
        )

    def send(
        self,
        thread_id: str,
        agent_id: str,
        input: str,
        *,
        busy_policy: pb.ThreadBusyPolicy.ValueType = pb.THREAD_BUSY_POLICY_UNSPECIFIED,
        request_id: str | None = None,
        on_reconnect: OnReconnect | None = None,
        until_idle: bool = False,
        goal: pb.Goal | None = None,
    ) -> RunHandle:
        """The next turn of a thread: a handle that starts a run on ``thread_id``
        with Stream on its first iteration, and streams the reply.

        The run starts with the thread's messages; its own join the thread
        when it ends. ``stream(agent_id, input, thread_id=..., ...)`` by
        another name: the request_id is generated unless given, so the
        handle's retries start one run. When the thread has an active run,
        ``busy_policy`` decides: REJECT (the default) makes the first
        iteration raise FAILED_PRECONDITION (ErrorInfo reason THREAD_BUSY,
        metadata active_run_id); ENQUEUE, INTERRUPT and ROLLBACK stream a
        QUEUED snapshot, then heartbeats until the run's turn comes.
        ``until_idle`` as for ``stream()``: the turn waits for its background
        tasks; ``goal`` as for ``stream()``: the turn pursues it.
        """
        return self.stream(
            agent_id,
            input,
            request_id=request_id,
            on_reconnect=on_reconnect,
            thread_id=thread_id,
            busy_policy=busy_policy,
            until_idle=until_idle,
            goal=goal,
        )

    def run(
        self,
        run_id: str,
        *,
        on_reconnect: OnReconnect | None = None,
        stop_at_suspend: bool = False,
    ) -> RunHandle:
        """A handle on an existing run, observed from offset 0 unless told otherwise.

        With ``stop_at_suspend`` its events() end right after a ``suspended``
        event (what an approval inbox wants) instead of following the run
        across its suspension.
        """
        return RunHandle(
            self._stub,
            backoff=self.backoff,
            max_reconnects=self.max_reconnects,
            run_id=run_id,
            on_reconnect=on_reconnect,
            stop_at_suspend=stop_at_suspend,
        )

    # Decisions for a suspended run (Resume).

    async def approve(
        self,
        run_id: str,
        tool_call_id: str,
        *,
        override_args: Mapping[str, Any] | None = None,
        request_id: str | None = None,
    ) -> pb.RunSnapshot:
        """Approve a pending tool call of a suspended run (``override_args``, a JSON
        object, replaces the model's arguments); the snapshot the server sends
        once it has the decision. Observers of the run see it go on."""
        decision = make.approval(tool_call_id, override_args)
        return await self.resume(run_id, [decision], request_id=request_id)

    async def deny(
        self, run_id: str, tool_call_id: str, message: str = "", *, request_id: str | None = None
    ) -> pb.RunSnapshot:
        """Deny a pending tool call of a suspended run; the model sees ``message``."""
        decision = make.denial(tool_call_id, message)
        return await self.resume(run_id, [decision], request_id=request_id)

    async def answer(
        self, run_id: str, tool_call_id: str, result: Any, *, request_id: str | None = None
    ) -> pb.RunSnapshot:
        """Give the result (any JSON value) of a deferred tool call of a suspended run."""
        decision = make.answer(tool_call_id, result)
        return await self.resume(run_id, [decision], request_id=request_id)

    async def resume(
        self,
        run_id: str,
        decisions: Sequence[pb.Decision],
        *,
        request_id: str | None = None,
    ) -> pb.RunSnapshot:
        """Send Resume(run_id, decisions), retrying UNAVAILABLE with the same
        request_id (generated unless given), until the server acknowledges it
        with the stream's snapshot; raises its other errors as they come."""
        return await deliver(
            self._stub,
            run_id,
            decisions,
            request_id=request_id,
            backoff=self.backoff,
            max_reconnects=self.max_reconnects,
        )

    # Unary calls.

    async def start_run(
        self,
        agent_id: str,
        input: str,
        *,
        request_id: str | None = None,
        thread_id: str = "",
        busy_policy: pb.ThreadBusyPolicy.ValueType = pb.THREAD_BUSY_POLICY_UNSPECIFIED,
        until_idle: bool = False,
        goal: pb.Goal | None = None,
    ) -> pb.Run:
        """Start a run without streaming it; the same request_id returns the same run.

        ``thread_id``, ``busy_policy``, ``until_idle`` and ``goal`` as for
        ``stream()`` (a bad goal is INVALID_ARGUMENT).
        """
        request = pb.StartRunRequest(
            agent_id=agent_id,
            input=input,
            request_id=request_id or "",
            thread_id=thread_id,
            busy_policy=busy_policy,
            until_idle=until_idle,
            goal=goal,
        )
        response = await self._stub().StartRun(request)
        return response.run

    async def get_run(self, run_id: str) -> pb.Run:
        """A run's current state."""
        response = await self._stub().GetRun(pb.GetRunRequest(run_id=run_id))
        return response.run

    async def list_runs(
        self,
        agent_id: str = "",
        states: Sequence[pb.RunState.ValueType] = (),
        page_size: int = 0,
        page_token: str = "",
        thread_id: str = "",
        schedule_id: str = "",
    ) -> pb.ListRunsResponse:
        """One page of runs, newest first; pass next_page_token back for the next
        (with the same filters).

        Filters: ``agent_id``, ``states``, ``thread_id`` (the runs of a thread)
        and ``schedule_id`` (the runs a schedule started).
        """
        request = pb.ListRunsRequest(
            agent_id=agent_id,
            states=states,
            page_size=page_size,
            page_token=page_token,
            thread_id=thread_id,
            schedule_id=schedule_id,
        )
        return await self._stub().ListRuns(request)

    async def cancel_run(self, run_id: str, reason: str = "") -> pb.Run:
        """Cancel a run that has not ended; an ended run is returned unchanged."""
        response = await self._stub().CancelRun(pb.CancelRunRequest(run_id=run_id, reason=reason))
        return response.run

    async def list_agents(self) -> list[pb.Agent]:
        """The agents this server can run, sorted by agent_id."""
        response = await self._stub().ListAgents(pb.ListAgentsRequest())
        return list(response.agents)

    # Background tasks: calls of background tools, run off their run's agent loop.

    async def get_task(self, task_id: str) -> pb.Task:
        """A background task: its run, tool, arguments, status, attempt, progress,
        result or error. NOT_FOUND (TASK_NOT_FOUND) for an unknown task or one whose
        run's retention time passed; INVALID_ARGUMENT for a malformed id."""
        response = await self._stub().GetTask(pb.GetTaskRequest(task_id=task_id))
        return response.task

    async def list_tasks(
        self,
        run_id: str = "",
        agent_id: str = "",
        statuses: Sequence[pb.TaskStatus.ValueType] = (),
        page_size: int = 0,
        page_token: str = "",
    ) -> pb.ListTasksResponse:
        """One page of background tasks, newest first; pass next_page_token back
        for the next (with the same filters).

        Filters: ``run_id`` (a run's tasks), ``agent_id`` and ``statuses``
        (STARTED and RUNNING both select running tasks).
        """
        request = pb.ListTasksRequest(
            run_id=run_id,
            agent_id=agent_id,
            statuses=statuses,
            page_size=page_size,
            page_token=page_token,
        )
        return await self._stub().ListTasks(request)

    async def cancel_task(self, task_id: str, reason: str = "") -> pb.Task:
        """Cancel a task that has not ended; the task as the server recorded it.

        A waiting task ends CANCELLED at once, a running one as soon as its
        runner hears of it (the returned task may still show it running);
        its run, if still open, gets a TaskUpdate CANCELLED with ``reason``.
        An ended task is returned unchanged.
        """
        request = pb.CancelTaskRequest(task_id=task_id, reason=reason)
        response = await self._stub().CancelTask(request)
        return response.task

    async def retry_task(self, task_id: str) -> pb.Task:
        """Run a FAILED or CANCELLED task again (same id and arguments, a fresh
        retry budget); the task, QUEUED again. FAILED_PRECONDITION
        (TASK_NOT_RETRYABLE) for a task that is waiting, running or completed."""
        response = await self._stub().RetryTask(pb.RetryTaskRequest(task_id=task_id))
        return response.task

    # Threads: conversations whose runs share one message history.

    async def create_thread(
        self,
        *,
        thread_id: str = "",
        resource_id: str = "",
        metadata: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> pb.Thread:
        """Create a thread. Its id is ``thread_id`` if given, else derived from
        ``request_id`` if given, else random; the same request_id sent again
        returns the same thread. ``resource_id`` names its owner (ListThreads
        filters by it)."""
        request = pb.CreateThreadRequest(
            thread_id=thread_id,
            resource_id=resource_id,
            metadata=dict(metadata or {}),
            request_id=request_id or "",
        )
        response = await self._stub().CreateThread(request)
        return response.thread

    async def get_thread(self, thread_id: str) -> pb.Thread:
        """A thread: its owner, metadata, active and queued runs, number of messages."""
        response = await self._stub().GetThread(pb.GetThreadRequest(thread_id=thread_id))
        return response.thread

    async def list_threads(
        self, resource_id: str = "", page_size: int = 0, page_token: str = ""
    ) -> pb.ListThreadsResponse:
        """One page of threads (of ``resource_id`` if given), newest first; pass
        next_page_token back for the next."""
        request = pb.ListThreadsRequest(
            resource_id=resource_id, page_size=page_size, page_token=page_token
        )
        return await self._stub().ListThreads(request)

    async def delete_thread(self, thread_id: str) -> None:
        """Delete a thread and its messages (its runs stay). FAILED_PRECONDITION
        (THREAD_BUSY) while a run of the thread is active or queued."""
        await self._stub().DeleteThread(pb.DeleteThreadRequest(thread_id=thread_id))

    async def list_thread_messages(
        self,
        thread_id: str,
        *,
        page_size: int = 0,
        page_token: str = "",
        newest_first: bool = False,
    ) -> pb.ListThreadMessagesResponse:
        """One page of a thread's messages, oldest first (or ``newest_first``),
        each with the run that produced it; pass next_page_token back for the next."""
        request = pb.ListThreadMessagesRequest(
            thread_id=thread_id,
            page_size=page_size,
            page_token=page_token,
            newest_first=newest_first,
        )
        return await self._stub().ListThreadMessages(request)

    async def thread_messages(
        self, thread_id: str, *, page_size: int = 0, newest_first: bool = False
    ) -> AsyncGenerator[pb.ThreadMessage, None]:
        """Every message of a thread, oldest first (or ``newest_first``), page by page."""
        page_token = ""
        while True:
            page = await self.list_thread_messages(
                thread_id, page_size=page_size, page_token=page_token, newest_first=newest_first
            )
            for message in page.messages:
                yield message
            page_token = page.next_page_token
            if not page_token:
                return

    # Schedules: an agent run on a cron cadence.

    async def create_schedule(
        self,
        agent_id: str,
        cron: str,
        input: str,
        *,
        timezone: str = "",
        schedule_id: str = "",
        thread_mode: pb.ScheduleThreadMode.ValueType = pb.SCHEDULE_THREAD_MODE_UNSPECIFIED,
        overlap_policy: pb.ScheduleOverlapPolicy.ValueType = (
            pb.SCHEDULE_OVERLAP_POLICY_UNSPECIFIED
        ),
        catch_up_window: float | None = None,
        paused: bool = False,
        request_id: str = "",
        thread_id: str = "",
        goal: pb.Goal | None = None,
    ) -> pb.Schedule:
        """Create a schedule: each tick of ``cron`` starts a run of ``agent_id``
        with ``input``; the schedule as stored, with its next fire times.

        ``cron`` has five fields (minute hour day-of-month month day-of-week),
        six with a leading seconds field, or is @hourly, @daily, @weekly,
        @monthly or @yearly; it is read in the IANA ``timezone`` ("" is UTC).
        ``thread_mode``: THREADLESS (the default; each firing on a fresh thread
        of its own) or THREADED (every firing on the schedule's one thread, or
        on ``thread_id``, an existing thread). ``overlap_policy``, for a tick
        while the previous firing's run is active: SKIP (the default), ENQUEUE
        (THREADED only) or ALLOW (THREADLESS only). ``catch_up_window``
        (seconds, 1 s to 366 days; None: 365 days): how late a tick missed
        while every server was down may still fire. ``paused`` creates it
        paused; ``goal`` is pursued by every firing's run. The id is
        ``schedule_id`` if given, else derived from ``request_id`` if given
        (the same request sent again returns the same schedule), else random.

        INVALID_ARGUMENT (BadRequest field violations) for an unknown agent, a
        malformed cron expression, an unknown time zone, a catch_up_window out
        of range, a bad goal or a policy the thread mode does not allow;
        ALREADY_EXISTS (SCHEDULE_ALREADY_EXISTS) for a schedule_id that is
        taken, (REQUEST_ID_REUSED) for a request_id sent before with other
        fields; NOT_FOUND (THREAD_NOT_FOUND) for an unknown thread_id.
        """
        request = pb.CreateScheduleRequest(
            agent_id=agent_id,
            cron=cron,
            timezone=timezone,
            input=input,
            schedule_id=schedule_id,
            thread_mode=thread_mode,
            overlap_policy=overlap_policy,
            catch_up_window=None if catch_up_window is None else _duration(catch_up_window),
            paused=paused,
            request_id=request_id,
            thread_id=thread_id,
            goal=goal,
        )
        response = await self._stub().CreateSchedule(request)
        return response.schedule

    async def get_schedule(self, schedule_id: str) -> pb.Schedule:
        """A schedule with its next fire times (none while paused) and its 10 most
        recent firings, newest first. NOT_FOUND (SCHEDULE_NOT_FOUND) for an unknown
        schedule; INVALID_ARGUMENT for a malformed id."""
        response = await self._stub().GetSchedule(pb.GetScheduleRequest(schedule_id=schedule_id))
        return response.schedule

    async def list_schedules(
        self, agent_id: str = "", page_size: int = 0, page_token: str = ""
    ) -> pb.ListSchedulesResponse:
        """One page of schedules (of ``agent_id`` if given), newest first, without
        their recent firings; pass next_page_token back for the next."""
        request = pb.ListSchedulesRequest(
            agent_id=agent_id, page_size=page_size, page_token=page_token
        )
        return await self._stub().ListSchedules(request)

    async def update_schedule(
        self, schedule_id: str, **changes: Unpack[ScheduleChanges]
    ) -> pb.Schedule:
        """Change the fields of a schedule given as keyword arguments, and only
        those; the schedule as changed.

            await client.update_schedule(schedule_id, paused=True)
            await client.update_schedule(schedule_id, cron="*/5 * * * *", input="...")
            await client.update_schedule(schedule_id, goal=None)  # no goal any more

        Any of ``agent_id``, ``cron``, ``timezone``, ``input``,
        ``overlap_policy``, ``catch_up_window`` (seconds; None: the default),
        ``paused`` and ``goal`` (None: none); their names make the request's
        update_mask. A new cron or time zone, and an unpause, start the cadence
        again from now (the ticks before are neither fired nor missed).

        NOT_FOUND (SCHEDULE_NOT_FOUND) for an unknown schedule; INVALID_ARGUMENT
        for no change at all or a bad value. TypeError for a keyword that names
        no updatable field.
        """
        unknown = changes.keys() - SCHEDULE_UPDATABLE
        if unknown:
            raise TypeError(
                f"update_schedule() cannot change {', '.join(sorted(unknown))}; "
                f"it changes {', '.join(sorted(SCHEDULE_UPDATABLE))}"
            )
        schedule = pb.Schedule(schedule_id=schedule_id)
        if "agent_id" in changes:
            schedule.agent_id = changes["agent_id"]
        if "cron" in changes:
            schedule.cron = changes["cron"]
        if "timezone" in changes:
            schedule.timezone = changes["timezone"]
        if "input" in changes:
            schedule.input = changes["input"]
        if "overlap_policy" in changes:
            schedule.overlap_policy = changes["overlap_policy"]
        if (window := changes.get("catch_up_window")) is not None:
            schedule.catch_up_window.CopyFrom(_duration(window))
        if "paused" in changes:
            schedule.paused = changes["paused"]
        if (goal := changes.get("goal")) is not None:
            schedule.goal.CopyFrom(goal)
        request = pb.UpdateScheduleRequest(
            schedule=schedule, update_mask=FieldMask(paths=list(changes))
        )
        response = await self._stub().UpdateSchedule(request)
        return response.schedule

    async def pause_schedule(self, schedule_id: str) -> pb.Schedule:
        """Pause a schedule: it fires no tick until resumed (``trigger_schedule``
        still fires it). ``update_schedule(schedule_id, paused=True)``."""
        return await self.update_schedule(schedule_id, paused=True)

    async def resume_schedule(self, schedule_id: str) -> pb.Schedule:
        """Unpause a schedule; its cadence starts again from now (the ticks it
        slept through are not fired). ``update_schedule(schedule_id, paused=False)``."""
        return await self.update_schedule(schedule_id, paused=False)

    async def delete_schedule(self, schedule_id: str) -> None:
        """Delete a schedule and its firing history; no tick fires after it. The
        runs it started, and its thread, stay. NOT_FOUND (SCHEDULE_NOT_FOUND) for
        an unknown schedule."""
        await self._stub().DeleteSchedule(pb.DeleteScheduleRequest(schedule_id=schedule_id))

    async def trigger_schedule(
        self, schedule_id: str, request_id: str = ""
    ) -> pb.TriggerScheduleResponse:
        """Fire a schedule now, paused or not, whatever its overlap policy; the run
        it started (``run``) and the firing recorded (``firing``, outcome
        TRIGGERED). The cadence does not change. The same ``request_id`` sent
        again returns the run the first request started. NOT_FOUND
        (SCHEDULE_NOT_FOUND) for an unknown schedule; INVALID_ARGUMENT for a
        malformed request_id or a schedule whose agent this server does not run."""
        request = pb.TriggerScheduleRequest(schedule_id=schedule_id, request_id=request_id)
        return await self._stub().TriggerSchedule(request)

    async def list_schedule_runs(
        self, schedule_id: str, page_size: int = 0, page_token: str = ""
    ) -> pb.ListScheduleRunsResponse:
        """One page of a schedule's firings, newest first (a schedule keeps its 100
        most recent): a run STARTED or TRIGGERED (``run_id``), a tick SKIPPED or
        MISSED, or a FAILED start (``detail``); pass next_page_token back for the
        next. NOT_FOUND (SCHEDULE_NOT_FOUND) for an unknown schedule."""
        request = pb.ListScheduleRunsRequest(
            schedule_id=schedule_id, page_size=page_size, page_token=page_token
        )
        return await self._stub().ListScheduleRuns(request)


def _duration(seconds: float) -> Duration:
    """``seconds`` as a protobuf Duration (to the nanosecond)."""
    duration = Duration()
    duration.FromNanoseconds(round(seconds * 1_000_000_000))
    return duration
