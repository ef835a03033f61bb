/**
 * Threads (conversations) with the TypeScript client against real Keel
 * servers (python -m server serve over a real Redis): turns that see the
 * earlier turns, the thread's messages, the busy policies, deletion, and a
 * reply that survives the server running it being SIGKILLed and replaced.
 *
 * The scripted agent's `echo_history` step streams "history=N ", N being
 * the number of user prompts the run's history held before its own.
 */
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { after, before, describe, test } from "node:test";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  KeelClient,
  MessageKind,
  type RunHandle,
  RunState,
  ThreadBusyPolicy,
  errorInfo,
  type AgentEvent,
  type KeelClientOptions,
  type ThreadMessage,
} from "../src/index.js";
import { Keel, Redis, stopAll } from "./processes.js";

const TEST_TIMEOUT_MS = 90_000;
const FAST: KeelClientOptions = { initialBackoffMs: 20, maxBackoffMs: 250 };

type Step =
  | { text: number; delay_ms?: number }
  | { echo_history: true }
  | { tool: "record"; args: { key: string } };

function script(...steps: Step[]): string {
  return JSON.stringify({ steps });
}

/** A turn that says how many earlier prompts it saw, then "t0 t1 ". */
const TURN = script({ echo_history: true }, { text: 2 });
/** A turn that keeps its thread busy for a few seconds. */
const SLOW_TEXT: Step = { text: 150, delay_ms: 20 };
const SLOW = script(SLOW_TEXT);

function payloads(events: AgentEvent[]): string[] {
  return events.map((e) => e.payload.case ?? "");
}

function textOf(events: AgentEvent[]): string {
  return events.map((e) => (e.payload.case === "textDelta" ? e.payload.value.delta : "")).join("");
}

function deltas(n: number): string {
  return Array.from({ length: n }, (_, i) => `t${i} `).join("");
}

function assertContiguous(events: AgentEvent[]): void {
  const indices = events.map((e) => e.index);
  assert.deepEqual(
    indices,
    indices.map((_, i) => BigInt(i)),
    "indices with a gap or a duplicate",
  );
}

/** The events without the partial output of superseded attempts (what a UI keeps). */
function effective(events: AgentEvent[]): AgentEvent[] {
  const dropped = new Set<bigint>();
  for (const event of events) {
    if (event.payload.case === "stepSuperseded") {
      for (let i = event.payload.value.fromIndex; i < event.index; i++) {
        dropped.add(i);
      }
    }
  }
  return events.filter((event) => !dropped.has(event.index));
}

async function collect(events: AsyncIterable<AgentEvent>): Promise<AgentEvent[]> {
  const out: AgentEvent[] = [];
  for await (const event of events) {
    out.push(event);
  }
  return out;
}

/** The user prompts of a thread's messages, in order. */
function prompts(messages: ThreadMessage[]): string[] {
  return messages.flatMap((m) =>
    m.parts.flatMap((p) => (p.part.case === "userPrompt" ? [p.part.value.text] : [])),
  );
}

/** Asserts `error` is FAILED_PRECONDITION THREAD_BUSY naming `activeRunId`. */
function isThreadBusy(error: unknown, threadId: string, activeRunId: string): boolean {
  assert.ok(error instanceof ConnectError, `expected a ConnectError, got ${String(error)}`);
  assert.equal(error.code, Code.FailedPrecondition);
  const info = errorInfo(error);
  assert.equal(info?.reason, "THREAD_BUSY");
  assert.equal(info?.metadata.active_run_id, activeRunId);
  assert.equal(info?.metadata.thread_id, threadId);
  return true;
}

let redis: Redis;

before(async () => {
  redis = await Redis.start();
});

after(async () => {
  await stopAll();
});

describe("threads on one server", { timeout: TEST_TIMEOUT_MS }, () => {
  let keel: Keel;
  let client: KeelClient;

  before(async () => {
    keel = await Keel.start({ redisUrl: redis.url, keyPrefix: `ts-${randomUUID()}` });
    client = new KeelClient(keel.target, FAST);
  });

  after(async () => {
    client.close();
    await keel.kill();
  });

  test("a three-turn conversation: each turn sees the earlier ones", async () => {
    const resourceId = `user-${randomUUID()}`;
    const thread = await client.createThread({ resourceId, metadata: { title: "three turns" } });
    assert.ok(thread.threadId);
    assert.equal(thread.resourceId, resourceId);
    assert.deepEqual(thread.metadata, { title: "three turns" });
    assert.equal(thread.messageCount, 0n);

    const runIds: string[] = [];
    const replies: string[] = [];
    for (let turn = 0; turn < 3; turn++) {
      const handle = client.sendMessage(thread.threadId, "scripted", TURN);
      const events = await collect(handle.events());
      assertContiguous(events);
      assert.equal(payloads(events).at(-1), "finish");
      assert.ok(handle.runId);
      assert.equal(handle.snapshot?.run?.threadId, thread.threadId);
      runIds.push(handle.runId);
      replies.push(textOf(events));
    }
    assert.ok(replies[0]!.startsWith(`history=0 ${deltas(2)}`), replies[0]);
    assert.ok(replies[1]!.startsWith(`history=1 ${deltas(2)}`), replies[1]);
    assert.ok(replies[2]!.includes("history=2 "), replies[2]);

    const now = await client.getThread(thread.threadId);
    assert.equal(now.messageCount, 6n);
    assert.equal(now.activeRunId, "");
    assert.deepEqual(now.queuedRunIds, []);

    const { messages, nextPageToken } = await client.listThreadMessages(thread.threadId);
    assert.equal(nextPageToken, "");
    assert.deepEqual(
      messages.map((m) => m.index),
      [0n, 1n, 2n, 3n, 4n, 5n],
    );
    assert.deepEqual(
      messages.map((m) => m.kind),
      [1, 2, 1, 2, 1, 2].map((k) => (k === 1 ? MessageKind.REQUEST : MessageKind.RESPONSE)),
    );
    assert.deepEqual(
      messages.map((m) => m.runId),
      runIds.flatMap((runId) => [runId, runId]),
    );
    assert.deepEqual(prompts(messages), [TURN, TURN, TURN]);
    for (const response of messages.filter((m) => m.kind === MessageKind.RESPONSE)) {
      const text = response.parts.flatMap((p) =>
        p.part.case === "text" ? [p.part.value.text] : [],
      );
      assert.ok(text.join("").includes(deltas(2)), `a response without its text: ${text}`);
    }

    // Newest first, in pages.
    const first = await client.listThreadMessages(thread.threadId, {
      newestFirst: true,
      pageSize: 4,
    });
    assert.deepEqual(
      first.messages.map((m) => m.index),
      [5n, 4n, 3n, 2n],
    );
    assert.ok(first.nextPageToken);
    const second = await client.listThreadMessages(thread.threadId, {
      newestFirst: true,
      pageSize: 4,
      pageToken: first.nextPageToken,
    });
    assert.deepEqual(
      second.messages.map((m) => m.index),
      [1n, 0n],
    );
    assert.equal(second.nextPageToken, "");

    // The thread's runs, and the owner's threads.
    const runs = await client.listRuns({ threadId: thread.threadId });
    assert.deepEqual(
      runs.runs.map((r) => r.runId),
      [...runIds].reverse(),
    );
    assert.ok(runs.runs.every((r) => r.threadId === thread.threadId));
    const other = await client.createThread({ resourceId });
    const threads = await client.listThreads({ resourceId });
    assert.deepEqual(
      threads.threads.map((t) => t.threadId),
      [other.threadId, thread.threadId],
    );
  });

  test("createThread is idempotent by requestId and refuses a taken threadId", async () => {
    const requestId = randomUUID();
    const first = await client.createThread({ requestId, metadata: { a: "1" } });
    const again = await client.createThread({ requestId, metadata: { a: "1" } });
    assert.equal(again.threadId, first.threadId);
    assert.equal(again.requestId, requestId);

    const threadId = `chat-${randomUUID()}`;
    assert.equal((await client.createThread({ threadId })).threadId, threadId);
    await assert.rejects(client.createThread({ threadId }), (error: unknown) => {
      assert.ok(error instanceof ConnectError && error.code === Code.AlreadyExists);
      assert.equal(errorInfo(error)?.reason, "THREAD_ALREADY_EXISTS");
      return true;
    });
  });

  test("REJECT on a busy thread fails with THREAD_BUSY and the active run; ENQUEUE waits its turn", async () => {
    const { threadId } = await client.createThread();
    const slow = await client.startRun("scripted", SLOW, { threadId });
    assert.equal(slow.threadId, threadId);

    // REJECT, the default, and said explicitly; from stream() and startRun().
    const rejected = client.sendMessage(threadId, "scripted", TURN);
    await assert.rejects(collect(rejected.events()), (error) =>
      isThreadBusy(error, threadId, slow.runId),
    );
    assert.deepEqual(rejected.reconnects, [], "a refusal is an answer, not a retry");
    await assert.rejects(
      client.startRun("scripted", TURN, { threadId, busyPolicy: ThreadBusyPolicy.REJECT }),
      (error) => isThreadBusy(error, threadId, slow.runId),
    );
    // A busy thread cannot be deleted either.
    await assert.rejects(client.deleteThread(threadId), (error) =>
      isThreadBusy(error, threadId, slow.runId),
    );

    // ENQUEUE: streams a QUEUED snapshot, then the run once the slow one ended.
    const queued = client.sendMessage(threadId, "scripted", TURN, {
      busyPolicy: ThreadBusyPolicy.ENQUEUE,
    });
    const events: AgentEvent[] = [];
    for await (const event of queued.events()) {
      if (events.length === 0) {
        assert.equal(queued.snapshot?.run?.state, RunState.QUEUED);
        assert.equal((await client.getRun(slow.runId)).state, RunState.SUCCEEDED);
      }
      events.push(event);
    }
    assertContiguous(events);
    assert.equal(payloads(events).at(-1), "finish");
    assert.ok(textOf(events).startsWith(`history=1 ${deltas(2)}`), textOf(events));

    const thread = await client.getThread(threadId);
    assert.equal(thread.messageCount, 4n);
    assert.equal(thread.activeRunId, "");
    const { messages } = await client.listThreadMessages(threadId);
    assert.deepEqual(
      messages.map((m) => m.runId),
      [slow.runId, slow.runId, queued.runId, queued.runId],
    );
  });

  test("a sendMessage sent again with its requestId attaches to its run, even on the busy thread", async () => {
    // What the handle's own retry of a Stream that dropped before its snapshot does.
    const { threadId } = await client.createThread();
    const requestId = randomUUID();
    const slow = await client.startRun("scripted", SLOW, { threadId, requestId });
    const again = client.sendMessage(threadId, "scripted", SLOW, { requestId });
    const events = await collect(again.events());
    assert.equal(again.runId, slow.runId);
    assertContiguous(events);
    assert.equal(payloads(events).at(-1), "finish");
    const { messages } = await client.listThreadMessages(threadId);
    assert.deepEqual(prompts(messages), [SLOW]);
  });

  test("ENQUEUE with startRun: the thread lists the waiting run until its turn", async () => {
    const { threadId } = await client.createThread();
    const slow = await client.startRun("scripted", SLOW, { threadId });
    const queued = await client.startRun("scripted", TURN, {
      threadId,
      busyPolicy: ThreadBusyPolicy.ENQUEUE,
    });
    assert.equal(queued.state, RunState.QUEUED);
    const busy = await client.getThread(threadId);
    assert.equal(busy.activeRunId, slow.runId);
    assert.deepEqual(busy.queuedRunIds, [queued.runId]);

    const events = await collect(client.observeRun(queued.runId));
    assert.equal(payloads(events).at(-1), "finish");
    assert.ok(textOf(events).startsWith("history=1 "), textOf(events));
    assert.equal((await client.getRun(slow.runId)).state, RunState.SUCCEEDED);
  });

  test("INTERRUPT cancels the active run and keeps its completed steps; ROLLBACK keeps none", async () => {
    // One completed step (a tool call and its result), then a long reply.
    const interrupted = script({ tool: "record", args: { key: "k" } }, SLOW_TEXT);
    for (const busyPolicy of [ThreadBusyPolicy.INTERRUPT, ThreadBusyPolicy.ROLLBACK]) {
      const { threadId } = await client.createThread();
      const slow = client.sendMessage(threadId, "scripted", interrupted);
      const slowEvents: AgentEvent[] = [];
      let next: RunHandle | undefined;
      let nextEvents: Promise<AgentEvent[]> | undefined;
      for await (const event of slow.events()) {
        slowEvents.push(event);
        if (next === undefined && textOf(slowEvents).includes("t5 ")) {
          next = client.sendMessage(threadId, "scripted", TURN, { busyPolicy });
          nextEvents = collect(next.events());
        }
      }
      assert.ok(next !== undefined && nextEvents !== undefined);
      const reply = await nextEvents;
      const abort = slowEvents.at(-1)?.payload;
      assert.ok(abort?.case === "abort", `the interrupted run ended with ${abort?.case}`);
      assert.equal(abort.value.interruptedByRunId, next.runId);
      assert.equal(abort.value.rolledBack, busyPolicy === ThreadBusyPolicy.ROLLBACK);
      assert.ok(slow.runId);
      assert.equal((await client.getRun(slow.runId)).state, RunState.CANCELLED);
      assert.equal(payloads(reply).at(-1), "finish");

      const { messages } = await client.listThreadMessages(threadId);
      const fromSlow = messages.filter((m) => m.runId === slow.runId);
      if (busyPolicy === ThreadBusyPolicy.ROLLBACK) {
        assert.ok(textOf(reply).startsWith("history=0 "), textOf(reply));
        assert.deepEqual(fromSlow, []);
        assert.deepEqual(prompts(messages), [TURN]);
      } else {
        // The completed step stays in the thread (the prompt, the tool call
        // and its result), so the next turn sees the interrupted prompt.
        assert.ok(textOf(reply).startsWith("history=1 "), textOf(reply));
        assert.deepEqual(
          fromSlow.map((m) => m.parts.map((p) => p.part.case)),
          [["userPrompt"], ["toolCall"], ["toolResult"]],
        );
        assert.deepEqual(prompts(messages), [interrupted, TURN]);
      }
    }
  });

  test("deleteThread: the thread is gone, its runs stay", async () => {
    const { threadId } = await client.createThread();
    const handle = client.sendMessage(threadId, "scripted", TURN);
    await collect(handle.events());
    await client.deleteThread(threadId);

    const notFound = (error: unknown): boolean => {
      assert.ok(error instanceof ConnectError && error.code === Code.NotFound);
      assert.deepEqual(errorInfo(error)?.reason, "THREAD_NOT_FOUND");
      assert.equal(errorInfo(error)?.metadata.thread_id, threadId);
      return true;
    };
    await assert.rejects(client.getThread(threadId), notFound);
    await assert.rejects(client.listThreadMessages(threadId), notFound);
    await assert.rejects(client.deleteThread(threadId), notFound);
    const late = client.sendMessage(threadId, "scripted", TURN);
    await assert.rejects(collect(late.events()), notFound);
    assert.deepEqual(late.reconnects, []);
    assert.ok(handle.runId);
    assert.equal((await client.getRun(handle.runId)).state, RunState.SUCCEEDED);
  });
});

describe("threads across server restarts", { timeout: TEST_TIMEOUT_MS }, () => {
  test("a sendMessage reply continues with no gap or duplicate after the server running it is SIGKILLed and replaced", async () => {
    const keyPrefix = `ts-${randomUUID()}`;
    // Short leases: the replacement takes the dead owner's run over within a second or so.
    const env = {
      KEEL_LEASE_TTL_S: "1.0",
      KEEL_SWEEP_INTERVAL_S: "0.2",
      KEEL_HEARTBEAT_INTERVAL_S: "0.2",
    };
    const owner = await Keel.start({ redisUrl: redis.url, keyPrefix, env });
    const client = new KeelClient(owner.target, FAST);
    let replacement: Keel | undefined;
    try {
      const { threadId } = await client.createThread();
      const firstTurn = client.sendMessage(threadId, "scripted", TURN);
      await collect(firstTurn.events());

      const input = script({ echo_history: true }, { text: 200, delay_ms: 10 });
      const handle = client.sendMessage(threadId, "scripted", input);
      const events: AgentEvent[] = [];
      for await (const event of handle.events()) {
        events.push(event);
        if (events.length === 40) {
          assert.equal(await owner.kill(), -1);
          replacement = await Keel.start({ redisUrl: redis.url, keyPrefix, env, port: owner.port });
        }
      }

      assertContiguous(events);
      assert.equal(payloads(events).at(-1), "finish");
      assert.ok(payloads(events).includes("stepSuperseded"), "the run was not taken over");
      assert.ok(textOf(effective(events)).startsWith(`history=1 ${deltas(200)}`));
      assert.ok(handle.reconnects.length > 0);
      assert.ok(handle.reconnects.every((r) => r.rpc === "Observe"));

      // The reply joined the thread once, with the history it started from.
      const thread = await client.getThread(threadId); // answered by the replacement
      assert.equal(thread.activeRunId, "");
      assert.equal(thread.messageCount, 4n);
      const { messages } = await client.listThreadMessages(threadId);
      assert.deepEqual(
        messages.map((m) => [m.runId, m.kind]),
        [
          [firstTurn.runId, MessageKind.REQUEST],
          [firstTurn.runId, MessageKind.RESPONSE],
          [handle.runId, MessageKind.REQUEST],
          [handle.runId, MessageKind.RESPONSE],
        ],
      );
      assert.deepEqual(prompts(messages), [TURN, input]);
    } finally {
      client.close();
      await Promise.all([owner.kill(), replacement?.kill()]);
    }
  });
});
