/**
 * The TypeScript client against real Keel servers (python -m server serve
 * over a real Redis), including servers killed and replaced mid-stream.
 *
 * Every test asserts strict contiguity: the indices the client yields are
 * exactly offset, offset + 1, ... with no gap and no duplicate.
 */
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { after, before, describe, test } from "node:test";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  KeelClient,
  RunState,
  errorInfo,
  type AgentEvent,
  type KeelClientOptions,
} from "../src/index.js";
import { Keel, Redis, stopAll } from "./processes.js";

const TEST_TIMEOUT_MS = 90_000;
const FAST: KeelClientOptions = { initialBackoffMs: 20, maxBackoffMs: 250 };

type Step = { text: number; delay_ms?: number } | { tool: string; args: Record<string, unknown> };

function script(...steps: Step[]): string {
  return JSON.stringify({ steps });
}

function assertContiguous(events: AgentEvent[], start = 0n): void {
  const indices = events.map((e) => e.index);
  const expected = indices.map((_, i) => start + BigInt(i));
  assert.deepEqual(indices, expected, "indices with a gap or a duplicate");
}

function payloads(events: AgentEvent[]): string[] {
  return events.map((e) => e.payload.case ?? "");
}

function textOf(events: AgentEvent[]): string {
  return events.map((e) => (e.payload.case === "textDelta" ? e.payload.value.delta : "")).join("");
}

function deltas(n: number): string {
  return Array.from({ length: n }, (_, i) => `t${i} `).join("");
}

function approveMe(args: Record<string, unknown>): Step {
  return { tool: "approve_me", args };
}

function toolResult(events: AgentEvent[], toolName: string) {
  const results = events.flatMap((e) =>
    e.payload.case === "toolResult" && e.payload.value.toolName === toolName
      ? [e.payload.value]
      : [],
  );
  assert.equal(results.length, 1, `expected one ${toolName} result`);
  return results[0]!;
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

async function waitForState(client: KeelClient, runId: string, state: RunState): Promise<void> {
  const deadline = Date.now() + 30_000;
  while ((await client.getRun(runId)).state !== state) {
    assert.ok(Date.now() < deadline, `run ${runId} never reached ${RunState[state]}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

let redis: Redis;

before(async () => {
  redis = await Redis.start();
});

after(async () => {
  await stopAll();
});

describe("against one server", { timeout: TEST_TIMEOUT_MS }, () => {
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

  test("stream delivers every event of a run exactly once, in order", async () => {
    const handle = client.stream(
      "scripted",
      script({ text: 30 }, { tool: "record", args: { key: "k" } }, { text: 10 }),
    );
    const events = await collect(handle.events());

    assertContiguous(events);
    assert.equal(payloads(events)[0], "start");
    assert.equal(payloads(events).at(-1), "finish");
    assert.ok(textOf(events).startsWith(deltas(40)));
    assert.equal(payloads(events).filter((p) => p === "toolResult").length, 1);
    assert.ok(handle.runId);
    const run = await client.getRun(handle.runId);
    assert.equal(run.state, RunState.SUCCEEDED);
    assert.equal(run.nextOffset, BigInt(events.length));
  });

  test("a reader that stops mid-run resumes with observeRun at the next offset", async () => {
    const handle = client.stream("scripted", script({ text: 60, delay_ms: 5 }));
    const first: AgentEvent[] = [];
    for await (const event of handle.events()) {
      first.push(event);
      if (first.length === 10) {
        break;
      }
    }
    assert.equal(handle.nextOffset, 10n);
    assert.ok(handle.runId);

    const other = new KeelClient(keel.target, FAST);
    try {
      const rest = await collect(other.observeRun(handle.runId, { fromOffset: handle.nextOffset }));
      assertContiguous([...first, ...rest]);
      assert.equal(payloads(rest).at(-1), "finish");
      assert.ok(textOf([...first, ...rest]).startsWith(deltas(60)));
    } finally {
      other.close();
    }
  });

  test("an AbortSignal drops the stream; the run goes on and is observed to its end", async () => {
    const started = await client.startRun("scripted", script({ text: 40, delay_ms: 5 }));
    const controller = new AbortController();
    const seen: AgentEvent[] = [];
    await assert.rejects(async () => {
      for await (const event of client.observeRun(started.runId, { signal: controller.signal })) {
        seen.push(event);
        if (seen.length === 5) {
          controller.abort(new Error("dropped"));
        }
      }
    }, /dropped/);

    const rest = await collect(client.observeRun(started.runId, { fromOffset: 5 }));
    assertContiguous([...seen, ...rest]);
    assert.equal(payloads(rest).at(-1), "finish");
  });

  test("errors carry the status and the ErrorInfo, and are not retried", async () => {
    const missing = "0123456789abcdef0123456789abcdef";
    await assert.rejects(client.getRun(missing), (error: unknown) => {
      assert.ok(error instanceof ConnectError && error.code === Code.NotFound);
      assert.deepEqual(errorInfo(error), {
        reason: "RUN_NOT_FOUND",
        domain: "keel.dev",
        metadata: { run_id: missing },
      });
      return true;
    });
    const handle = client.run(missing);
    await assert.rejects(
      collect(handle.events()),
      (error: unknown) => error instanceof ConnectError && error.code === Code.NotFound,
    );
    assert.deepEqual(handle.reconnects, []);

    const done = await collect(client.stream("scripted", script({ text: 3 })).events());
    const runId = done[0]!.runId;
    await assert.rejects(
      collect(client.observeRun(runId, { fromOffset: done.length + 5 })),
      (error: unknown) => {
        assert.ok(error instanceof ConnectError && error.code === Code.OutOfRange);
        const info = errorInfo(error);
        assert.equal(info?.reason, "OFFSET_BEYOND_END");
        assert.equal(info?.metadata.next_offset, String(done.length));
        return true;
      },
    );
    assert.deepEqual(await collect(client.observeRun(runId, { fromOffset: done.length })), []);
  });

  test("unary helpers: startRun is idempotent, listRuns filters, cancelRun aborts, listAgents describes", async () => {
    const requestId = randomUUID();
    const input = script({ text: 1000, delay_ms: 10 });
    const started = await client.startRun("scripted", input, { requestId });
    const again = await client.startRun("scripted", input, { requestId });
    assert.equal(again.runId, started.runId);

    const page = await client.listRuns({
      agentId: "scripted",
      states: [RunState.QUEUED, RunState.RUNNING],
      pageSize: 1000,
    });
    assert.ok(page.runs.some((run) => run.runId === started.runId));

    const watching = collect(client.observeRun(started.runId));
    await waitForState(client, started.runId, RunState.RUNNING);
    const cancelled = await client.cancelRun(started.runId, { reason: "enough" });
    const events = await watching;
    assertContiguous(events);
    assert.equal(payloads(events).at(-1), "abort");
    await waitForState(client, started.runId, RunState.CANCELLED);
    assert.ok([RunState.RUNNING, RunState.CANCELLED].includes(cancelled.state));

    const agents = await client.listAgents();
    const scripted = agents.find((agent) => agent.agentId === "scripted");
    assert.ok(scripted);
    assert.ok(scripted.tools.some((tool) => tool.name === "approve_me" && tool.requiresApproval));
  });

  test("approve on a run that waits for nothing fails at once, without retrying", async () => {
    const events = await collect(client.stream("scripted", script({ text: 2 })).events());
    await assert.rejects(client.approve(events[0]!.runId, "call_0"), (error: unknown) => {
      assert.ok(error instanceof ConnectError && error.code === Code.FailedPrecondition);
      assert.equal(errorInfo(error)?.reason, "RUN_NOT_SUSPENDED");
      return true;
    });
  });

  test("approve from inside the events() loop resumes the run the loop reads", async () => {
    const handle = client.stream(
      "scripted",
      script({ text: 5 }, approveMe({ action: "deploy" }), { text: 3 }),
    );
    const events: AgentEvent[] = [];
    for await (const event of handle.events()) {
      events.push(event);
      if (event.payload.case === "toolCallApproval") {
        const snapshot = await handle.approve(event.payload.value.toolCallId);
        assert.equal(snapshot.run?.runId, handle.runId);
      }
    }

    assertContiguous(events);
    const kinds = payloads(events);
    assert.ok(kinds.indexOf("toolCallApproval") < kinds.indexOf("suspended"));
    assert.ok(kinds.indexOf("suspended") < kinds.indexOf("resumed"));
    assert.equal(kinds.at(-1), "finish");
    const result = toolResult(events, "approve_me");
    assert.equal(result.denied, false);
    assert.deepEqual(JSON.parse(result.resultJson), { approved: true, args: { action: "deploy" } });
  });

  test("deny and overridden arguments reach the tool call", async () => {
    const denied = client.stream("scripted", script(approveMe({ action: "deploy" })));
    const deniedEvents: AgentEvent[] = [];
    for await (const event of denied.events()) {
      deniedEvents.push(event);
      if (event.payload.case === "toolCallApproval") {
        await denied.deny(event.payload.value.toolCallId, { message: "not on a Friday" });
      }
    }
    const refusal = toolResult(deniedEvents, "approve_me");
    assert.ok(refusal.denied && refusal.resultJson.includes("not on a Friday"));

    const overridden = client.stream("scripted", script(approveMe({ action: "deploy" })));
    const overriddenEvents: AgentEvent[] = [];
    for await (const event of overridden.events()) {
      overriddenEvents.push(event);
      if (event.payload.case === "toolCallApproval") {
        const overrideArgs = { action: "canary" };
        await overridden.approve(event.payload.value.toolCallId, { overrideArgs });
      }
    }
    const result = toolResult(overriddenEvents, "approve_me");
    assert.deepEqual(JSON.parse(result.resultJson).args, { action: "canary" });
  });

  test("an inbox stops at the suspension; the decision comes from elsewhere, once", async () => {
    const started = await client.startRun(
      "scripted",
      script({ text: 3 }, approveMe({ x: 1 }), { text: 2 }),
    );
    const first = await collect(client.observeRun(started.runId, { stopAtSuspend: true }));
    assert.equal(payloads(first).at(-1), "suspended");
    const run = await client.getRun(started.runId);
    assert.equal(run.state, RunState.SUSPENDED);
    const [pending] = run.pendingInterrupts;
    assert.ok(pending);

    const other = new KeelClient(keel.target, FAST);
    try {
      const requestId = randomUUID();
      await other.approve(started.runId, pending.toolCallId, { requestId });
      await other.approve(started.runId, pending.toolCallId, { requestId }); // no new effect
      await assert.rejects(
        other.deny(started.runId, pending.toolCallId, { message: "too late" }),
        (error: unknown) => error instanceof ConnectError && error.code === Code.FailedPrecondition,
      );
    } finally {
      other.close();
    }
    const rest = await collect(client.observeRun(started.runId, { fromOffset: first.length }));
    assertContiguous([...first, ...rest]);
    assert.equal(payloads(rest)[0], "resumed");
    assert.equal(payloads(rest).at(-1), "finish");
  });

  test("a resume() handle streams the run from the first event after its suspension", async () => {
    const started = await client.startRun("scripted", script(approveMe({ x: 2 }), { text: 4 }));
    const first = await collect(client.observeRun(started.runId, { stopAtSuspend: true }));
    const approvalEvent = first.find((e) => e.payload.case === "toolCallApproval");
    assert.ok(approvalEvent?.payload.case === "toolCallApproval");
    const handle = client.resume(started.runId, [
      {
        toolCallId: approvalEvent.payload.value.toolCallId,
        decision: { case: "approve", value: {} },
      },
    ]);
    const rest = await collect(handle.events());

    assertContiguous([...first, ...rest]);
    assert.equal(payloads(rest)[0], "resumed");
    assert.equal(payloads(rest).at(-1), "finish");
  });
});

describe("across server restarts", { timeout: TEST_TIMEOUT_MS }, () => {
  test("observeRun continues with no gap or duplicate after the server it reads from is SIGKILLed and replaced", async () => {
    const keyPrefix = `ts-${randomUUID()}`;
    // The run executes on `runner`; the client reads it through `front`, which
    // is killed mid-stream and replaced by a new process on the same port.
    const [runner, front] = await Promise.all([
      Keel.start({ redisUrl: redis.url, keyPrefix }),
      Keel.start({ redisUrl: redis.url, keyPrefix }),
    ]);
    const runnerClient = new KeelClient(runner.target);
    const client = new KeelClient(front.target, FAST);
    let replacement: Keel | undefined;
    try {
      // A run that would stream for minutes: the test cancels it once the
      // stream has shown live events from the replacement.
      const input = script({ text: 100_000, delay_ms: 10 });
      const run = await runnerClient.startRun("scripted", input);
      const events: AgentEvent[] = [];
      let resumedAt = -1;
      for await (const event of client.observeRun(run.runId)) {
        events.push(event);
        if (events.length === 40) {
          assert.equal(await front.kill(), -1);
          replacement = await Keel.start({ redisUrl: redis.url, keyPrefix, port: front.port });
        } else if (replacement !== undefined && resumedAt < 0) {
          resumedAt = events.length; // the first event after the restart
        } else if (resumedAt > 0 && events.length === resumedAt + 50) {
          await runnerClient.cancelRun(run.runId, { reason: "seen enough" });
        }
      }

      assertContiguous(events);
      assert.equal(payloads(events).at(-1), "abort", "the run should have been live to the end");
      const text = textOf(events);
      assert.equal(
        text,
        deltas(text.split(" ").length - 1),
        "text deltas with a gap or a duplicate",
      );
      assert.ok(events.length >= resumedAt + 50);
      const final = await runnerClient.getRun(run.runId);
      assert.equal(final.state, RunState.CANCELLED);
      assert.equal(final.nextOffset, BigInt(events.length));
    } finally {
      client.close();
      runnerClient.close();
      await Promise.all([runner.kill(), front.kill(), replacement?.kill()]);
    }
  });

  test("stream() continues with no gap or duplicate after the server running the run is SIGKILLed and replaced", async () => {
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
      const input = script(
        { text: 200, delay_ms: 10 },
        { tool: "record", args: { key: "k" } },
        { text: 100, delay_ms: 10 },
      );
      const handle = client.stream("scripted", input);
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
      const kept = effective(events);
      assert.ok(textOf(kept).startsWith(deltas(300)));
      assert.equal(payloads(kept).filter((p) => p === "toolResult").length, 1);
      assert.ok(handle.reconnects.length > 0);
      assert.ok(handle.reconnects.every((r) => r.rpc === "Observe"));
      assert.ok(handle.runId);
      const run = await client.getRun(handle.runId); // answered by the replacement
      assert.equal(run.state, RunState.SUCCEEDED);
      assert.equal(run.nextOffset, BigInt(events.length));
    } finally {
      client.close();
      await Promise.all([owner.kill(), replacement?.kill()]);
    }
  });

  test("a stream resumes on a new process after its server drains (SIGTERM) mid-run", async () => {
    const keyPrefix = `ts-${randomUUID()}`;
    const env = { KEEL_SHUTDOWN_GRACE_S: "30", KEEL_HEARTBEAT_INTERVAL_S: "0.2" };
    const first = await Keel.start({ redisUrl: redis.url, keyPrefix, env });
    const client = new KeelClient(first.target, FAST);
    let second: Keel | undefined;
    let drained: Promise<number | null> | undefined;
    try {
      const handle = client.stream("scripted", script({ text: 300, delay_ms: 10 }));
      const events: AgentEvent[] = [];
      for await (const event of handle.events()) {
        events.push(event);
        if (events.length === 40) {
          drained = first.terminate(); // it finishes the run during its grace, then exits
          second = await Keel.start({ redisUrl: redis.url, keyPrefix, env, port: first.port });
        }
      }

      assertContiguous(events);
      assert.equal(payloads(events).at(-1), "finish");
      assert.ok(textOf(events).startsWith(deltas(300)));
      assert.ok(handle.reconnects.length > 0, "the stream never moved to the new process");
      assert.equal(handle.reconnects[0]!.code, Code.Unavailable);
      assert.ok(handle.reconnects[0]!.offset >= 40n);
      assert.ok(handle.reconnects.every((r) => r.rpc === "Observe"));
      assert.equal(await drained, 0);
    } finally {
      client.close();
      await Promise.all([first.kill(), second?.kill()]);
    }
  });
});
