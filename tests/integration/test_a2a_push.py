"""A2A push notifications (docs/a2a.md): configs through the a2a-sdk client on every
binding, deliveries to a webhook receiver the test runs on 127.0.0.1 (failing on purpose),
and delivery taken over by another server after a SIGKILL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from a2a.client import create_client
from a2a.client.client import Client
from a2a.types import a2a_pb2 as a2a
from google.protobuf import json_format

from server.a2a.push.store import MAX_CONFIGS_PER_TASK
from server.app import Keel
from tests.integration.conftest import script, text
from tests.integration.test_a2a import (
    SCRIPTED_TEXT,
    Reassembled,
    client_of,
    consume,
    user_message,
    web_keel,
)
from tests.processes import start_keel_process

PUSH = {"a2a_push_allow_private": True, "a2a_push_retry_initial_ms": 50}
PUSH_ENV = {
    "KEEL_A2A_PUSH_ALLOW_PRIVATE": "true",
    "KEEL_A2A_PUSH_RETRY_INITIAL_MS": "50",
    "KEEL_A2A_PUSH_RETRY_MAX_MS": "200",
    "KEEL_LEASE_TTL_S": "1",
}
WAIT_S = 60.0


@dataclass
class Notification:
    path: str
    headers: dict[str, str]
    task: a2a.Task


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1: answers 500 to the first `fail_first` POSTs (or to
    every one while `failing`), 200 to the others, and keeps what it acknowledged."""

    fail_first: int = 0
    failing: bool = False
    port: int = 0
    received: list[Notification] = field(default_factory=list)
    refused: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    connections: set[asyncio.Task[None]] = field(default_factory=set)

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                _, path, _ = lines[0].split(" ", 2)
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in lines[1:] if line)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                fail = self.failing or self.refused < self.fail_first
                async with self.changed:
                    if fail:
                        self.refused += 1
                    else:
                        response = a2a.StreamResponse()
                        json_format.Parse(body, response)
                        self.received.append(Notification(path, headers, response.task))
                    self.changed.notify_all()
                status = b"500 Internal Server Error" if fail else b"200 OK"
                writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.CancelledError:
            pass  # the fixture closes the receiver: end quietly (asyncio's streams log it)
        finally:
            self.connections.discard(task)
            writer.close()

    async def wait_for(self, done: Callable[[list[Notification]], bool]) -> list[Notification]:
        async with asyncio.timeout(WAIT_S), self.changed:
            await self.changed.wait_for(lambda: done(self.received))
            return list(self.received)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    server = await asyncio.start_server(receiver.handle, "127.0.0.1", 0)
    receiver.port = server.sockets[0].getsockname()[1]
    async with server:
        yield receiver
        for connection in list(receiver.connections):
            connection.cancel()
        await asyncio.gather(*receiver.connections, return_exceptions=True)


def ended(notifications: list[Notification]) -> bool:
    return any(n.task.status.state == a2a.TASK_STATE_COMPLETED for n in notifications)


def push_config(url: str, token: str = "", **fields: Any) -> a2a.TaskPushNotificationConfig:
    return a2a.TaskPushNotificationConfig(url=url, token=token, **fields)


@pytest.mark.parametrize("transport", ["jsonrpc", "grpc", "rest"])
async def test_a_finished_task_is_pushed_after_two_failed_deliveries(
    start_keel: Callable[..., Any], receiver: Receiver, transport: str
) -> None:
    receiver.fail_first = 2
    keel = await web_keel(start_keel, **PUSH)
    client = await client_of(keel, transport)
    request = a2a.SendMessageRequest(
        message=user_message(script(text(50))),
        configuration=a2a.SendMessageConfiguration(
            return_immediately=True,
            task_push_notification_config=push_config(receiver.url(), "s3cret"),
        ),
    )
    sent = await consume(client.send_message(request), Reassembled())
    got = await receiver.wait_for(ended)
    assert receiver.refused >= 2
    final = next(n for n in got if n.task.status.state == a2a.TASK_STATE_COMPLETED)
    assert final.task.id == sent.task_id
    assert final.headers["x-a2a-notification-token"] == "s3cret"
    assert final.headers["content-type"] == "application/json"
    assert final.task.artifacts[0].parts[0].text == SCRIPTED_TEXT
    # Each delivery is the task as it was: states only move forward, and the final one
    # is the last notification.
    order = [n.task.status.state for n in got]
    assert order[-1] == a2a.TASK_STATE_COMPLETED
    assert order == sorted(order, key=_progress)
    await client.close()


def _progress(state: int) -> int:
    order: dict[int, int] = {
        a2a.TASK_STATE_SUBMITTED: 0,
        a2a.TASK_STATE_WORKING: 1,
        a2a.TASK_STATE_INPUT_REQUIRED: 2,
        a2a.TASK_STATE_COMPLETED: 3,
    }
    return order[state]


@pytest.mark.parametrize("transport", ["jsonrpc", "grpc", "rest"])
async def test_configs_are_created_read_listed_and_deleted(
    start_keel: Callable[..., Any], receiver: Receiver, transport: str
) -> None:
    keel = await web_keel(start_keel, **PUSH)
    client = await client_of(keel, transport)
    # A run that waits for approval: it stays, and its configs with it.
    steps = script({"tool": "approve_me", "args": {"action": "deploy"}}, text(2))
    sent = await consume(
        client.send_message(a2a.SendMessageRequest(message=user_message(steps))), Reassembled()
    )
    assert sent.states[-1] == a2a.TASK_STATE_INPUT_REQUIRED
    made = await client.create_task_push_notification_config(
        push_config(
            receiver.url("/a"),
            "t-a",
            task_id=sent.task_id,
            authentication=a2a.AuthenticationInfo(scheme="Bearer", credentials="c"),
        )
    )
    assert made.id and made.task_id == sent.task_id
    named = await client.create_task_push_notification_config(
        push_config(receiver.url("/b"), task_id=sent.task_id, id="mine")
    )
    assert named.id == "mine"
    read = await client.get_task_push_notification_config(
        a2a.GetTaskPushNotificationConfigRequest(task_id=sent.task_id, id=made.id)
    )
    assert read.url == receiver.url("/a") and read.token == "t-a"
    assert read.authentication.scheme == "Bearer"
    listed = await client.list_task_push_notification_configs(
        a2a.ListTaskPushNotificationConfigsRequest(task_id=sent.task_id)
    )
    assert [c.id for c in listed.configs] == [made.id, "mine"]
    first_page = await client.list_task_push_notification_configs(
        a2a.ListTaskPushNotificationConfigsRequest(task_id=sent.task_id, page_size=1)
    )
    second_page = await client.list_task_push_notification_configs(
        a2a.ListTaskPushNotificationConfigsRequest(
            task_id=sent.task_id, page_size=1, page_token=first_page.next_page_token
        )
    )
    assert [c.id for c in [*first_page.configs, *second_page.configs]] == [made.id, "mine"]
    assert not second_page.next_page_token
    # Each config is told the task's current state (input-required) once made, with
    # its credentials.
    got = await receiver.wait_for(lambda r: {n.path for n in r} == {"/a", "/b"})
    assert {n.task.status.state for n in got} == {a2a.TASK_STATE_INPUT_REQUIRED}
    assert next(n for n in got if n.path == "/a").headers["authorization"] == "Bearer c"
    await client.delete_task_push_notification_config(
        a2a.DeleteTaskPushNotificationConfigRequest(task_id=sent.task_id, id="mine")
    )
    listed = await client.list_task_push_notification_configs(
        a2a.ListTaskPushNotificationConfigsRequest(task_id=sent.task_id)
    )
    assert [c.id for c in listed.configs] == [made.id]
    with pytest.raises(Exception, match="no push notification config"):
        await client.get_task_push_notification_config(
            a2a.GetTaskPushNotificationConfigRequest(task_id=sent.task_id, id="mine")
        )
    with pytest.raises(Exception, match="no push notification config"):
        await client.delete_task_push_notification_config(
            a2a.DeleteTaskPushNotificationConfigRequest(task_id=sent.task_id, id="mine")
        )
    await client.close()


async def test_bad_push_configs_are_refused(start_keel: Callable[..., Any]) -> None:
    keel = await web_keel(start_keel)  # private targets refused (the default)
    client = await client_of(keel)
    sent = await consume(
        client.send_message(a2a.SendMessageRequest(message=user_message(script(text(1))))),
        Reassembled(),
    )
    task_id = sent.task_id
    for url, why in [
        ("ftp://example.com/hook", "http:// or https://"),
        ("file:///etc/passwd", "http:// or https://"),
        ("http:///nohost", "no host"),
        ("http://127.0.0.1:9/hook", "public addresses"),
        ("http://localhost/hook", "public addresses"),
        ("http://169.254.169.254/latest/meta-data", "public addresses"),
        ("http://10.1.2.3/hook", "public addresses"),
        ("http://[::1]/hook", "public addresses"),
        ("http://example.com:99999/hook", "cannot be parsed"),
        ("https://example.com/" + "x" * 3000, "longer than"),
    ]:
        with pytest.raises(Exception, match=why):
            await client.create_task_push_notification_config(push_config(url, task_id=task_id))
    with pytest.raises(Exception, match="not found"):
        await client.create_task_push_notification_config(
            push_config("https://example.com/hook", task_id="nope")
        )
    with pytest.raises(Exception, match="not found"):
        await client.list_task_push_notification_configs(
            a2a.ListTaskPushNotificationConfigsRequest(task_id="nope")
        )
    with pytest.raises(Exception, match="printable"):
        await client.create_task_push_notification_config(
            push_config("https://example.com/hook", task_id=task_id, id="x" * 65)
        )
    with pytest.raises(Exception, match="token is longer"):
        await client.create_task_push_notification_config(
            push_config("https://example.com/hook", "t" * 2000, task_id=task_id)
        )
    # A refused config on SendMessage starts no run.
    before = await client.list_tasks(a2a.ListTasksRequest())
    with pytest.raises(Exception, match="http:// or https://"):
        await consume(
            client.send_message(
                a2a.SendMessageRequest(
                    message=user_message(script(text(1))),
                    configuration=a2a.SendMessageConfiguration(
                        task_push_notification_config=push_config("gopher://x")
                    ),
                )
            ),
            Reassembled(),
        )
    after = await client.list_tasks(a2a.ListTasksRequest())
    assert [t.id for t in after.tasks] == [t.id for t in before.tasks]
    await client.close()


async def test_a_task_takes_a_bounded_number_of_configs(
    start_keel: Callable[..., Any], receiver: Receiver
) -> None:
    keel = await web_keel(start_keel, **PUSH)
    client = await client_of(keel)
    sent = await consume(
        client.send_message(a2a.SendMessageRequest(message=user_message(script(text(1))))),
        Reassembled(),
    )
    for n in range(MAX_CONFIGS_PER_TASK):
        await client.create_task_push_notification_config(
            push_config(receiver.url(f"/{n}"), task_id=sent.task_id, id=f"c{n}")
        )
    with pytest.raises(Exception, match=f"at most {MAX_CONFIGS_PER_TASK}"):
        await client.create_task_push_notification_config(
            push_config(receiver.url("/more"), task_id=sent.task_id)
        )
    # Replacing one by its id is no new config.
    await client.create_task_push_notification_config(
        push_config(receiver.url("/again"), task_id=sent.task_id, id="c0")
    )
    # A config made on a finished task is told its final state.
    got = await receiver.wait_for(lambda r: "/again" in {n.path for n in r})
    assert {n.task.status.state for n in got} == {a2a.TASK_STATE_COMPLETED}
    await client.close()


async def test_delivery_survives_a_sigkill_of_the_server(
    redis_url: str, key_prefix: str, receiver: Receiver
) -> None:
    """The receiver refuses every delivery until the server that owns the task's
    notifications is SIGKILLed; a second server takes the deliveries over."""
    receiver.failing = True
    first = await start_keel_process(
        redis_url=redis_url, key_prefix=key_prefix, args=["--http-port", "0"], env=PUSH_ENV
    )
    try:
        client = await _process_client(first.http_port)
        request = a2a.SendMessageRequest(
            message=user_message(script(text(5))),
            configuration=a2a.SendMessageConfiguration(
                task_push_notification_config=push_config(receiver.url(), "tok")
            ),
        )
        sent = await consume(client.send_message(request), Reassembled())
        assert sent.states[-1] == a2a.TASK_STATE_COMPLETED
        await client.close()
        async with asyncio.timeout(WAIT_S), receiver.changed:
            await receiver.changed.wait_for(lambda: receiver.refused >= 3)
    finally:
        first.kill()
        await first.wait()
    assert not receiver.received
    receiver.failing = False
    second = await start_keel_process(
        redis_url=redis_url, key_prefix=key_prefix, args=["--http-port", "0"], env=PUSH_ENV
    )
    try:
        got = await receiver.wait_for(ended)
        final = next(n for n in got if n.task.status.state == a2a.TASK_STATE_COMPLETED)
        assert final.task.id == sent.task_id
        assert final.headers["x-a2a-notification-token"] == "tok"
        assert final.task.artifacts[0].parts[0].text == "t0 t1 t2 t3 t4 done"
    finally:
        second.kill()
        await second.wait()


async def _process_client(http_port: int | None) -> Client:
    return await create_client(f"http://127.0.0.1:{http_port}/a2a/scripted")


async def test_a_second_suspension_is_pushed_too(
    start_keel: Callable[..., Any], receiver: Receiver
) -> None:
    keel: Keel = await web_keel(start_keel, **PUSH)
    client = await client_of(keel)
    approve = {"tool": "approve_me", "args": {"action": "deploy"}}
    sent = await consume(
        client.send_message(
            a2a.SendMessageRequest(
                message=user_message(script(approve, approve, text(1))),
                configuration=a2a.SendMessageConfiguration(
                    task_push_notification_config=push_config(receiver.url())
                ),
            )
        ),
        Reassembled(),
    )
    for round_ in (1, 2):
        got = await receiver.wait_for(
            lambda r, n=round_: (
                sum(x.task.status.state == a2a.TASK_STATE_INPUT_REQUIRED for x in r) >= n
            )
        )
        task = next(
            n.task for n in reversed(got) if n.task.status.state == a2a.TASK_STATE_INPUT_REQUIRED
        )
        pending = json_format.MessageToDict(task.status.message.parts[1].data)["pending"]
        answer = a2a.Part()
        json_format.ParseDict(
            {"decisions": [{"tool_call_id": pending[0]["tool_call_id"], "approve": True}]},
            answer.data,
        )
        await consume(
            client.send_message(
                a2a.SendMessageRequest(
                    message=a2a.Message(
                        message_id=f"answer-{round_}",
                        role=a2a.ROLE_USER,
                        task_id=sent.task_id,
                        parts=[answer],
                    )
                )
            ),
            Reassembled(),
        )
    await receiver.wait_for(ended)
    await client.close()
