"""`keel`: Keel's command line (typer + rich), over the blocking client.

    keel [--address H:P] [--api-key K] [--tls] COMMAND ...

`--address`, `--api-key` and `--tls` also come from KEEL_ADDRESS, KEEL_API_KEY
and KEEL_TLS. Every command takes `--json`: one JSON object per line
(protobuf's JSON mapping), for scripts; without it, tables and text for
people. Errors print the gRPC status and exit 1.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import grpc
import typer
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from keel.v1 import agent_service_pb2 as pb
from rich.console import Console
from rich.table import Table

from keel_client.errors import LogRolledBack
from keel_client.sync import KeelClient

app = typer.Typer(
    help="Keel's command line: runs, threads, tasks and schedules.", no_args_is_help=True
)
runs = typer.Typer(help="Runs: list, get, start, cancel, watch.", no_args_is_help=True)
threads = typer.Typer(help="Threads: list, get, messages, delete.", no_args_is_help=True)
tasks = typer.Typer(help="Background tasks: list, get, cancel, retry.", no_args_is_help=True)
schedules = typer.Typer(
    help="Schedules: list, get, create, pause, resume, delete, trigger.", no_args_is_help=True
)
app.add_typer(runs, name="runs")
app.add_typer(threads, name="threads")
app.add_typer(tasks, name="tasks")
app.add_typer(schedules, name="schedules")

T = TypeVar("T")
Json = Annotated[bool, typer.Option("--json", help="print JSON lines instead of tables")]


@dataclass
class _Connection:
    address: str = "127.0.0.1:50051"
    api_key: str | None = None
    tls: bool = False


_connection = _Connection()
_out = Console(highlight=False, soft_wrap=True)
_err = Console(stderr=True, highlight=False)


@app.callback()
def _options(
    address: Annotated[
        str, typer.Option(envvar="KEEL_ADDRESS", help="the server, host:port")
    ] = "127.0.0.1:50051",
    api_key: Annotated[
        str | None, typer.Option(envvar="KEEL_API_KEY", help="an API key (keys add)")
    ] = None,
    tls: Annotated[bool, typer.Option(envvar="KEEL_TLS", help="connect with TLS")] = False,
) -> None:
    _connection.address, _connection.api_key, _connection.tls = address, api_key, tls


@contextmanager
def _client() -> Iterator[KeelClient]:
    """A client for one command; an RPC error ends the command with exit code 1."""
    client = KeelClient(
        _connection.address,
        api_key=_connection.api_key,
        tls=_connection.tls,
        max_reconnects=20,
        max_backoff_s=1.0,
    )
    try:
        yield client
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        _err.print(f"[red]error[/red]: {code.name if code else 'RPC'}: {details}")
        raise typer.Exit(1) from None
    except LogRolledBack as exc:  # the store lost events already printed
        _err.print(f"[red]error[/red]: LOG_ROLLED_BACK: {exc}")
        raise typer.Exit(1) from None
    finally:
        client.close()


def _dict(message: Message) -> dict[str, Any]:
    """protobuf's JSON mapping (64-bit integers as strings), every field included."""
    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _emit_json(messages: Iterable[Message]) -> None:
    for message in messages:
        print(json.dumps(_dict(message), sort_keys=True), flush=True)


def _table(title: str, columns: list[str], rows: Iterable[list[str]]) -> None:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    _out.print(table)


def _state(value: pb.RunState.ValueType) -> str:
    return pb.RunState.Name(value).removeprefix("RUN_STATE_").lower()


def _show(message: Message, as_json: bool) -> None:
    """One resource: JSON, or its fields one per line."""
    if as_json:
        _emit_json([message])
        return
    for key, value in _dict(message).items():
        shown = value if isinstance(value, str) else json.dumps(value)
        _out.print(f"[bold]{key}[/bold]: {shown}")


# -- agents ------------------------------------------------------------------------


@app.command()
def agents(as_json: Json = False) -> None:
    """The agents the server runs."""
    with _client() as client:
        found = client.list_agents()
    if as_json:
        _emit_json(found)
        return
    _table(
        "agents",
        ["agent", "model", "tools", "description"],
        (
            [a.agent_id, a.model_name, ", ".join(t.name for t in a.tools), a.description]
            for a in found
        ),
    )


# -- runs --------------------------------------------------------------------------


@runs.command("list")
def runs_list(
    agent: Annotated[str, typer.Option(help="only this agent's runs")] = "",
    thread: Annotated[str, typer.Option(help="only this thread's runs")] = "",
    limit: Annotated[int, typer.Option(help="at most this many")] = 20,
    as_json: Json = False,
) -> None:
    """Runs, newest first."""
    with _client() as client:
        found = client.list_runs(agent_id=agent, thread_id=thread, page_size=limit).runs
    if as_json:
        _emit_json(found)
        return
    _table(
        "runs",
        ["run", "agent", "state", "events", "thread"],
        ([r.run_id, r.agent_id, _state(r.state), str(r.next_offset), r.thread_id] for r in found),
    )


@runs.command("get")
def runs_get(run_id: str, as_json: Json = False) -> None:
    """One run."""
    with _client() as client:
        _show(client.get_run(run_id), as_json)


@runs.command("start")
def runs_start(
    agent: str,
    input: str,
    request_id: Annotated[str | None, typer.Option(help="makes the start idempotent")] = None,
    thread: Annotated[str, typer.Option(help="run on this thread")] = "",
    as_json: Json = False,
) -> None:
    """Start a run (without following it: see `keel runs watch`)."""
    with _client() as client:
        _show(client.start_run(agent, input, request_id=request_id, thread_id=thread), as_json)


@runs.command("cancel")
def runs_cancel(run_id: str, reason: str = "", as_json: Json = False) -> None:
    """Cancel a run; an ended run is shown as it is."""
    with _client() as client:
        _show(client.cancel_run(run_id, reason), as_json)


@runs.command("watch")
def runs_watch(
    run_id: str,
    from_offset: Annotated[int, typer.Option("--from", help="the first event's index")] = 0,
    through_suspension: Annotated[
        bool, typer.Option(help="keep following a run that waits for a decision")
    ] = False,
    as_json: Json = False,
) -> None:
    """Follow a run live from an offset to its end (or its suspension), resuming by
    itself when the connection drops: text as it streams, tool calls and results, and
    a status line."""
    with _client() as client:
        handle = client.run(run_id, stop_at_suspend=not through_suspension)
        view = _Watch(as_json)
        for event in handle.events(from_offset=from_offset):
            view.event(event)
        view.done(handle.snapshot)


class _Watch:
    """Renders a run's events: JSON lines, or text as it streams, tool calls and results,
    and (on a terminal) a status line with the last index, kind and rate, at the bottom."""

    def __init__(self, as_json: bool) -> None:
        self._json = as_json
        self._count = 0
        self._started = time.monotonic()
        self._last_index = -1
        self._line_open = False  # streamed text without its newline yet
        self._status = sys.stderr.isatty() and not as_json
        self._drawn_at = 0.0

    def event(self, event: pb.AgentEvent) -> None:
        self._count += 1
        self._last_index = event.index
        if self._json:
            _emit_json([event])
            return
        kind = event.WhichOneof("payload") or ""
        self._clear_status()
        if kind == "text_delta":
            sys.stdout.write(event.text_delta.delta)
            self._line_open = True
        elif kind in _SHOWN:
            if self._line_open:
                sys.stdout.write("\n")
                self._line_open = False
            _out.print(_SHOWN[kind](event))
        sys.stdout.flush()
        self._draw_status(event.index, kind)

    def done(self, snapshot: pb.RunSnapshot | None) -> None:
        if self._json:
            return
        self._clear_status()
        if self._line_open:
            sys.stdout.write("\n")
            sys.stdout.flush()
        state = _state(snapshot.run.state) if snapshot is not None else "?"
        _err.print(f"[bold]{state}[/bold] · {self._count} events · last index {self._last_index}")

    def _draw_status(self, index: int, kind: str) -> None:
        now = time.monotonic()
        if not self._status or (now - self._drawn_at < 0.1 and kind == "text_delta"):
            return
        self._drawn_at = now
        rate = self._count / max(now - self._started, 1e-6)
        if self._line_open:
            return  # never split a line of text; the next event draws it
        sys.stderr.write(f"\x1b[2m index {index} · {kind} · {rate:,.0f} events/s\x1b[0m")
        sys.stderr.flush()

    def _clear_status(self) -> None:
        if self._status:
            sys.stderr.write("\r\x1b[2K")


_SHOWN: dict[str, Callable[[pb.AgentEvent], str]] = {
    "tool_call": lambda e: f"[cyan]→ {e.tool_call.tool_name}[/cyan]({e.tool_call.args_json})",
    "tool_result": lambda e: f"[green]← {e.tool_result.result_json}[/green]",
    "tool_error": lambda e: f"[red]← error[/red]: {e.tool_error.message}",
    "tool_call_approval": lambda e: (
        f"[yellow]? approve {e.tool_call_approval.tool_name}"
        f"({e.tool_call_approval.args_json})[/yellow]: "
        f"keel approve {e.run_id} {e.tool_call_approval.tool_call_id}"
    ),
    "step_superseded": lambda e: "[magenta]↺ step superseded: drop its partial output[/magenta]",
    "suspended": lambda e: "[yellow]suspended: waiting for a decision[/yellow]",
    "finish": lambda e: "[bold green]finished[/bold green]",
    "error": lambda e: f"[bold red]failed[/bold red]: {e.error.message}",
    "abort": lambda e: f"[bold red]cancelled[/bold red]: {e.abort.reason}",
}


# -- decisions ---------------------------------------------------------------------


@app.command()
def approve(run_id: str, tool_call_id: str, as_json: Json = False) -> None:
    """Approve a pending tool call of a suspended run."""
    with _client() as client:
        _show(client.approve(run_id, tool_call_id).run, as_json)


@app.command()
def deny(run_id: str, tool_call_id: str, message: str = "", as_json: Json = False) -> None:
    """Deny a pending tool call of a suspended run; the model sees the message."""
    with _client() as client:
        _show(client.deny(run_id, tool_call_id, message).run, as_json)


# -- threads -----------------------------------------------------------------------


@threads.command("list")
def threads_list(
    resource: Annotated[str, typer.Option(help="only this resource's threads")] = "",
    limit: int = 20,
    as_json: Json = False,
) -> None:
    """Threads, newest first."""
    with _client() as client:
        found = client.list_threads(resource, page_size=limit).threads
    if as_json:
        _emit_json(found)
        return
    _table(
        "threads",
        ["thread", "resource", "active run", "messages"],
        ([t.thread_id, t.resource_id, t.active_run_id, str(t.message_count)] for t in found),
    )


@threads.command("get")
def threads_get(thread_id: str, as_json: Json = False) -> None:
    """One thread."""
    with _client() as client:
        _show(client.get_thread(thread_id), as_json)


@threads.command("messages")
def threads_messages(thread_id: str, as_json: Json = False) -> None:
    """A thread's history, oldest first."""
    with _client() as client:
        messages = list(client.thread_messages(thread_id))
    if as_json:
        _emit_json(messages)
        return
    for message in messages:
        kind = pb.MessageKind.Name(message.kind).removeprefix("MESSAGE_KIND_").lower()
        parts = " ".join(_part(p) for p in message.parts)
        _out.print(f"[bold]{message.index}[/bold] {kind}: {parts}")


def _part(part: pb.MessagePart) -> str:
    """A message part in one line: its kind and fields as JSON."""
    return json.dumps(_dict(part), sort_keys=True)


@threads.command("delete")
def threads_delete(thread_id: str, as_json: Json = False) -> None:
    """Delete an idle thread and its history."""
    with _client() as client:
        client.delete_thread(thread_id)
    if as_json:
        print(json.dumps({"deleted": thread_id}))
    else:
        _out.print(f"deleted {thread_id}")


# -- tasks -------------------------------------------------------------------------


@tasks.command("list")
def tasks_list(
    run: Annotated[str, typer.Option(help="only this run's tasks")] = "",
    limit: int = 20,
    as_json: Json = False,
) -> None:
    """Background tasks, newest first."""
    with _client() as client:
        found = client.list_tasks(run_id=run, page_size=limit).tasks
    if as_json:
        _emit_json(found)
        return
    _table(
        "tasks",
        ["task", "run", "tool", "status", "attempt"],
        (
            [
                t.task_id,
                t.run_id,
                t.tool_name,
                pb.TaskStatus.Name(t.status).removeprefix("TASK_STATUS_").lower(),
                str(t.attempt),
            ]
            for t in found
        ),
    )


def _one(get: Callable[[KeelClient], Message], as_json: bool) -> None:
    with _client() as client:
        _show(get(client), as_json)


@tasks.command("get")
def tasks_get(task_id: str, as_json: Json = False) -> None:
    """One task."""
    _one(lambda c: c.get_task(task_id), as_json)


@tasks.command("cancel")
def tasks_cancel(task_id: str, reason: str = "", as_json: Json = False) -> None:
    """Cancel a task."""
    _one(lambda c: c.cancel_task(task_id, reason), as_json)


@tasks.command("retry")
def tasks_retry(task_id: str, as_json: Json = False) -> None:
    """Queue a failed or cancelled task again."""
    _one(lambda c: c.retry_task(task_id), as_json)


# -- schedules ---------------------------------------------------------------------


@schedules.command("list")
def schedules_list(limit: int = 20, as_json: Json = False) -> None:
    """Schedules, newest first."""
    with _client() as client:
        found = client.list_schedules(page_size=limit).schedules
    if as_json:
        _emit_json(found)
        return
    _table(
        "schedules",
        ["schedule", "agent", "cron", "timezone", "paused", "next fire"],
        (
            [
                s.schedule_id,
                s.agent_id,
                s.cron,
                s.timezone,
                "yes" if s.paused else "",
                s.next_fire_times[0].ToJsonString() if s.next_fire_times else "",
            ]
            for s in found
        ),
    )


@schedules.command("get")
def schedules_get(schedule_id: str, as_json: Json = False) -> None:
    """One schedule, with its next fire times and recent firings."""
    _one(lambda c: c.get_schedule(schedule_id), as_json)


@schedules.command("create")
def schedules_create(
    agent: str,
    cron: str,
    input: str,
    timezone: Annotated[str, typer.Option(help="IANA time zone (default UTC)")] = "",
    schedule_id: Annotated[str, typer.Option("--id", help="the schedule's id")] = "",
    paused: bool = False,
    as_json: Json = False,
) -> None:
    """Create a schedule: AGENT runs INPUT at every tick of CRON."""
    _one(
        lambda c: c.create_schedule(
            agent, cron, input, timezone=timezone, schedule_id=schedule_id, paused=paused
        ),
        as_json,
    )


@schedules.command("pause")
def schedules_pause(schedule_id: str, as_json: Json = False) -> None:
    """Stop a schedule's ticks."""
    _one(lambda c: c.pause_schedule(schedule_id), as_json)


@schedules.command("resume")
def schedules_resume(schedule_id: str, as_json: Json = False) -> None:
    """Start a paused schedule's ticks again, from now."""
    _one(lambda c: c.resume_schedule(schedule_id), as_json)


@schedules.command("delete")
def schedules_delete(schedule_id: str, as_json: Json = False) -> None:
    """Delete a schedule (its runs stay)."""
    with _client() as client:
        client.delete_schedule(schedule_id)
    if as_json:
        print(json.dumps({"deleted": schedule_id}))
    else:
        _out.print(f"deleted {schedule_id}")


@schedules.command("trigger")
def schedules_trigger(schedule_id: str, as_json: Json = False) -> None:
    """Fire a schedule now; shows the run it started."""
    _one(lambda c: c.trigger_schedule(schedule_id).run, as_json)


def main() -> None:
    app()
