/**
 * The resume loop of RunHandle against a real gRPC server (in this process)
 * that drops streams as each test scripts it: see fake.ts.
 */
import assert from "node:assert/strict";
import { afterEach, beforeEach, describe, test } from "node:test";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  Backoff,
  ClientClosedError,
  KeelClient,
  RunState,
  StreamContractError,
  TaskStatus,
  ThreadBusyPolicy,
  type AgentEvent,
  type KeelClientOptions,
  type Reconnect,
} from "../src/index.js";
import { FakeAgentService, N_EVENTS, RUN_ID, type Call } from "./fake.js";

const FAST: KeelClientOptions = { initialBackoffMs: 1, maxBackoffMs: 10 };

let service: FakeAgentService;
let client: KeelClient;

beforeEach(async () => {
  service = new FakeAgentService();
  client = new KeelClient(await service.start(), FAST);
});

afterEach(async () => {
  client.close();
  await service.stop();
});

function range(start: number, end: number): bigint[] {
  return Array.from({ length: end - start }, (_, i) => BigInt(start + i));
}

async function indices(events: AsyncIterable<AgentEvent>): Promise<bigint[]> {
  const seen: bigint[] = [];
  for await (const event of events) {
    seen.push(event.index);
  }
  return seen;
}

function call(rpc: Call["rpc"], key: string, offset: number): Call {
  return { rpc, key, offset: BigInt(offset) };
}

describe("the resume loop", () => {
  test("stream yields every event exactly once across UNAVAILABLE drops", async () => {
    service.failures
      .set(0, { at: 7, code: Code.Unavailable })
      .set(1, { at: 13, code: Code.Unavailable });
    const seen: Reconnect[] = [];
    const handle = client.stream("scripted", "{}", { onReconnect: (r) => seen.push(r) });

    assert.deepEqual(await indices(handle.events()), range(0, N_EVENTS));

    const requestId = service.calls[0]!.key;
    assert.ok(requestId, "a request_id is generated, so a retried Stream is idempotent");
    assert.deepEqual(service.calls, [
      call("Stream", requestId, 0),
      call("Observe", RUN_ID, 7),
      call("Observe", RUN_ID, 13),
    ]);
    assert.deepEqual(
      seen.map((r) => [r.rpc, r.offset, r.attempt, r.code]),
      [
        ["Observe", 7n, 1, Code.Unavailable],
        ["Observe", 13n, 1, Code.Unavailable],
      ],
    );
    assert.deepEqual(handle.reconnects, seen);
    assert.equal(handle.runId, RUN_ID);
    assert.equal(handle.nextOffset, BigInt(N_EVENTS));
    assert.equal(handle.snapshot?.run?.runId, RUN_ID);
  });

  test("a connection that breaks mid-stream is retried like UNAVAILABLE", async () => {
    service.failures.set(0, { at: 8, drop: true });
    const handle = client.run(RUN_ID);

    assert.deepEqual(await indices(handle.events()), range(0, N_EVENTS));
    assert.deepEqual(service.calls, [call("Observe", RUN_ID, 0), call("Observe", RUN_ID, 8)]);
    assert.equal(handle.reconnects.length, 1);
  });

  test("a stream dropped before its snapshot is sent again with the same request_id", async () => {
    service.failures
      .set(0, { at: -1, code: Code.Unavailable })
      .set(1, { at: -1, code: Code.Unavailable });
    const handle = client.stream("scripted", "{}", { requestId: "req-1" });

    assert.deepEqual(await indices(handle.events()), range(0, N_EVENTS));
    assert.deepEqual(service.calls, [
      call("Stream", "req-1", 0),
      call("Stream", "req-1", 0),
      call("Stream", "req-1", 0),
    ]);
    assert.deepEqual(
      handle.reconnects.map((r) => [r.rpc, r.offset, r.attempt]),
      [
        ["Stream", 0n, 1],
        ["Stream", 0n, 2],
      ],
    );
  });

  test("a sendMessage dropped before its snapshot is sent again, same request_id, thread and policy", async () => {
    service.failures
      .set(0, { at: -1, code: Code.Unavailable })
      .set(1, { at: 5, code: Code.Unavailable });
    const handle = client.sendMessage("thread-1", "scripted", "hello", {
      busyPolicy: ThreadBusyPolicy.ENQUEUE,
    });

    assert.deepEqual(await indices(handle.events()), range(0, N_EVENTS));
    const requestId = service.calls[0]!.key;
    assert.ok(requestId, "a request_id is generated, so a retried Stream starts one run");
    assert.deepEqual(service.calls, [
      call("Stream", requestId, 0),
      call("Stream", requestId, 0),
      call("Observe", RUN_ID, 5),
    ]);
    assert.deepEqual(
      service.streams.map((r) => [r.agentId, r.input, r.requestId, r.threadId, r.busyPolicy]),
      [
        ["scripted", "hello", requestId, "thread-1", ThreadBusyPolicy.ENQUEUE],
        ["scripted", "hello", requestId, "thread-1", ThreadBusyPolicy.ENQUEUE],
      ],
    );
  });

  test("stream() sends no thread unless told, and a thread and policy when told", async () => {
    await indices(client.stream("scripted", "a").events());
    await indices(
      client
        .stream("scripted", "b", {
          threadId: "thread-1",
          busyPolicy: ThreadBusyPolicy.INTERRUPT,
          requestId: "req-4",
        })
        .events(),
    );
    assert.deepEqual(
      service.streams.map((r) => [r.input, r.threadId, r.busyPolicy]),
      [
        ["a", "", ThreadBusyPolicy.UNSPECIFIED],
        ["b", "thread-1", ThreadBusyPolicy.INTERRUPT],
      ],
    );
    assert.equal(service.streams[1]!.requestId, "req-4");
  });

  test("stream() and sendMessage() send untilIdle only when told, and again on a retry", async () => {
    service.failures.set(1, { at: -1, code: Code.Unavailable });
    await indices(client.stream("scripted", "a").events());
    await indices(client.stream("scripted", "b", { untilIdle: true }).events());
    await indices(client.sendMessage("thread-1", "scripted", "c", { untilIdle: true }).events());
    await indices(client.sendMessage("thread-1", "scripted", "d").events());
    assert.deepEqual(
      service.streams.map((r) => [r.input, r.threadId, r.untilIdle]),
      [
        ["a", "", false],
        ["b", "", true], // dropped before its snapshot: sent again, untilIdle and all
        ["b", "", true],
        ["c", "thread-1", true],
        ["d", "thread-1", false],
      ],
    );
    assert.equal(service.streams[1]!.requestId, service.streams[2]!.requestId);
  });

  test("observeRun starts at fromOffset and resumes at the next offset", async () => {
    service.failures.set(0, { at: 9, code: Code.Unavailable });

    assert.deepEqual(
      await indices(client.observeRun(RUN_ID, { fromOffset: 5 })),
      range(5, N_EVENTS),
    );
    assert.deepEqual(service.calls, [call("Observe", RUN_ID, 5), call("Observe", RUN_ID, 9)]);
  });

  test("a reader that stops resumes at the last index + 1", async () => {
    const handle = client.stream("scripted", "{}");
    for await (const event of handle.events()) {
      if (event.index === 4n) {
        break;
      }
    }
    assert.equal(handle.nextOffset, 5n);

    assert.deepEqual(await indices(handle.events()), range(5, N_EVENTS));
    assert.deepEqual(service.calls.at(-1), call("Observe", RUN_ID, 5));
  });

  for (const code of [
    Code.NotFound,
    Code.OutOfRange,
    Code.ResourceExhausted,
    Code.Internal,
    Code.Aborted,
    Code.Canceled,
  ]) {
    test(`status ${Code[code]} sent by the server is thrown at once`, async () => {
      service.failures.set(0, { at: 4, code });
      const seen: bigint[] = [];

      await assert.rejects(
        async () => {
          for await (const event of client.observeRun(RUN_ID)) {
            seen.push(event.index);
          }
        },
        (error: unknown) => error instanceof ConnectError && error.code === code,
      );
      assert.deepEqual(seen, range(0, 4));
      assert.equal(service.calls.length, 1);
    });
  }

  test("gives up after maxReconnects reconnects without progress", async () => {
    for (let i = 0; i < 10; i++) {
      service.failures.set(i, { at: -1, code: Code.Unavailable });
    }
    const limited = new KeelClient(service.target, { ...FAST, maxReconnects: 3 });
    try {
      const handle = limited.run(RUN_ID);
      await assert.rejects(
        indices(handle.events()),
        (error: unknown) => error instanceof ConnectError && error.code === Code.Unavailable,
      );
      assert.equal(service.calls.length, 4); // the first call and 3 reconnects
      assert.deepEqual(
        handle.reconnects.map((r) => r.attempt),
        [1, 2, 3],
      );
    } finally {
      limited.close();
    }
  });

  test("reconnects that bring events do not count towards the limit", async () => {
    service.failures
      .set(0, { at: 5, code: Code.Unavailable })
      .set(1, { at: 10, code: Code.Unavailable })
      .set(2, { at: 15, code: Code.Unavailable });
    const limited = new KeelClient(service.target, { ...FAST, maxReconnects: 1 });
    try {
      const handle = limited.run(RUN_ID);
      assert.deepEqual(await indices(handle.events()), range(0, N_EVENTS));
      assert.deepEqual(
        handle.reconnects.map((r) => r.offset),
        [5n, 10n, 15n],
      );
    } finally {
      limited.close();
    }
  });

  test("a gap in the indices throws instead of hiding lost events", async () => {
    service.skipIndex = 6n;
    const seen: bigint[] = [];

    await assert.rejects(
      async () => {
        for await (const event of client.observeRun(RUN_ID)) {
          seen.push(event.index);
        }
      },
      (error: unknown) =>
        error instanceof StreamContractError && /expected event 6, got 7/.test(error.message),
    );
    assert.deepEqual(seen, range(0, 6));
    assert.equal(service.calls.length, 1);
  });

  test("events() sends no request until the first next()", async () => {
    const events = client.stream("scripted", "{}").events();
    await new Promise((resolve) => setTimeout(resolve, 50));
    assert.deepEqual(service.calls, []);

    const first = await events.next();
    assert.equal(first.done, false);
    assert.equal(first.value?.index, 0n);
    assert.equal(service.calls.length, 1);
    await events.return();
  });

  test("a handle iterated twice at once refuses the second", async () => {
    const handle = client.run(RUN_ID);
    const first = handle.events();
    await first.next();
    await assert.rejects(handle.events().next(), /already being iterated/);
    await first.return();
  });

  test("aborting the signal cancels the call and throws its reason", async () => {
    service.failures.set(0, { at: 3, stall: true });
    const controller = new AbortController();
    const seen: bigint[] = [];
    const reason = new Error("enough");

    await assert.rejects(
      async () => {
        for await (const event of client.observeRun(RUN_ID, { signal: controller.signal })) {
          seen.push(event.index);
          if (event.index === 2n) {
            setTimeout(() => controller.abort(reason), 20);
          }
        }
      },
      (error: unknown) => error === reason,
    );
    assert.deepEqual(seen, range(0, 3));
    assert.equal(service.calls.length, 1);
  });

  test("aborting during the backoff wait stops at once", async () => {
    service.failures.set(0, { at: 2, code: Code.Unavailable });
    const slow = new KeelClient(service.target, { initialBackoffMs: 60_000, maxBackoffMs: 60_000 });
    const controller = new AbortController();
    try {
      const handle = slow.run(RUN_ID, {
        onReconnect: () => setTimeout(() => controller.abort("stop"), 10),
      });
      const started = Date.now();
      await assert.rejects(
        indices(handle.events({ signal: controller.signal })),
        (error: unknown) => error === "stop",
      );
      assert.ok(Date.now() - started < 5000);
      assert.equal(service.calls.length, 1);
    } finally {
      slow.close();
    }
  });

  test("a stream silent for stallTimeoutMs is reconnected", async () => {
    service.failures.set(0, { at: 6, stall: true });
    const watchful = new KeelClient(service.target, { ...FAST, stallTimeoutMs: 200 });
    try {
      const handle = watchful.run(RUN_ID);
      assert.deepEqual(await indices(handle.events()), range(0, N_EVENTS));
      assert.deepEqual(
        handle.reconnects.map((r) => [r.offset, r.code]),
        [[6n, Code.Unavailable]],
      );
      assert.match(handle.reconnects[0]!.message, /no message from the server for 200 ms/);
    } finally {
      watchful.close();
    }
  });

  test("a slow reader is not taken for a silent server", async () => {
    const watchful = new KeelClient(service.target, { ...FAST, stallTimeoutMs: 100 });
    try {
      const handle = watchful.run(RUN_ID);
      const seen: bigint[] = [];
      for await (const event of handle.events()) {
        seen.push(event.index);
        if (event.index === 2n) {
          await new Promise((resolve) => setTimeout(resolve, 300));
        }
      }
      assert.deepEqual(seen, range(0, N_EVENTS));
      assert.deepEqual(handle.reconnects, []);
    } finally {
      watchful.close();
    }
  });

  test("close() ends an open stream with ClientClosedError and refuses later calls", async () => {
    service.failures.set(0, { at: 3, stall: true });
    const events = client.observeRun(RUN_ID);
    for (let i = 0; i < 3; i++) {
      await events.next();
    }
    const pending = events.next();
    client.close();
    await assert.rejects(pending, ClientClosedError);
    await assert.rejects(client.getRun(RUN_ID), ClientClosedError);
    client.close(); // safe twice
  });
});

describe("decisions (Resume)", () => {
  test("approve sends one Decision and resolves with the stream's snapshot", async () => {
    const snapshot = await client.approve(RUN_ID, "call_1", {
      overrideArgs: { action: "deploy", n: 2 },
      requestId: "r-1",
    });

    assert.equal(snapshot.run?.runId, RUN_ID);
    assert.equal(service.resumes.length, 1);
    const request = service.resumes[0]!;
    assert.equal(request.runId, RUN_ID);
    assert.equal(request.requestId, "r-1");
    assert.equal(request.decisions.length, 1);
    const decision = request.decisions[0]!;
    assert.equal(decision.toolCallId, "call_1");
    assert.equal(decision.decision.case, "approve");
    const args =
      decision.decision.case === "approve" ? decision.decision.value.overrideArgsJson : "";
    assert.equal(args, '{"action":"deploy","n":2}');
  });

  test("deny and answer carry their message and JSON result", async () => {
    await client.deny(RUN_ID, "call_2", { message: "not today" });
    await client.answer(RUN_ID, "call_3", { ok: true, items: [1, 2] });

    const [deny, answer] = service.resumes.map((r) => r.decisions[0]!);
    assert.equal(deny!.toolCallId, "call_2");
    assert.ok(deny!.decision.case === "deny" && deny!.decision.value.message === "not today");
    assert.equal(answer!.toolCallId, "call_3");
    assert.deepEqual(answer!.decision, { case: "resultJson", value: '{"ok":true,"items":[1,2]}' });
    assert.notEqual(
      service.resumes[0]!.requestId,
      service.resumes[1]!.requestId,
      "a fresh request_id each",
    );
  });

  test("a Resume dropped before its snapshot is sent again with the same request_id", async () => {
    service.failures.set(0, { at: -1, code: Code.Unavailable }).set(1, { at: -1, drop: true });

    await client.approve(RUN_ID, "call_1");

    assert.equal(service.calls.length, 3);
    assert.ok(service.calls.every((c) => c.rpc === "Resume" && c.key === service.calls[0]!.key));
  });

  test("a refused Resume is thrown at once", async () => {
    service.failures.set(0, { at: -1, code: Code.FailedPrecondition });

    await assert.rejects(
      client.approve(RUN_ID, "call_1"),
      (error: unknown) => error instanceof ConnectError && error.code === Code.FailedPrecondition,
    );
    assert.equal(service.calls.length, 1);
  });

  test("approve refuses overrideArgs that are not a JSON object", () => {
    assert.throws(
      () => client.approve(RUN_ID, "call_1", { overrideArgs: [1] as never }),
      TypeError,
    );
  });

  test("a resume handle streams from the first event after the suspension, then resumes with Observe", async () => {
    service.resumeFrom = 10n;
    service.failures.set(0, { at: 14, code: Code.Unavailable });
    const handle = client.resume(RUN_ID, [
      { toolCallId: "call_1", decision: { case: "approve", value: {} } },
    ]);

    assert.deepEqual(await indices(handle.events()), range(10, N_EVENTS));
    assert.deepEqual(service.calls, [
      call("Resume", service.resumes[0]!.requestId, 10),
      call("Observe", RUN_ID, 14),
    ]);
  });

  test("a resume handle dropped after its snapshot but before any event sends Resume again", async () => {
    service.resumeFrom = 10n;
    service.failures.set(0, { at: 10, code: Code.Unavailable });
    const handle = client.resume(RUN_ID, [
      { toolCallId: "call_1", decision: { case: "deny", value: { message: "no" } } },
    ]);

    assert.deepEqual(await indices(handle.events()), range(10, N_EVENTS));
    assert.deepEqual(
      service.calls.map((c) => c.rpc),
      ["Resume", "Resume"],
    );
  });
});

describe("unary helpers", () => {
  test("return the proto messages and throw ConnectError", async () => {
    const started = await client.startRun("scripted", "hi", { requestId: "req-2" });
    assert.deepEqual(
      [started.agentId, started.input, started.requestId],
      ["scripted", "hi", "req-2"],
    );
    assert.equal((await client.getRun(RUN_ID)).runId, RUN_ID);
    const page = await client.listRuns({
      agentId: "scripted",
      states: [RunState.RUNNING],
      pageSize: 5,
      pageToken: "p",
    });
    assert.deepEqual(
      page.runs.map((r) => r.runId),
      [RUN_ID],
    );
    assert.equal(page.nextPageToken, `scripted|${RunState.RUNNING}||5|p`);
    const cancelled = await client.cancelRun(RUN_ID, { reason: "enough" });
    assert.deepEqual([cancelled.state, cancelled.error], [RunState.CANCELLED, "enough"]);
    assert.deepEqual(
      (await client.listAgents()).map((a) => a.agentId),
      ["scripted"],
    );
    await assert.rejects(
      client.getRun("nope"),
      (error: unknown) => error instanceof ConnectError && error.code === Code.NotFound,
    );
  });

  test("thread helpers send what they are given and return the proto messages", async () => {
    const created = await client.createThread({
      threadId: "chat-7",
      resourceId: "user-42",
      metadata: { title: "hello" },
      requestId: "req-3",
    });
    assert.deepEqual(
      [created.threadId, created.resourceId, created.metadata, created.requestId],
      ["chat-7", "user-42", { title: "hello" }, "req-3"],
    );
    assert.equal((await client.createThread()).threadId, "thread-1");
    assert.equal((await client.getThread("thread-1")).activeRunId, RUN_ID);
    await assert.rejects(
      client.getThread("nope"),
      (error: unknown) => error instanceof ConnectError && error.code === Code.NotFound,
    );
    const threads = await client.listThreads({
      resourceId: "user-42",
      pageSize: 5,
      pageToken: "p",
    });
    assert.deepEqual(
      threads.threads.map((t) => t.threadId),
      ["thread-1"],
    );
    assert.equal(threads.nextPageToken, "user-42|5|p");
    assert.equal((await client.listThreads()).nextPageToken, "|0|");
    assert.equal(await client.deleteThread("thread-1"), undefined);
    assert.deepEqual(service.deletedThreads, ["thread-1"]);
    const messages = await client.listThreadMessages("thread-1", {
      pageSize: 2,
      pageToken: "q",
      newestFirst: true,
    });
    assert.deepEqual(
      messages.messages.map((m) => m.runId),
      [RUN_ID],
    );
    assert.equal(messages.nextPageToken, "thread-1|2|q|true");
    assert.equal((await client.listThreadMessages("thread-1")).nextPageToken, "thread-1|0||false");

    const started = await client.startRun("scripted", "hi", {
      threadId: "thread-1",
      busyPolicy: ThreadBusyPolicy.ENQUEUE,
    });
    assert.equal(started.threadId, "thread-1");
    const page = await client.listRuns({ threadId: "thread-1" });
    assert.equal(page.nextPageToken, "||thread-1|0|");
  });

  test("task helpers send what they are given and return the proto messages", async () => {
    const taskId = `${RUN_ID}.0123456789abcdef`;
    const task = await client.getTask(taskId);
    assert.deepEqual([task.taskId, task.runId], [taskId, RUN_ID]);
    const page = await client.listTasks({
      runId: RUN_ID,
      agentId: "scripted",
      statuses: [TaskStatus.FAILED, TaskStatus.CANCELLED],
      pageSize: 5,
      pageToken: "p",
    });
    assert.deepEqual(
      page.tasks.map((t) => t.taskId),
      [`${RUN_ID}.0000000000000000`],
    );
    assert.equal(
      page.nextPageToken,
      `${RUN_ID}|scripted|${TaskStatus.FAILED},${TaskStatus.CANCELLED}|5|p`,
    );
    assert.equal((await client.listTasks()).nextPageToken, "|||0|");
    const cancelled = await client.cancelTask(taskId, { reason: "enough" });
    assert.deepEqual([cancelled.taskId, cancelled.error], [taskId, "enough"]);
    assert.equal((await client.cancelTask(taskId)).error, "");
    assert.equal((await client.retryTask(taskId)).taskId, taskId);

    const started = await client.startRun("scripted", "hi", { untilIdle: true });
    assert.equal(started.untilIdle, true);
    assert.equal((await client.startRun("scripted", "hi")).untilIdle, false);
  });

  test("a target without a scheme means cleartext HTTP/2", () => {
    assert.equal(new KeelClient("127.0.0.1:1").baseUrl, "http://127.0.0.1:1");
    assert.equal(new KeelClient("https://keel.example:443").baseUrl, "https://keel.example:443");
  });
});

describe("Backoff", () => {
  test("grows exponentially, is capped, and jitters within bounds", () => {
    const backoff = new Backoff({ initialMs: 100, maxMs: 1000, jitter: 0.2 });
    const delays = [
      backoff.delayMs(0, () => 0.5),
      backoff.delayMs(3, () => 0.5),
      backoff.delayMs(4, () => 0.5),
      backoff.delayMs(10_000, () => 0.5),
      backoff.delayMs(0, () => 0),
      backoff.delayMs(0, () => 1),
    ];
    assert.deepEqual(
      delays.map((ms) => Math.round(ms * 1000) / 1000),
      [100, 800, 1000, 1000, 80, 120],
    );
  });

  test("refuses nonsense", () => {
    assert.throws(() => new Backoff({ initialMs: 10, maxMs: 5 }), RangeError);
    assert.throws(() => new Backoff({ jitter: 1 }), RangeError);
    assert.throws(() => new KeelClient("127.0.0.1:1", { maxReconnects: -1 }), RangeError);
  });
});
