/**
 * The console end to end: console/dist served by real `python -m server
 * serve --http-port` processes over a real Redis, driven in headless
 * Chromium (Debian's chromium, through playwright-core).
 *
 * The checks are invariants, never timings: the text a run view shows is
 * the run's whole text, each token once; the event indices it lists are
 * dense (0, 1, 2, ... as many as the run has), across a server SIGKILLed
 * and replaced mid-run; a decision made in the approvals view lets the run
 * finish; a server with API keys makes the console ask for one.
 *
 * Screenshots for the docs (docs/img/console-run.png, console-approvals.png)
 * are saved when missing, or every run with KEEL_SCREENSHOTS=1.
 */
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import * as path from "node:path";
import { after, before, describe, test } from "node:test";
import { KeelClient, RunState, TaskStatus } from "@keel/client";
import { chromium, type Browser, type Page } from "playwright-core";
// The client's own helpers (tsconfig.test.json compiles them with these tests).
import { Keel, ROOT, Redis, addApiKey, stopAll } from "../../clients/typescript/test/processes.js";

const CHROMIUM = process.env.KEEL_CHROMIUM ?? "/usr/bin/chromium";
/** How long a page may take to show what a step leads to: generous, for a loaded machine. */
const WAIT_MS = 120_000;
const TEST_TIMEOUT_MS = 300_000;
/** Short leases: a replacement server takes a dead server's run over within a second or so. */
const FAST_TAKEOVER = {
  KEEL_LEASE_TTL_S: "1.0",
  KEEL_SWEEP_INTERVAL_S: "0.2",
  KEEL_HEARTBEAT_INTERVAL_S: "0.5",
};

type Step =
  | { text: number; delay_ms?: number }
  | { tool: string; args: Record<string, unknown> }
  | { parallel: Array<{ tool: string; args: Record<string, unknown> }> };

function script(...steps: Step[]): string {
  return JSON.stringify({ steps });
}

/** The scripted agent's text deltas t0 .. t(n-1). */
function deltas(n: number): string {
  return Array.from({ length: n }, (_, i) => `t${i} `).join("");
}

/** Saves a screenshot for the docs when it is missing or KEEL_SCREENSHOTS=1 asks for it. */
async function screenshot(page: Page, name: string): Promise<void> {
  const file = path.join(ROOT, "docs", "img", name);
  if (process.env.KEEL_SCREENSHOTS === "1" || !existsSync(file)) {
    await page.screenshot({ path: file });
  }
}

/** What a run view shows, read from its DOM. */
interface RunViewState {
  state: string;
  lastIndex: string;
  text: string;
  indices: number[];
  kinds: string[];
  reconnects: number;
}

async function runViewState(page: Page): Promise<RunViewState> {
  return page.evaluate(() => {
    const all = (selector: string): HTMLElement[] =>
      Array.from(document.querySelectorAll<HTMLElement>(selector));
    return {
      state: document.querySelector("[data-testid=run-state]")?.textContent ?? "",
      lastIndex: document.querySelector("[data-testid=run-last-index]")?.textContent ?? "",
      text: all("[data-testid=text-part]")
        .map((part) => part.textContent ?? "")
        .join(""),
      indices: all("[data-testid=event-row]").map((row) => Number(row.dataset.index)),
      kinds: all("[data-testid=event-row] td:nth-child(3)").map((cell) => cell.textContent ?? ""),
      reconnects: Number(document.querySelector("[data-testid=run-reconnects]")?.textContent),
    };
  });
}

/** Waits until the run view says `state` and its stream ended. */
async function waitForRunEnd(page: Page, state: string): Promise<void> {
  await page.waitForFunction(
    (expected) =>
      document.querySelector("[data-testid=run-state]")?.textContent === expected &&
      document.querySelector("[data-testid=run-connection]")?.textContent === "ended",
    state,
    { timeout: WAIT_MS },
  );
}

function assertDense(indices: number[], count: bigint): void {
  assert.deepEqual(
    indices,
    Array.from({ length: Number(count) }, (_, i) => i),
    "the event indices shown have a gap or a repeat",
  );
}

let redis: Redis;
let browser: Browser;

before(async () => {
  assert.ok(
    existsSync(path.join(ROOT, "console", "dist", "index.html")),
    "the console is not built: npm run --prefix console build",
  );
  redis = await Redis.start();
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
});

after(async () => {
  await browser?.close();
  await stopAll();
});

/** What the page logged, for the message of a failure. */
const pageLogs = new WeakMap<Page, string[]>();

async function newPage(): Promise<Page> {
  const context = await browser.newContext({ viewport: { width: 1280, height: 860 } });
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT_MS);
  const logs: string[] = [];
  pageLogs.set(page, logs);
  page.on("console", (message) => logs.push(`${message.type()}: ${message.text()}`));
  page.on("pageerror", (error) => logs.push(`page error: ${String(error)}`));
  page.on("requestfailed", (request) =>
    logs.push(`request failed: ${request.url()} ${request.failure()?.errorText ?? ""}`),
  );
  return page;
}

/** Runs `body`; a failure's message gets what the page showed and logged. */
async function onPage(page: Page, body: () => Promise<void>): Promise<void> {
  try {
    await body();
  } catch (error) {
    const shown = await page
      .evaluate(() => document.getElementById("view")?.innerText.slice(0, 2000) ?? "")
      .catch((e: unknown) => `(unreadable: ${String(e)})`);
    const logs = (pageLogs.get(page) ?? []).slice(-30).join("\n");
    if (error instanceof Error) {
      error.message += `\n--- page ${page.url()} shows:\n${shown}\n--- page log:\n${logs}`;
    }
    throw error;
  }
}

describe("the console", { timeout: TEST_TIMEOUT_MS }, () => {
  test("starts a run from the page and shows its text, state and every event index", async () => {
    const keel = await Keel.start({
      redisUrl: redis.url,
      keyPrefix: `console-${randomUUID()}`,
      httpPort: 0,
    });
    const client = new KeelClient(keel.target);
    const page = await newPage();
    try {
      await onPage(page, async () => {
        await page.goto(`${keel.httpUrl}/console/`);
        await page.locator("#nav a.active[data-route=runs]").waitFor();
        await page.locator("[data-testid=runs-empty]").waitFor();

        await page.locator("[data-testid=start-run] summary").click();
        await page.locator("#start-agent option[value=scripted]").waitFor({ state: "attached" });
        await page.selectOption("#start-agent", "scripted");
        await page.fill("#start-input", script({ text: 40, delay_ms: 20 }, { text: 10 }));
        await page.click("#start-submit");
        await page.waitForURL(/#\/runs\/[0-9a-f]+$/);
        const runId = decodeURIComponent(new URL(page.url()).hash.split("/")[2]!);

        await page.locator("[data-testid=text-part]").first().waitFor();
        await waitForRunEnd(page, "SUCCEEDED");
        const shown = await runViewState(page);
        const run = await client.getRun(runId);
        assert.equal(run.state, RunState.SUCCEEDED);
        assert.equal(shown.text, `${deltas(50)}done`);
        assertDense(shown.indices, run.nextOffset);
        assert.equal(shown.lastIndex, String(run.nextOffset - 1n));
        assert.equal(shown.kinds[0], "start");
        assert.equal(shown.kinds.at(-1), "finish");
        assert.equal(await page.locator("[data-testid=run-output]").textContent(), "done");

        // The runs list shows it, and its filters find it or not.
        await page.click("[data-testid=nav-runs]");
        const row = page.locator(`[data-testid=run-row][data-run-id="${runId}"]`);
        await row.locator("[data-testid=state]", { hasText: "SUCCEEDED" }).waitFor();
        await page.selectOption("#filter-state", "SUSPENDED");
        await page.click("#filter-apply");
        await page.locator("[data-testid=runs-empty]").waitFor();
        await page.selectOption("#filter-state", "ended");
        await page.selectOption("#filter-agent", "scripted");
        await page.click("#filter-apply");
        await row.waitFor();
        await row.locator("a").click();
        await waitForRunEnd(page, "SUCCEEDED");
        assert.equal((await runViewState(page)).text, `${deltas(50)}done`);
      });
    } finally {
      await page.context().close();
      client.close();
      await keel.kill();
    }
  });

  test("a run view goes on across its server's SIGKILL and replacement, no token repeated or missing", async () => {
    const keyPrefix = `console-${randomUUID()}`;
    const first = await Keel.start({
      redisUrl: redis.url,
      keyPrefix,
      httpPort: 0,
      env: FAST_TAKEOVER,
    });
    let replacement: Keel | undefined;
    const client = new KeelClient(first.target);
    const page = await newPage();
    try {
      await onPage(page, async () => {
        // ~10 s of text: the kill lands mid-run however slow the page is to open.
        const total = 400;
        const run = await client.startRun("scripted", script({ text: total, delay_ms: 25 }));
        client.close();
        await page.goto(`${first.httpUrl}/console/#/runs/${run.runId}`);
        await page.waitForFunction(
          () => document.querySelectorAll("[data-testid=event-row]").length >= 30,
        );
        const before = await runViewState(page);
        assert.equal(before.state, "RUNNING", "the run ended before the kill");

        assert.equal(await first.kill(), -1);
        replacement = await Keel.start({
          redisUrl: redis.url,
          keyPrefix,
          env: FAST_TAKEOVER,
          port: first.port,
          httpPort: first.httpPort,
        });

        await waitForRunEnd(page, "SUCCEEDED");
        const after = await runViewState(page);
        const check = new KeelClient(replacement.target);
        const final = await check.getRun(run.runId);
        check.close();
        assert.equal(final.state, RunState.SUCCEEDED);
        assert.equal(after.text, `${deltas(total)}done`, "a token repeated or missing");
        assertDense(after.indices, final.nextOffset);
        assert.ok(after.reconnects > 0, "the page never reconnected");
        // The run was taken over mid-step: the dead server's partial attempt is
        // announced, and the view dropped its text (the check above).
        assert.ok(after.kinds.includes("step_superseded"), "the run was not taken over");
        await page.locator("[data-testid=superseded]").first().waitFor();
      });
    } finally {
      await page.context().close();
      await Promise.all([first.kill(), replacement?.kill()]);
    }
  });

  test("approve and deny from the approvals view, then the run finishes", async () => {
    const keel = await Keel.start({
      redisUrl: redis.url,
      keyPrefix: `console-${randomUUID()}`,
      httpPort: 0,
    });
    const client = new KeelClient(keel.target);
    const page = await newPage();
    try {
      await onPage(page, async () => {
        const run = await client.startRun(
          "scripted",
          script(
            { text: 8, delay_ms: 10 },
            { tool: "record", args: { key: "deploys" } },
            {
              parallel: [
                { tool: "approve_me", args: { action: "deploy", env: "production" } },
                { tool: "approve_me", args: { action: "drop-database" } },
              ],
            },
            { text: 6, delay_ms: 10 },
          ),
        );
        await page.goto(`${keel.httpUrl}/console/#/approvals`);
        const cards = page.locator(`[data-testid=approval][data-run-id="${run.runId}"]`);
        await cards.nth(1).waitFor(); // both pending calls, once the run suspended
        assert.equal(await cards.count(), 2);
        const deploy = cards.filter({ hasText: '"deploy"' });
        const drop = cards.filter({ hasText: "drop-database" });
        await screenshot(page, "console-approvals.png");

        await deploy.locator("[data-testid=approve]").click();
        await drop.locator("[data-testid=deny-message]").fill("not today");
        await drop.locator("[data-testid=deny]").click();
        await cards.first().waitFor({ state: "detached" });
        await page.locator("[data-testid=approvals-empty]").waitFor();

        await page.click(`[data-testid=nav-runs]`);
        await page.locator(`[data-testid=run-row][data-run-id="${run.runId}"] a`).click();
        await waitForRunEnd(page, "SUCCEEDED");
        const shown = await runViewState(page);
        const final = await client.getRun(run.runId);
        assert.equal(final.state, RunState.SUCCEEDED);
        assert.equal(shown.text, `${deltas(14)}done`);
        assertDense(shown.indices, final.nextOffset);
        const results = await page
          .locator("[data-testid=tool-call]")
          .evaluateAll((calls) =>
            calls.map((call) => [
              (call as HTMLElement).dataset.toolCallId,
              call.querySelector("[data-testid=tool-result]")?.textContent,
            ]),
          );
        assert.equal(results.length, 3);
        assert.equal(results[0]![1], "← 1"); // record: its counter's first increment
        assert.match(results[1]![1]!, /^← \{"approved":true,"args":\{"action":"deploy"/);
        assert.match(results[2]![1]!, /^✗ denied .*not today/);
        await screenshot(page, "console-run.png");
      });
    } finally {
      await page.context().close();
      client.close();
      await keel.kill();
    }
  });

  test("threads with their messages, tasks, schedules, and pages of runs", async () => {
    const keel = await Keel.start({
      redisUrl: redis.url,
      keyPrefix: `console-${randomUUID()}`,
      httpPort: 0,
    });
    const client = new KeelClient(keel.target);
    const page = await newPage();
    try {
      await onPage(page, async () => {
        const thread = await client.createThread({ resourceId: "user-42" });
        for await (const _ of client
          .sendMessage(thread.threadId, "scripted", script({ text: 3 }))
          .events()) {
          // to the end: the run's messages join the thread when it ends
        }
        const tasked = client.stream(
          "scripted",
          script({ tool: "slow", args: { key: "job", duration_ms: 50 } }),
          { untilIdle: true },
        );
        for await (const _ of tasked.events()) {
          // to the end: the run waits for its task
        }
        const [task] = (await client.listTasks({ runId: tasked.runId })).tasks;
        assert.equal(task?.status, TaskStatus.COMPLETED);
        const schedule = await client.createSchedule(
          "scripted",
          "0 9 * * 1-5",
          script({ text: 1 }),
          {
            timezone: "Europe/Paris",
            paused: true,
          },
        );

        await page.goto(`${keel.httpUrl}/console/#/threads`);
        await page
          .locator(`[data-testid=thread-row][data-thread-id="${thread.threadId}"] a`)
          .click();
        await page.locator("[data-testid=thread-message]").nth(1).waitFor();
        const messages = await page.locator("[data-testid=thread-message]").allTextContents();
        assert.ok(messages[0]!.includes('{"steps"'), "the user's prompt");
        assert.ok(messages.at(-1)!.includes("t0 t1 t2 done"), "the model's answer");

        await page.click("[data-testid=nav-tasks]");
        const taskRow = page.locator(`[data-testid=task-row][data-task-id="${task.taskId}"]`);
        await taskRow.locator("[data-testid=task-status]", { hasText: "COMPLETED" }).waitFor();

        await page.click("[data-testid=nav-schedules]");
        const scheduleRow = page.locator(
          `[data-testid=schedule-row][data-schedule-id="${schedule.scheduleId}"]`,
        );
        await scheduleRow.getByText("paused").waitFor();
        await scheduleRow.locator("[data-testid=schedule-trigger]").click();
        await scheduleRow.locator("a").first().click();
        await page.locator("[data-testid=firing-row]").first().waitFor();
        assert.match(
          (await page.locator("[data-testid=firing-row]").first().textContent()) ?? "",
          /TRIGGERED/,
        );

        // Three runs now (the thread's, the task's, the trigger's), newest first: two pages of two.
        const { runs } = await client.listRuns();
        assert.equal(runs.length, 3);
        const ids = runs.map((run) => run.runId);
        const shownIds = () =>
          page
            .locator("[data-testid=run-row]")
            .evaluateAll((rows) => rows.map((row) => (row as HTMLElement).dataset.runId));
        await page.goto(`${keel.httpUrl}/console/#/runs?size=2`);
        await page.locator("[data-testid=run-row]").nth(1).waitFor();
        assert.deepEqual(await shownIds(), ids.slice(0, 2));
        await page.click("#runs-pager-next");
        await page.locator("[data-testid=runs-pager-page]", { hasText: "page 2" }).waitFor();
        await page.locator(`[data-testid=run-row][data-run-id="${ids[2]}"]`).waitFor();
        assert.deepEqual(await shownIds(), ids.slice(2));
        assert.equal(await page.locator("#runs-pager-next").isDisabled(), true);
        await page.click("#runs-pager-prev");
        await page.locator(`[data-testid=run-row][data-run-id="${ids[0]}"]`).waitFor();
        assert.deepEqual(await shownIds(), ids.slice(0, 2));
      });
    } finally {
      await page.context().close();
      client.close();
      await keel.kill();
    }
  });

  test("asks for an API key when the server wants one, and keeps it for the tab", async () => {
    const dir = mkdtempSync(path.join(tmpdir(), "keel-console-"));
    try {
      const keysFile = path.join(dir, "keys.jsonl");
      const key = await addApiKey(keysFile, "acme", "runner");
      const keel = await Keel.start({
        redisUrl: redis.url,
        keyPrefix: `console-${randomUUID()}`,
        httpPort: 0,
        apiKeysFile: keysFile,
      });
      const page = await newPage();
      try {
        await onPage(page, async () => {
          await page.goto(`${keel.httpUrl}/console/#/runs`);
          const dialog = page.locator("#api-key-dialog[open]");
          await dialog.waitFor();
          assert.equal(await page.locator("#api-key-error").isVisible(), false);

          await page.fill("#api-key-input", "keel_00000000_not-a-key");
          await page.click("#api-key-submit");
          await page.locator("#api-key-error").waitFor(); // asked again: the key was refused
          await dialog.waitFor();

          await page.fill("#api-key-input", key);
          await page.click("#api-key-submit");
          await page.locator("[data-testid=runs-empty]").waitFor();
          assert.equal(await dialog.count(), 0);
          assert.equal(await page.evaluate(() => sessionStorage.getItem("keel.apiKey")), key);

          await page.reload(); // the tab keeps the key
          await page.locator("[data-testid=runs-empty]").waitFor();
          assert.equal(await dialog.count(), 0);

          await page.click("#forget-key"); // and forgets it when told
          await dialog.waitFor();
        });
      } finally {
        await page.context().close();
        await keel.kill();
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
