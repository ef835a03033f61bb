/**
 * Schedules and goals with the TypeScript client against a real Keel server
 * (python -m server serve over a real Redis): creating, reading, listing,
 * changing (each field the update mask may name), pausing, resuming,
 * triggering and deleting schedules; a schedule every second that fires by
 * itself; runs with a goal that stream the judge's verdicts.
 *
 * A six-field cron has a leading seconds field, so "* * * * * *" fires every
 * second. The scripted agent's `"satisfy_on": K` makes the K-th attempt of a
 * run with a goal say "DONE", which the judge `scripted-judge` accepts.
 * Waits for the server poll with generous bounds, never a fixed sleep.
 */
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { after, before, describe, test } from "node:test";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  KeelClient,
  RunState,
  ScheduleFiringOutcome,
  ScheduleOverlapPolicy,
  ScheduleThreadMode,
  errorInfo,
  type AgentEvent,
  type GoalEvaluated,
  type GoalInit,
  type KeelClientOptions,
  type Run,
  type Schedule,
  type ScheduleChanges,
  type ScheduleFiring,
} from "../src/index.js";
import { Keel, Redis, stopAll } from "./processes.js";

const TEST_TIMEOUT_MS = 120_000;
const FAST: KeelClientOptions = { initialBackoffMs: 20, maxBackoffMs: 250 };
const EVERY_SECOND = "* * * * * *";
const WEEKDAYS_AT_9 = "0 9 * * 1-5";
const PARIS = "Europe/Paris";
const JUDGE = "scripted-judge";
const TWO = JSON.stringify({ steps: [{ text: 2 }] }); // says "t0 t1 done"
const DEFAULT_WINDOW_S = 365n * 24n * 3600n;
/** A "* * * * * *" schedule fires within about a second; a loaded machine is slower. */
const FIRE_WAIT_MS = 30_000;

const GOAL = { objective: "x", judgeAgentId: JUDGE, maxAttempts: 3 } satisfies GoalInit;

/** One line of text per attempt; attempt `satisfyOn` says DONE. */
function goalScript(satisfyOn: number): string {
  return JSON.stringify({ steps: [{ text: 1 }], satisfy_on: satisfyOn });
}

function payloads(events: AgentEvent[]): string[] {
  return events.map((e) => e.payload.case ?? "");
}

function verdicts(events: AgentEvent[]): GoalEvaluated[] {
  return events.flatMap((e) => (e.payload.case === "goalEvaluated" ? [e.payload.value] : []));
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

/** Polls `check` until it returns a value, for at most `timeoutMs`. */
async function eventually<T>(
  what: string,
  check: () => Promise<T | undefined>,
  timeoutMs = 15_000,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
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

/** The events of a goalScript(2) run with GOAL: judged twice, met the second time. */
function assertGoalMetOnAttempt2(events: AgentEvent[]): void {
  assertContiguous(events);
  assert.deepEqual(
    verdicts(events).map((v) => [v.attempt, v.satisfied, v.maxAttempts]),
    [
      [1, false, 3],
      [2, true, 3],
    ],
  );
  assert.deepEqual(payloads(events).slice(-2), ["goalEvaluated", "finish"]);
  const finish = events.at(-1)!.payload;
  assert.ok(finish.case === "finish");
  assert.equal(finish.value.goalMet, true);
  assert.equal(finish.value.outputText, "done DONE");
}

function assertGoalRun(run: Run): void {
  assert.equal(run.state, RunState.SUCCEEDED);
  assert.deepEqual(
    [run.goal?.objective, run.goal?.judgeAgentId, run.goal?.maxAttempts],
    ["x", JUDGE, 3],
  );
  assert.deepEqual([run.goalMet, run.goalAttempts], [true, 2]);
}

/** "Mon 09:00"-like renderings of the schedule's next fire times in `zone`. */
function localTimes(schedule: Schedule, zone: string): string[] {
  const format = new Intl.DateTimeFormat("en-GB", {
    timeZone: zone,
    weekday: "short",
    hour: "2-digit",
    minute: "2-digit",
    second: "2-digit",
    hourCycle: "h23",
  });
  return schedule.nextFireTimes.map((t) => format.format(new Date(Number(t.seconds) * 1000)));
}

function windowMs(schedule: Schedule): number {
  const window = schedule.catchUpWindow;
  return Number(window?.seconds ?? 0n) * 1000 + (window?.nanos ?? 0) / 1e6;
}

function rejectsWith(code: Code, reason?: string): (error: unknown) => boolean {
  return (error: unknown) => {
    assert.ok(error instanceof ConnectError, String(error));
    assert.equal(error.code, code, error.message);
    if (reason !== undefined) {
      assert.equal(errorInfo(error)?.reason, reason);
    }
    return true;
  };
}

let redis: Redis;

before(async () => {
  redis = await Redis.start();
});

after(async () => {
  await stopAll();
});

describe("schedules and goals on a real server", { timeout: TEST_TIMEOUT_MS }, () => {
  let keel: Keel;
  let client: KeelClient;

  /** The run, read to its end: its events are whole and it finished. */
  async function ended(runId: string): Promise<Run> {
    const events = await collect(client.observeRun(runId));
    assertContiguous(events);
    assert.equal(payloads(events).at(-1), "finish");
    return client.getRun(runId);
  }

  before(async () => {
    keel = await Keel.start({ redisUrl: redis.url, keyPrefix: `ts-${randomUUID()}` });
    client = new KeelClient(keel.target, FAST);
  });

  after(async () => {
    client.close();
    await keel.kill();
  });

  test("createSchedule, getSchedule, updateSchedule of each field, pause, resume, list, delete", async () => {
    const created = await client.createSchedule("scripted", WEEKDAYS_AT_9, TWO, {
      timezone: PARIS,
      scheduleId: "ts-reports",
      catchUpWindowMs: 90_000,
      paused: true,
      goal: GOAL,
    });
    assert.deepEqual(
      [created.scheduleId, created.agentId, created.cron, created.timezone, created.input],
      ["ts-reports", "scripted", WEEKDAYS_AT_9, PARIS, TWO],
    );
    // UNSPECIFIED means THREADLESS and SKIP; the server says which.
    assert.equal(created.threadMode, ScheduleThreadMode.THREADLESS);
    assert.equal(created.overlapPolicy, ScheduleOverlapPolicy.SKIP);
    assert.equal(windowMs(created), 90_000);
    assert.equal(created.paused, true);
    assert.deepEqual(created.nextFireTimes, []);
    assert.equal(created.goal?.judgeAgentId, JUDGE);

    const got = await client.getSchedule("ts-reports");
    assert.deepEqual([got.cron, got.paused, got.recentFirings], [WEEKDAYS_AT_9, true, []]);

    // Resumed: the next ticks are weekdays at 09:00 in Paris.
    const resumed = await client.resumeSchedule("ts-reports");
    assert.equal(resumed.paused, false);
    const times = localTimes(resumed, PARIS);
    assert.equal(times.length, 5);
    for (const time of times) {
      assert.match(time, /^(Mon|Tue|Wed|Thu|Fri),? 09:00:00$/);
    }

    // Only the fields given change: the mask names cron and input, nothing else.
    const input = JSON.stringify({ steps: [{ text: 1 }] });
    const changed = await client.updateSchedule("ts-reports", { cron: "30 7 * * *", input });
    assert.deepEqual([changed.cron, changed.input, changed.timezone], ["30 7 * * *", input, PARIS]);
    assert.equal(windowMs(changed), 90_000);
    assert.equal(changed.goal?.objective, "x");
    assert.equal(changed.paused, false);
    for (const time of localTimes(changed, PARIS)) {
      assert.match(time, /07:30:00$/);
    }

    // null clears the goal and restores the default catch-up window.
    const cleared = await client.updateSchedule("ts-reports", {
      goal: null,
      catchUpWindowMs: null,
    });
    assert.equal(cleared.goal, undefined);
    assert.equal(cleared.catchUpWindow?.seconds, DEFAULT_WINDOW_S);
    assert.equal(cleared.cron, "30 7 * * *");

    // Every other path of the mask, in camelCase here and snake_case on the wire.
    const every: Required<ScheduleChanges> = {
      agentId: "scripted",
      cron: "15 6 * * *",
      timezone: "UTC",
      input: TWO,
      overlapPolicy: ScheduleOverlapPolicy.ALLOW,
      catchUpWindowMs: 2_500,
      paused: true,
      goal: GOAL,
    };
    const all = await client.updateSchedule("ts-reports", every);
    assert.deepEqual(
      [all.agentId, all.cron, all.timezone, all.input, all.overlapPolicy, all.paused],
      ["scripted", "15 6 * * *", "UTC", TWO, ScheduleOverlapPolicy.ALLOW, true],
    );
    assert.equal(windowMs(all), 2_500);
    assert.equal(all.goal?.maxAttempts, 3);
    assert.deepEqual(all.nextFireTimes, []); // paused

    const unpaused = await client.updateSchedule("ts-reports", { paused: false });
    assert.deepEqual(
      localTimes(unpaused, "UTC").map((t) => t.slice(-8)),
      Array(5).fill("06:15:00"),
    );
    const paused = await client.pauseSchedule("ts-reports");
    assert.deepEqual([paused.paused, paused.nextFireTimes, paused.cron], [true, [], "15 6 * * *"]);

    // Listed by agent, newest first, page by page.
    await client.createSchedule("scripted", "@daily", TWO, {
      scheduleId: "ts-second",
      paused: true,
    });
    await client.createSchedule("scripted", "@hourly", TWO, {
      scheduleId: "ts-third",
      paused: true,
    });
    const first = await client.listSchedules({ agentId: "scripted", pageSize: 2 });
    assert.deepEqual(
      first.schedules.map((s) => s.scheduleId),
      ["ts-third", "ts-second"],
    );
    assert.ok(first.nextPageToken);
    const next = await client.listSchedules({
      agentId: "scripted",
      pageSize: 2,
      pageToken: first.nextPageToken,
    });
    assert.equal(next.schedules[0]?.scheduleId, "ts-reports");
    assert.deepEqual((await client.listSchedules({ agentId: JUDGE })).schedules, []);

    for (const id of ["ts-reports", "ts-second", "ts-third"]) {
      await client.deleteSchedule(id);
    }
    await assert.rejects(
      client.getSchedule("ts-reports"),
      rejectsWith(Code.NotFound, "SCHEDULE_NOT_FOUND"),
    );
  });

  test("a schedule every second fires by itself; listRuns({ scheduleId }) lists its runs", async () => {
    const schedule = await client.createSchedule("scripted", EVERY_SECOND, TWO);
    try {
      assert.equal(schedule.paused, false);
      const ticks = schedule.nextFireTimes.map((t) => Number(t.seconds));
      assert.deepEqual(
        ticks.slice(1).map((t, i) => t - ticks[i]!),
        [1, 1, 1, 1],
      );
      const firing = await eventually(
        "a tick to start a run",
        async (): Promise<ScheduleFiring | undefined> => {
          const now = await client.getSchedule(schedule.scheduleId);
          return now.recentFirings.find((f) => f.outcome === ScheduleFiringOutcome.STARTED);
        },
        FIRE_WAIT_MS,
      );
      assert.ok(firing.runId);
      const run = await ended(firing.runId);
      assert.deepEqual(
        [run.scheduleId, run.input, run.state],
        [schedule.scheduleId, TWO, RunState.SUCCEEDED],
      );

      // Paused: no next tick. Every run a recorded firing started is listed by the
      // schedule (a firing is recorded after its run started, so read them first).
      const paused = await client.pauseSchedule(schedule.scheduleId);
      assert.deepEqual([paused.paused, paused.nextFireTimes], [true, []]);
      const { firings } = await client.listScheduleRuns(schedule.scheduleId);
      const startedIds = firings
        .filter((f) => f.outcome === ScheduleFiringOutcome.STARTED)
        .map((f) => f.runId);
      assert.ok(startedIds.includes(firing.runId));
      const { runs } = await client.listRuns({ scheduleId: schedule.scheduleId });
      const listed = new Set(runs.map((r) => r.runId));
      assert.ok(
        startedIds.every((id) => listed.has(id)),
        `${startedIds} not all in ${[...listed]}`,
      );
      assert.ok(runs.every((r) => r.scheduleId === schedule.scheduleId));
    } finally {
      await client.deleteSchedule(schedule.scheduleId);
    }
  });

  test("triggerSchedule fires a paused schedule now, once per requestId; listScheduleRuns pages", async () => {
    const schedule = await client.createSchedule("scripted", "@yearly", TWO, { paused: true });
    const id = schedule.scheduleId;
    assert.ok(id);

    const fired = await client.triggerSchedule(id, { requestId: "first" });
    assert.equal(fired.firing?.outcome, ScheduleFiringOutcome.TRIGGERED);
    assert.equal(fired.firing?.runId, fired.run?.runId);
    assert.equal(fired.run?.scheduleId, id);
    assert.ok(fired.run?.threadId, "a THREADLESS firing runs on a fresh thread");
    const again = await client.triggerSchedule(id, { requestId: "first" });
    assert.equal(again.run?.runId, fired.run?.runId);
    await ended(fired.run!.runId);

    const runIds = [fired.run!.runId];
    for (let i = 0; i < 2; i++) {
      const { run } = await client.triggerSchedule(id);
      await ended(run!.runId);
      runIds.push(run!.runId);
    }
    assert.equal(new Set(runIds).size, 3);

    const first = await client.listScheduleRuns(id, { pageSize: 2 });
    assert.ok(first.nextPageToken);
    const rest = await client.listScheduleRuns(id, { pageSize: 2, pageToken: first.nextPageToken });
    assert.equal(rest.nextPageToken, "");
    const firings = [...first.firings, ...rest.firings];
    assert.deepEqual(
      firings.map((f) => [f.outcome, f.runId]),
      [...runIds].reverse().map((runId) => [ScheduleFiringOutcome.TRIGGERED, runId]),
    );
    const got = await client.getSchedule(id);
    assert.deepEqual([got.paused, got.lastRunId], [true, runIds.at(-1)]);

    await client.startRun("scripted", TWO); // not the schedule's
    const { runs } = await client.listRuns({ scheduleId: id });
    assert.deepEqual(
      runs.map((r) => r.runId),
      [...runIds].reverse(),
    );

    await client.deleteSchedule(id);
    assert.equal((await client.getRun(runIds[0]!)).state, RunState.SUCCEEDED); // its runs stay
  });

  test("a run with a goal streams goalEvaluated and finishes with goalMet", async () => {
    const handle = client.stream("scripted", goalScript(2), { goal: GOAL });
    assertGoalMetOnAttempt2(await collect(handle.events()));
    assert.ok(handle.runId);
    assertGoalRun(await client.getRun(handle.runId));

    const started = await client.startRun("scripted", goalScript(2), { goal: GOAL });
    assertGoalMetOnAttempt2(await collect(client.observeRun(started.runId)));
    assertGoalRun(await client.getRun(started.runId));

    const { threadId } = await client.createThread();
    const turn = client.sendMessage(threadId, "scripted", goalScript(2), { goal: GOAL });
    assertGoalMetOnAttempt2(await collect(turn.events()));

    // A schedule's goal is every firing's.
    const schedule = await client.createSchedule("scripted", "@yearly", goalScript(2), {
      paused: true,
      goal: GOAL,
    });
    const { run } = await client.triggerSchedule(schedule.scheduleId);
    assert.equal(run?.goal?.judgeAgentId, JUDGE);
    assertGoalMetOnAttempt2(await collect(client.observeRun(run!.runId)));
    await client.deleteSchedule(schedule.scheduleId);

    // Never met within maxAttempts: finished, goalMet false.
    const short = client.stream("scripted", goalScript(3), { goal: { ...GOAL, maxAttempts: 2 } });
    const missed = await collect(short.events());
    assert.deepEqual(
      verdicts(missed).map((v) => [v.attempt, v.satisfied]),
      [
        [1, false],
        [2, false],
      ],
    );
    const finish = missed.at(-1)!.payload;
    assert.ok(finish.case === "finish" && finish.value.goalMet === false);

    // A judge that is no agent of the server.
    const bad = client.stream("scripted", TWO, {
      goal: { objective: "x", judgeAgentId: "nobody" },
    });
    await assert.rejects(collect(bad.events()), rejectsWith(Code.InvalidArgument));
  });

  test("errors: SCHEDULE_NOT_FOUND, bad fields, a taken id, an empty or unknown change", async () => {
    const unknown = "ts-no-such-schedule";
    const notFound = rejectsWith(Code.NotFound, "SCHEDULE_NOT_FOUND");
    await assert.rejects(client.getSchedule(unknown), notFound);
    await assert.rejects(client.updateSchedule(unknown, { cron: "@daily" }), notFound);
    await assert.rejects(client.pauseSchedule(unknown), notFound);
    await assert.rejects(client.resumeSchedule(unknown), notFound);
    await assert.rejects(client.deleteSchedule(unknown), notFound);
    await assert.rejects(client.triggerSchedule(unknown), notFound);
    await assert.rejects(client.listScheduleRuns(unknown), notFound);

    await assert.rejects(
      client.createSchedule("nobody", "61 * * * *", TWO, {
        overlapPolicy: ScheduleOverlapPolicy.ENQUEUE, // THREADED only
      }),
      rejectsWith(Code.InvalidArgument),
    );
    await assert.rejects(
      client.createSchedule("scripted", "@daily", TWO, { catchUpWindowMs: 500 }),
      rejectsWith(Code.InvalidArgument),
    );

    const made = await client.createSchedule("scripted", "@daily", TWO, {
      scheduleId: "ts-taken",
      requestId: "ts-create-1",
    });
    const again = await client.createSchedule("scripted", "@daily", TWO, {
      scheduleId: "ts-taken",
      requestId: "ts-create-1",
    });
    assert.deepEqual(again.createTime, made.createTime);
    await assert.rejects(
      client.createSchedule("scripted", "@hourly", TWO, { scheduleId: "ts-taken" }),
      rejectsWith(Code.AlreadyExists, "SCHEDULE_ALREADY_EXISTS"),
    );

    await assert.rejects(client.updateSchedule("ts-taken", {}), rejectsWith(Code.InvalidArgument));
    await assert.rejects(
      client.updateSchedule("ts-taken", { cron: "not a cron", input: "kept?" }),
      rejectsWith(Code.InvalidArgument),
    );
    assert.deepEqual(
      [(await client.getSchedule("ts-taken")).cron, (await client.getSchedule("ts-taken")).input],
      ["@daily", TWO],
    );
    const sneaky = { threadMode: ScheduleThreadMode.THREADED } as ScheduleChanges;
    await assert.rejects(client.updateSchedule("ts-taken", sneaky), TypeError);
    await client.deleteSchedule("ts-taken");
  });
});
