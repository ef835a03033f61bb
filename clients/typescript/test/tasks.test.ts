/**
 * Background tasks with the TypeScript client against a real Keel server
 * (python -m server serve over a real Redis): a run with untilIdle that
 * waits for its task and streams the task's life, the task helpers, and the
 * errors they answer with.
 *
 * The scripted agent's `slow` step calls a background tool: its task sleeps
 * duration_ms, reports progress 0.5 halfway, fails its first fail_times
 * attempts (3 retries) and returns a count. A run with untilIdle gives the
 * task's outcome to the model, which answers "got [task <id>] slow
 * completed: 1 ", then "done".
 */
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { after, before, describe, test } from "node:test";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  KeelClient,
  RunState,
  TaskStatus,
  errorInfo,
  type AgentEvent,
  type KeelClientOptions,
  type Task,
  type TaskUpdate,
} from "../src/index.js";
import { Keel, Redis, stopAll } from "./processes.js";

const TEST_TIMEOUT_MS = 90_000;
const FAST: KeelClientOptions = { initialBackoffMs: 20, maxBackoffMs: 250 };
const UNKNOWN_TASK = "0123456789abcdef0123456789abcdef.0123456789abcdef";
/** A task that runs until it is cancelled, as far as a test is concerned. */
const LONG_MS = 20_000;

function slow(key: string, durationMs: number, failTimes = 0): string {
  const args = { key, duration_ms: durationMs, fail_times: failTimes };
  return JSON.stringify({ steps: [{ tool: "slow", args }, { text: 1 }] });
}

function payloads(events: AgentEvent[]): string[] {
  return events.map((e) => e.payload.case ?? "");
}

function textOf(events: AgentEvent[]): string {
  return events.map((e) => (e.payload.case === "textDelta" ? e.payload.value.delta : "")).join("");
}

function updates(events: AgentEvent[]): TaskUpdate[] {
  return events.flatMap((e) => (e.payload.case === "task" ? [e.payload.value] : []));
}

function assertContiguous(events: AgentEvent[]): void {
  const indices = events.map((e) => e.index);
  assert.deepEqual(
    indices,
    indices.map((_, i) => BigInt(i)),
    "indices with a gap or a duplicate",
  );
}

async function collect(events: AsyncIterable<AgentEvent>): Promise<AgentEvent[]> {
  const out: AgentEvent[] = [];
  for await (const event of events) {
    out.push(event);
  }
  return out;
}

/** Polls `check` until it returns a value, for at most 15 s. */
async function eventually<T>(what: string, check: () => Promise<T | undefined>): Promise<T> {
  const deadline = Date.now() + 15_000;
  for (;;) {
    const value = await check();
    if (value !== undefined) {
      return value;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out waiting for ${what}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

let redis: Redis;

before(async () => {
  redis = await Redis.start();
});

after(async () => {
  await stopAll();
});

describe("background tasks on a real server", { timeout: TEST_TIMEOUT_MS }, () => {
  let keel: Keel;
  let client: KeelClient;

  before(async () => {
    keel = await Keel.start({
      redisUrl: redis.url,
      keyPrefix: `ts-${randomUUID()}`,
      env: { KEEL_TASKS_RETRY_BACKOFF_S: "0.05" }, // a failed attempt is tried again at once
    });
    client = new KeelClient(keel.target, FAST);
  });

  after(async () => {
    client.close();
    await keel.kill();
  });

  test("a run with untilIdle streams its task up to COMPLETED before finish; getTask shows it", async () => {
    const handle = client.stream("scripted", slow("a", 300, 1), { untilIdle: true });
    const events = await collect(handle.events());
    assertContiguous(events);
    assert.ok(handle.runId);
    assert.equal(handle.snapshot?.run?.untilIdle, true);

    const kinds = payloads(events);
    assert.equal(kinds.at(-1), "finish");
    const lives = updates(events);
    assert.deepEqual(
      lives.map((u) => TaskStatus[u.status]),
      ["QUEUED", "STARTED", "PROGRESS", "RETRYING", "STARTED", "PROGRESS", "COMPLETED"],
    );
    const taskId = lives[0]!.taskId;
    assert.match(taskId, new RegExp(`^${handle.runId}\\.[0-9a-f]{16}$`));
    assert.ok(lives.every((u) => u.taskId === taskId && u.name === "slow"));
    const completed = events.find(
      (e) => e.payload.case === "task" && e.payload.value.status === TaskStatus.COMPLETED,
    );
    assert.ok(completed !== undefined && completed.payload.case === "task");
    assert.ok(completed.index < events.at(-1)!.index, "COMPLETED after finish");
    assert.equal(completed.payload.value.resultJson, "1");
    assert.equal(completed.payload.value.attempt, 2);
    // The run waited: the model was given the task's result before it finished.
    assert.ok(
      textOf(events).endsWith(`got [task ${taskId}] slow completed: 1 done`),
      textOf(events),
    );

    const task = await client.getTask(taskId);
    assert.deepEqual(
      [task.taskId, task.runId, task.agentId, task.toolName, task.status],
      [taskId, handle.runId, "scripted", "slow", TaskStatus.COMPLETED],
    );
    assert.deepEqual([task.resultJson, task.error, task.attempt, task.maxRetries], ["1", "", 2, 3]);
    assert.equal(JSON.parse(task.argsJson).key, "a");
    const run = await client.getRun(handle.runId);
    assert.deepEqual([run.state, run.untilIdle], [RunState.SUCCEEDED, true]);

    const page = await client.listTasks({ runId: handle.runId });
    assert.deepEqual(
      page.tasks.map((t) => [t.taskId, t.status]),
      [[taskId, TaskStatus.COMPLETED]],
    );
    assert.equal(page.nextPageToken, "");
    const pending = await client.listTasks({
      runId: handle.runId,
      statuses: [TaskStatus.QUEUED, TaskStatus.STARTED],
    });
    assert.deepEqual(pending.tasks, []);

    // A completed task is not run again; cancelling it changes nothing.
    await assert.rejects(client.retryTask(taskId), (error: unknown) => {
      assert.ok(error instanceof ConnectError, String(error));
      assert.equal(error.code, Code.FailedPrecondition);
      assert.equal(errorInfo(error)?.reason, "TASK_NOT_RETRYABLE");
      assert.equal(errorInfo(error)?.metadata.task_id, taskId);
      return true;
    });
    assert.equal(
      (await client.cancelTask(taskId, { reason: "too late" })).status,
      TaskStatus.COMPLETED,
    );
  });

  test("cancelTask ends a long task CANCELLED on its run's stream; retryTask queues it again", async () => {
    const run = await client.startRun("scripted", slow("b", LONG_MS), { untilIdle: true });
    assert.equal(run.untilIdle, true);
    const started = await eventually("the long task to start", async () => {
      const page = await client.listTasks({ runId: run.runId, statuses: [TaskStatus.STARTED] });
      return page.tasks[0];
    });
    await client.cancelTask(started.taskId, { reason: "enough" });
    const isCancelled = async (): Promise<Task | undefined> => {
      const task = await client.getTask(started.taskId);
      return task.status === TaskStatus.CANCELLED ? task : undefined;
    };
    const cancelled = await eventually("the task to end CANCELLED", isCancelled);
    assert.equal(cancelled.error, "enough");

    // The run waited for its task, so the cancellation is on its stream and reached the model.
    const events = await collect(client.observeRun(run.runId));
    assertContiguous(events);
    assert.equal(payloads(events).at(-1), "finish");
    const last = updates(events).at(-1);
    assert.deepEqual([last?.status, last?.message], [TaskStatus.CANCELLED, "enough"]);
    assert.ok(textOf(events).includes(`got [task ${started.taskId}] slow cancelled: enough `));

    // Retried: the same task, QUEUED again; cancelled again so the test ends quickly.
    const retried = await client.retryTask(started.taskId);
    assert.deepEqual([retried.taskId, retried.status], [started.taskId, TaskStatus.QUEUED]);
    await client.cancelTask(started.taskId, { reason: "again" });
    const again = await eventually("the retried task to end CANCELLED", isCancelled);
    assert.equal(again.error, "again");
  });

  test("a sendMessage turn with untilIdle waits for its task", async () => {
    const { threadId } = await client.createThread();
    const turn = client.sendMessage(threadId, "scripted", slow("c", 100), { untilIdle: true });
    const events = await collect(turn.events());
    assert.equal(payloads(events).at(-1), "finish");
    assert.equal(updates(events).at(-1)?.status, TaskStatus.COMPLETED);
    assert.ok(textOf(events).includes("slow completed: 1 "), textOf(events));
  });

  test("an unknown task is NOT_FOUND (TASK_NOT_FOUND)", async () => {
    const notFound = (error: unknown): boolean => {
      assert.ok(error instanceof ConnectError, String(error));
      assert.equal(error.code, Code.NotFound);
      assert.equal(errorInfo(error)?.reason, "TASK_NOT_FOUND");
      assert.equal(errorInfo(error)?.metadata.task_id, UNKNOWN_TASK);
      return true;
    };
    await assert.rejects(client.getTask(UNKNOWN_TASK), notFound);
    await assert.rejects(client.cancelTask(UNKNOWN_TASK), notFound);
    await assert.rejects(client.retryTask(UNKNOWN_TASK), notFound);
    await assert.rejects(
      client.getTask("not a task id"),
      (error: unknown) => error instanceof ConnectError && error.code === Code.InvalidArgument,
    );
  });
});
