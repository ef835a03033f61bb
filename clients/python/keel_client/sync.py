"""Blocking use of keel_client, for scripts: the asyncio client on a private event loop.

    from keel_client.sync import KeelClient

    with KeelClient("127.0.0.1:50051") as client:
        handle = client.stream("scripted", '{"steps": [{"text": 5}]}')
        for event in handle.events():  # resumes by itself, exactly once, in order
            ...
        thread = client.create_thread()  # a conversation: its runs share one history
        for event in client.send(thread.thread_id, "scripted", '{"steps": [{"text": 5}]}').events():
            ...
        for message in client.thread_messages(thread.thread_id):
            ...
        # A run that waits for its background tasks; their TaskUpdates are among its events.
        slow = '{"steps": [{"tool": "slow", "args": {"key": "k"}}]}'
        for event in client.stream("scripted", slow, until_idle=True).events():
            if event.WhichOneof("payload") == "task":
                task = client.get_task(event.task.task_id)
        # A run that goes on until the judge is satisfied (goal_evaluated events).
        goal = pb.Goal(objective="say DONE", judge_agent_id="scripted-judge")
        for event in client.stream("scripted", '{"steps": [{"text": 1}]}', goal=goal).events():
            ...
        # A schedule: a run every hour; a run now; the firings; its runs.
        schedule = client.create_schedule("scripted", "@hourly", '{"steps": [{"text": 1}]}')
        fired = client.trigger_schedule(schedule.schedule_id)
        client.pause_schedule(schedule.schedule_id)
        firings = client.list_schedule_runs(schedule.schedule_id).firings
        runs = client.list_runs(schedule_id=schedule.schedule_id).runs

The client starts one daemon thread running an asyncio event loop; every
call (and every step of an event iterator) runs the asyncio client's
coroutine on that loop and blocks the caller until it is done, so the grpc.aio
channel lives in that loop alone. ``close()`` (or leaving ``with``) closes the
channel, stops the loop and joins the thread; it is safe to call twice.

The API and the semantics are those of ``keel_client.KeelClient`` and
``keel_client.RunHandle``, without ``await``. Errors are the same objects
(``grpc.aio.AioRpcError``, a ``grpc.RpcError``; ``StreamContractError``;
``LogRolledBack`` when the run's store lost events a handle already received,
re-exported here).
``on_reconnect`` callbacks run in the client's thread. Do not call a sync
client from an event loop that serves the Keel server it talks to: the call
blocks that loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Coroutine, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar, Unpack

from keel.v1 import agent_service_pb2 as pb

from keel_client import client as aio
from keel_client.errors import LogRolledBack, StreamContractError
from keel_client.handle import OnReconnect, Reconnect
from keel_client.handle import RunHandle as AsyncRunHandle

__all__ = ["KeelClient", "LogRolledBack", "RunHandle", "StreamContractError"]

T = TypeVar("T")
_STOP_TIMEOUT_S = 10.0


class _LoopThread:
    """An asyncio event loop running in a daemon thread of its own."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._closed = False
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            # Finish what stop() left behind: calls submitted meanwhile (one more
            # turn starts their tasks), pending tasks (cancelled: their callers
            # get CancelledError instead of waiting forever) and async generators.
            self._loop.run_until_complete(asyncio.sleep(0))
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on the loop; block until it is done and return its result.

        An exception in the caller while it waits (KeyboardInterrupt) cancels
        the coroutine.
        """
        if self._closed:
            coroutine.close()
            raise RuntimeError("this KeelClient is closed")
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError("a sync KeelClient cannot be called from its own event loop")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def stop(self) -> None:
        """Stop the loop and join its thread. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        if threading.current_thread() is not self._thread:
            self._thread.join(_STOP_TIMEOUT_S)


async def _next(events: AsyncGenerator[pb.AgentEvent, None]) -> pb.AgentEvent | None:
    """The next event, or None at the end (a Future cannot carry StopAsyncIteration)."""
    try:
        return await anext(events)
    except StopAsyncIteration:
        return None


class RunHandle:
    """A run's event stream that survives dropped connections, for blocking code.

    A view of a ``keel_client.RunHandle`` (``run_id``, ``next_offset``,
    ``incarnation``, ``snapshot``, ``last_heartbeat``, ``reconnects`` are its
    attributes), iterated with a plain ``for``; its errors are the async
    handle's (``LogRolledBack`` among them).
    """

    def __init__(self, handle: AsyncRunHandle, loop: _LoopThread) -> None:
        self._handle = handle
        self._loop = loop

    @property
    def run_id(self) -> str | None:
        """The run's id; None for a ``stream()`` handle until its first snapshot."""
        return self._handle.run_id

    @property
    def next_offset(self) -> int:
        """The index of the next event ``events()`` yields: the last yielded index + 1."""
        return self._handle.next_offset

    @property
    def incarnation(self) -> str:
        """The incarnation of the store that wrote the events this handle holds ("" if
        unknown), sent with every reconnect (see the async RunHandle)."""
        return self._handle.incarnation

    @property
    def snapshot(self) -> pb.RunSnapshot | None:
        """The RunSnapshot of the latest (re)connection."""
        return self._handle.snapshot

    @property
    def last_heartbeat(self) -> pb.Heartbeat | None:
        """The latest Heartbeat."""
        return self._handle.last_heartbeat

    @property
    def reconnects(self) -> list[Reconnect]:
        """Every reconnect so far."""
        return self._handle.reconnects

    @property
    def stop_at_suspend(self) -> bool:
        """Whether events() ends right after a ``suspended`` event (a run's handle only)."""
        return self._handle.stop_at_suspend

    @stop_at_suspend.setter
    def stop_at_suspend(self, value: bool) -> None:
        self._handle.stop_at_suspend = value

    def approve(
        self,
        tool_call_id: str,
        *,
        override_args: Mapping[str, Any] | None = None,
        request_id: str | None = None,
    ) -> pb.RunSnapshot:
        """Approve a tool call that waits for approval (see the async RunHandle)."""
        coroutine = self._handle.approve(
            tool_call_id, override_args=override_args, request_id=request_id
        )
        return self._loop.run(coroutine)

    def deny(
        self, tool_call_id: str, message: str = "", *, request_id: str | None = None
    ) -> pb.RunSnapshot:
        """Deny a tool call that waits for approval; the model sees ``message``."""
        return self._loop.run(self._handle.deny(tool_call_id, message, request_id=request_id))

    def answer(
        self, tool_call_id: str, result: Any, *, request_id: str | None = None
    ) -> pb.RunSnapshot:
        """Give the result (any JSON value) of a deferred tool call."""
        return self._loop.run(self._handle.answer(tool_call_id, result, request_id=request_id))

    def events(self, from_offset: int | None = None) -> Iterator[pb.AgentEvent]:
        """Yield the run's events from ``from_offset`` (default: ``next_offset``)
        exactly once and in index order, until the run's terminal event.

        Lazy: nothing is sent until the first ``next()``. Breaking out of the
        ``for`` loop (or closing the iterator) cancels the call; the run goes on
        in the server and ``events()`` may be iterated again later. See
        ``keel_client.RunHandle.events`` for the loop and its errors.
        """
        events = self._handle.events(from_offset)
        try:
            while (event := self._loop.run(_next(events))) is not None:
                yield event
        finally:
            if not self._loop.closed:
                self._loop.run(events.aclose())


class KeelClient:
    """A blocking connection to one Keel server (or a load balancer in front of many).

    Takes the arguments of ``keel_client.KeelClient``. Use it as ``with``, or
    call ``close()``.
    """

    def __init__(
        self,
        target: str,
        *,
        initial_backoff_s: float = 0.05,
        max_backoff_s: float = 2.0,
        max_reconnects: int | None = None,
        channel_options: aio.ChannelOptions = (),
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        client_certificate: tuple[bytes, bytes] | None = None,
    ) -> None:
        self._client = aio.KeelClient(
            target,
            initial_backoff_s=initial_backoff_s,
            max_backoff_s=max_backoff_s,
            max_reconnects=max_reconnects,
            channel_options=channel_options,
            api_key=api_key,
            tls=tls,
            root_certificates=root_certificates,
            client_certificate=client_certificate,
        )
        self._loop = _LoopThread(name=f"keel-client {target}")

    @property
    def target(self) -> str:
        return self._client.target

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel (cancelling its open calls), stop the loop, join its thread.

        Safe to call twice.
        """
        if self._loop.closed:
            return
        try:
            self._loop.run(self._client.close())
        finally:
            self._loop.stop()

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
        """A handle that starts a run with Stream on its first iteration (see the async
        client); with a ``thread_id``, on that thread, ``busy_policy`` deciding when it is busy;
        with ``until_idle``, the run waits for its background tasks before it finishes;
        with a ``goal``, the run goes on attempt after attempt until its judge is satisfied."""
        handle = self._client.stream(
            agent_id,
            input,
            request_id=request_id,
            on_reconnect=on_reconnect,
            thread_id=thread_id,
            busy_policy=busy_policy,
            until_idle=until_idle,
            goal=goal,
        )
        return RunHandle(handle, self._loop)

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
        """The next turn of a thread: a handle that starts a run on ``thread_id`` on its
        first iteration and streams the reply (see the async client's ``send``)."""
        handle = self._client.send(
            thread_id,
            agent_id,
            input,
            busy_policy=busy_policy,
            request_id=request_id,
            on_reconnect=on_reconnect,
            until_idle=until_idle,
            goal=goal,
        )
        return RunHandle(handle, self._loop)

    def run(
        self,
        run_id: str,
        *,
        on_reconnect: OnReconnect | None = None,
        stop_at_suspend: bool = False,
    ) -> RunHandle:
        """A handle on an existing run, observed from offset 0 unless told otherwise;
        with ``stop_at_suspend`` its events() end right after a ``suspended`` event."""
        handle = self._client.run(
            run_id, on_reconnect=on_reconnect, stop_at_suspend=stop_at_suspend
        )
        return RunHandle(handle, self._loop)

    # Decisions for a suspended run (Resume).

    def approve(
        self,
        run_id: str,
        tool_call_id: str,
        *,
        override_args: Mapping[str, Any] | None = None,
        request_id: str | None = None,
    ) -> pb.RunSnapshot:
        """Approve a pending tool call of a suspended run (see the async client)."""
        coroutine = self._client.approve(
            run_id, tool_call_id, override_args=override_args, request_id=request_id
        )
        return self._loop.run(coroutine)

    def deny(
        self, run_id: str, tool_call_id: str, message: str = "", *, request_id: str | None = None
    ) -> pb.RunSnapshot:
        """Deny a pending tool call of a suspended run; the model sees ``message``."""
        coroutine = self._client.deny(run_id, tool_call_id, message, request_id=request_id)
        return self._loop.run(coroutine)

    def answer(
        self, run_id: str, tool_call_id: str, result: Any, *, request_id: str | None = None
    ) -> pb.RunSnapshot:
        """Give the result (any JSON value) of a deferred tool call of a suspended run."""
        coroutine = self._client.answer(run_id, tool_call_id, result, request_id=request_id)
        return self._loop.run(coroutine)

    def resume(
        self, run_id: str, decisions: Sequence[pb.Decision], *, request_id: str | None = None
    ) -> pb.RunSnapshot:
        """Send Resume(run_id, decisions) until the server acknowledges it (see KeelClient)."""
        return self._loop.run(self._client.resume(run_id, decisions, request_id=request_id))

    # Unary calls.

    def start_run(
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
        """Start a run without streaming it; the same request_id returns the same run."""
        coroutine = self._client.start_run(
            agent_id,
            input,
            request_id=request_id,
            thread_id=thread_id,
            busy_policy=busy_policy,
            until_idle=until_idle,
            goal=goal,
        )
        return self._loop.run(coroutine)

    def get_run(self, run_id: str) -> pb.Run:
        """A run's current state."""
        return self._loop.run(self._client.get_run(run_id))

    def list_runs(
        self,
        agent_id: str = "",
        states: Sequence[pb.RunState.ValueType] = (),
        page_size: int = 0,
        page_token: str = "",
        thread_id: str = "",
        schedule_id: str = "",
    ) -> pb.ListRunsResponse:
        """One page of runs, newest first; pass next_page_token back for the next.
        Filters: ``agent_id``, ``states``, ``thread_id``, ``schedule_id``."""
        coroutine = self._client.list_runs(
            agent_id, states, page_size, page_token, thread_id, schedule_id
        )
        return self._loop.run(coroutine)

    def cancel_run(self, run_id: str, reason: str = "") -> pb.Run:
        """Cancel a run that has not ended; an ended run is returned unchanged."""
        return self._loop.run(self._client.cancel_run(run_id, reason))

    def list_agents(self) -> list[pb.Agent]:
        """The agents this server can run, sorted by agent_id."""
        return self._loop.run(self._client.list_agents())

    # Background tasks: calls of background tools, run off their run's agent loop.

    def get_task(self, task_id: str) -> pb.Task:
        """A background task; NOT_FOUND (TASK_NOT_FOUND) for an unknown one."""
        return self._loop.run(self._client.get_task(task_id))

    def list_tasks(
        self,
        run_id: str = "",
        agent_id: str = "",
        statuses: Sequence[pb.TaskStatus.ValueType] = (),
        page_size: int = 0,
        page_token: str = "",
    ) -> pb.ListTasksResponse:
        """One page of background tasks, newest first; pass next_page_token back for the next."""
        coroutine = self._client.list_tasks(run_id, agent_id, statuses, page_size, page_token)
        return self._loop.run(coroutine)

    def cancel_task(self, task_id: str, reason: str = "") -> pb.Task:
        """Cancel a task that has not ended (a running one stops as soon as its runner
        hears of it); an ended task is returned unchanged."""
        return self._loop.run(self._client.cancel_task(task_id, reason))

    def retry_task(self, task_id: str) -> pb.Task:
        """Run a FAILED or CANCELLED task again; the task, QUEUED again.
        FAILED_PRECONDITION (TASK_NOT_RETRYABLE) for any other task."""
        return self._loop.run(self._client.retry_task(task_id))

    # Threads: conversations whose runs share one message history.

    def create_thread(
        self,
        *,
        thread_id: str = "",
        resource_id: str = "",
        metadata: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> pb.Thread:
        """Create a thread; the same request_id sent again returns the same thread."""
        coroutine = self._client.create_thread(
            thread_id=thread_id, resource_id=resource_id, metadata=metadata, request_id=request_id
        )
        return self._loop.run(coroutine)

    def get_thread(self, thread_id: str) -> pb.Thread:
        """A thread: its owner, metadata, active and queued runs, number of messages."""
        return self._loop.run(self._client.get_thread(thread_id))

    def list_threads(
        self, resource_id: str = "", page_size: int = 0, page_token: str = ""
    ) -> pb.ListThreadsResponse:
        """One page of threads (of ``resource_id`` if given), newest first."""
        return self._loop.run(self._client.list_threads(resource_id, page_size, page_token))

    def delete_thread(self, thread_id: str) -> None:
        """Delete a thread and its messages; FAILED_PRECONDITION (THREAD_BUSY) while
        a run of the thread is active or queued."""
        self._loop.run(self._client.delete_thread(thread_id))

    def list_thread_messages(
        self,
        thread_id: str,
        *,
        page_size: int = 0,
        page_token: str = "",
        newest_first: bool = False,
    ) -> pb.ListThreadMessagesResponse:
        """One page of a thread's messages, oldest first (or ``newest_first``)."""
        coroutine = self._client.list_thread_messages(
            thread_id, page_size=page_size, page_token=page_token, newest_first=newest_first
        )
        return self._loop.run(coroutine)

    def thread_messages(
        self, thread_id: str, *, page_size: int = 0, newest_first: bool = False
    ) -> Iterator[pb.ThreadMessage]:
        """Every message of a thread, oldest first (or ``newest_first``), page by page.

        Lazy: each page is fetched when the previous one has been iterated.
        """
        page_token = ""
        while True:
            page = self.list_thread_messages(
                thread_id, page_size=page_size, page_token=page_token, newest_first=newest_first
            )
            yield from page.messages
            page_token = page.next_page_token
            if not page_token:
                return

    # Schedules: an agent run on a cron cadence.

    def create_schedule(
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
        """Create a schedule: each tick of ``cron`` (in ``timezone``, "" is UTC) starts
        a run of ``agent_id`` with ``input`` (see the async client for the options and
        errors: INVALID_ARGUMENT, ALREADY_EXISTS SCHEDULE_ALREADY_EXISTS, ...)."""
        coroutine = self._client.create_schedule(
            agent_id,
            cron,
            input,
            timezone=timezone,
            schedule_id=schedule_id,
            thread_mode=thread_mode,
            overlap_policy=overlap_policy,
            catch_up_window=catch_up_window,
            paused=paused,
            request_id=request_id,
            thread_id=thread_id,
            goal=goal,
        )
        return self._loop.run(coroutine)

    def get_schedule(self, schedule_id: str) -> pb.Schedule:
        """A schedule with its next fire times and recent firings; NOT_FOUND
        (SCHEDULE_NOT_FOUND) for an unknown one."""
        return self._loop.run(self._client.get_schedule(schedule_id))

    def list_schedules(
        self, agent_id: str = "", page_size: int = 0, page_token: str = ""
    ) -> pb.ListSchedulesResponse:
        """One page of schedules (of ``agent_id`` if given), newest first."""
        return self._loop.run(self._client.list_schedules(agent_id, page_size, page_token))

    def update_schedule(
        self, schedule_id: str, **changes: Unpack[aio.ScheduleChanges]
    ) -> pb.Schedule:
        """Change the fields of a schedule given as keyword arguments, and only those
        (``update_schedule(schedule_id, cron="@daily")``; see the async client)."""
        return self._loop.run(self._client.update_schedule(schedule_id, **changes))

    def pause_schedule(self, schedule_id: str) -> pb.Schedule:
        """Pause a schedule: it fires no tick until resumed (a trigger still fires it)."""
        return self._loop.run(self._client.pause_schedule(schedule_id))

    def resume_schedule(self, schedule_id: str) -> pb.Schedule:
        """Unpause a schedule; its cadence starts again from now."""
        return self._loop.run(self._client.resume_schedule(schedule_id))

    def delete_schedule(self, schedule_id: str) -> None:
        """Delete a schedule and its firing history (its runs stay); NOT_FOUND
        (SCHEDULE_NOT_FOUND) for an unknown one."""
        self._loop.run(self._client.delete_schedule(schedule_id))

    def trigger_schedule(
        self, schedule_id: str, request_id: str = ""
    ) -> pb.TriggerScheduleResponse:
        """Fire a schedule now, paused or not; the run it started and the firing
        (TRIGGERED). The same request_id sent again returns the same run."""
        return self._loop.run(self._client.trigger_schedule(schedule_id, request_id))

    def list_schedule_runs(
        self, schedule_id: str, page_size: int = 0, page_token: str = ""
    ) -> pb.ListScheduleRunsResponse:
        """One page of a schedule's firings, newest first."""
        coroutine = self._client.list_schedule_runs(schedule_id, page_size, page_token)
        return self._loop.run(coroutine)
