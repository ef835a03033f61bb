/**
 * #/runs/<run id>: one run, live.
 *
 * The run's events come from the client's RunHandle, which resumes by itself
 * after a dropped connection or a server restart at the index after the last
 * one it yielded, and drops any event it already yielded: each event reaches
 * this view once, in index order. The view keeps what a reader of the run
 * wants (its text, reasoning, tool calls and results, task updates, pending
 * decisions, output) and an event log with every index, and drops the partial
 * output of a step attempt a crash interrupted (`step_superseded`).
 */
import { RunState, TaskStatus, type AgentEvent, type Run, type TaskUpdate } from "@keel/client/web";
import type { ViewContext } from "../context.js";
import { h, replace, td, truncated } from "../dom.js";
import { compactJson, enumName, formatTime, prettyJson } from "../format.js";
import { stateBadge, taskStatusBadge, threadLink } from "./common.js";

/** The event log keeps this many rows (the oldest go first); the transcript keeps everything. */
const MAX_LOG_ROWS = 5000;

const TERMINAL = new Set([RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED]);

/** "textDelta" → "text_delta", the proto's name. */
function kindName(event: AgentEvent): string {
  return (event.payload.case ?? "unknown").replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);
}

/** One line about an event, for the log. */
function summary(event: AgentEvent): string {
  const p = event.payload;
  switch (p.case) {
    case "start":
      return `agent ${p.value.agentId}`;
    case "textDelta":
    case "reasoningDelta":
      return JSON.stringify(p.value.delta);
    case "toolInputStart":
      return `${p.value.toolName} ${p.value.toolCallId}`;
    case "toolInputDelta":
      return p.value.delta;
    case "toolCall":
    case "toolCallApproval":
    case "toolCallSuspended":
      return `${p.value.toolName}(${compactJson(p.value.argsJson)}) ${p.value.toolCallId}`;
    case "toolResult":
      return p.value.denied
        ? `${p.value.toolName} denied: ${p.value.resultJson}`
        : `${p.value.toolName} → ${compactJson(p.value.resultJson)}`;
    case "toolError":
      return `${p.value.toolName}: ${p.value.message}`;
    case "toolOutput":
      return compactJson(p.value.outputJson);
    case "suspended":
    case "resumed":
      return p.value.toolCallIds.join(", ");
    case "stepSuperseded":
      return `step ${p.value.supersededStep} attempt ${p.value.supersededAttempt} from index ${p.value.fromIndex}`;
    case "stepFinish":
      return p.value.finishReason;
    case "finish":
      return p.value.outputText !== "" ? JSON.stringify(p.value.outputText) : p.value.outputJson;
    case "error":
      return `${p.value.type}: ${p.value.message}`;
    case "abort":
      return p.value.reason;
    case "task":
      return `${p.value.name} ${p.value.taskId} ${enumName(TaskStatus, p.value.status)}`;
    case "goalEvaluated":
      return `attempt ${p.value.attempt}: ${p.value.satisfied ? "satisfied" : "not satisfied"} (${p.value.reason})`;
    case "usage":
      return `in ${p.value.inputTokens}, out ${p.value.outputTokens}`;
    case "responseMetadata":
      return p.value.modelName;
    case "object":
      return p.value.objectJson;
    case "source":
      return p.value.url;
    default:
      return "";
  }
}

/** Appends a delta to a part's one text node (not a node per delta: a run may stream millions). */
function appendText(part: HTMLElement, delta: string): void {
  const last = part.lastChild;
  if (last instanceof Text) {
    last.appendData(delta);
  } else {
    part.append(delta);
  }
}

/** A piece of the transcript and the index of the event that made it. */
interface Item {
  element: HTMLElement;
  firstIndex: bigint;
  key: string;
}

export function runView(ctx: ViewContext): void {
  const runId = ctx.path[0]!;
  let derivedState: RunState | undefined; // from the events, once one says
  let ended = false;
  let count = 0;

  const stateSlot = h("span", { id: "run-state-slot" });
  const lastIndexEl = h("span", { id: "run-last-index", "data-testid": "run-last-index" }, "—");
  const countEl = h("span", { id: "run-events", "data-testid": "run-events" }, "0");
  const connectionEl = h(
    "span",
    { id: "run-connection", "data-testid": "run-connection", class: "connection" },
    "connecting",
  );
  const reconnectsEl = h("span", { id: "run-reconnects", "data-testid": "run-reconnects" }, "0");
  const cancelButton = h(
    "button",
    {
      type: "button",
      id: "run-cancel",
      "data-testid": "run-cancel",
      hidden: true,
      onclick: () => {
        cancelButton.disabled = true;
        ctx.client
          .cancelRun(runId, { reason: "cancelled from the console" }, { signal: ctx.signal })
          .catch(ctx.fail)
          .finally(() => (cancelButton.disabled = false));
      },
    },
    "Cancel run",
  );
  const info = h("dl", { class: "info", id: "run-info" });
  const transcript = h("div", {
    id: "run-transcript",
    "data-testid": "run-transcript",
    class: "transcript",
  });
  const tasksBody = h("tbody");
  const tasksSection = h(
    "section",
    { id: "run-tasks", hidden: true },
    h("h2", null, "Background tasks"),
    h(
      "table",
      { "data-testid": "run-tasks-table" },
      h(
        "thead",
        null,
        h(
          "tr",
          null,
          ["task", "tool", "status", "attempt", "progress", "message"].map((n) => h("th", null, n)),
        ),
      ),
      tasksBody,
    ),
  );
  const logBody = h("tbody", { id: "run-events-body" });
  const logNote = h("p", { class: "muted", hidden: true, "data-testid": "run-events-trimmed" });

  replace(
    ctx.root,
    h(
      "div",
      { class: "run-header" },
      h(
        "h1",
        null,
        "Run ",
        h("span", { class: "mono", id: "run-id", "data-testid": "run-id" }, runId),
      ),
      h(
        "div",
        { class: "toolbar stats" },
        stateSlot,
        h("span", null, "last index ", lastIndexEl),
        h("span", null, "events ", countEl),
        h("span", null, "stream ", connectionEl),
        h("span", null, "reconnects ", reconnectsEl),
        cancelButton,
      ),
    ),
    info,
    h("h2", null, "Transcript"),
    transcript,
    tasksSection,
    h(
      "details",
      { id: "run-events-log", open: true },
      h("summary", null, "Events"),
      logNote,
      h(
        "table",
        { class: "events", "data-testid": "run-events-table" },
        h(
          "thead",
          null,
          h(
            "tr",
            null,
            ["index", "step", "event", "detail"].map((n) => h("th", null, n)),
          ),
        ),
        logBody,
      ),
    ),
  );

  function showState(state: RunState): void {
    replace(stateSlot, stateBadge(state, "run-state"));
    stateSlot.firstElementChild!.id = "run-state";
    cancelButton.hidden = TERMINAL.has(state);
  }
  showState(RunState.UNSPECIFIED);

  function showRun(run: Run): void {
    if (derivedState === undefined || ended) {
      showState(run.state);
    }
    const rows: Array<[string, HTMLElement | string]> = [
      ["agent", run.agentId],
      ["thread", threadLink(run.threadId)],
      ["schedule", run.scheduleId],
      ["created", formatTime(run.createTime)],
      ["updated", formatTime(run.updateTime)],
      ["request id", run.requestId],
      ["error", run.error],
    ];
    replace(
      info,
      rows
        .filter(([, value]) => (typeof value === "string" ? value : value.textContent) !== "")
        .map(([name, value]) => [h("dt", null, name), h("dd", null, value)]),
      h("dt", null, "input"),
      h("dd", null, h("pre", { class: "input", "data-testid": "run-input" }, run.input)),
    );
  }

  // -- the transcript ------------------------------------------------------

  const items: Item[] = [];
  const byKey = new Map<string, Item>();

  function item(key: string, index: bigint, make: () => HTMLElement): Item {
    let found = byKey.get(key);
    if (found === undefined) {
      found = { element: make(), firstIndex: index, key };
      byKey.set(key, found);
      items.push(found);
      transcript.append(found.element);
    }
    return found;
  }

  function textPart(event: AgentEvent, partIndex: number, reasoning: boolean): HTMLElement {
    const key = `${reasoning ? "reasoning" : "text"}:${event.step}.${event.attempt}.${partIndex}`;
    return item(key, event.index, () =>
      h("div", {
        class: reasoning ? "reasoning" : "text",
        "data-testid": reasoning ? "reasoning-part" : "text-part",
      }),
    ).element;
  }

  function toolItem(
    event: AgentEvent,
    toolCallId: string,
    toolName: string,
    argsJson?: string,
  ): HTMLElement {
    const element = item(`tool:${toolCallId}`, event.index, () =>
      h(
        "div",
        { class: "tool", "data-testid": "tool-call", "data-tool-call-id": toolCallId },
        h(
          "div",
          { class: "tool-call" },
          "→ ",
          h("b", null, toolName),
          h("code", { class: "args" }),
        ),
        h("div", { class: "decision" }),
        h("div", { class: "tool-result", "data-testid": "tool-result" }),
      ),
    ).element;
    if (argsJson !== undefined) {
      element.querySelector(".args")!.textContent = `(${compactJson(argsJson)})`;
    }
    return element;
  }

  function decisionControls(toolCallId: string, kind: "approval" | "call"): HTMLElement {
    const message = h("input", {
      placeholder: "why (the model sees it)",
      class: "wide",
      "data-testid": "deny-message",
    });
    const answer = h("input", { placeholder: "result (JSON)", "data-testid": "answer-json" });
    const buttons: HTMLButtonElement[] = [];
    const decide = (send: () => Promise<unknown>): void => {
      for (const button of buttons) {
        button.disabled = true;
      }
      send()
        .catch(ctx.fail)
        .finally(() => buttons.forEach((button) => (button.disabled = false)));
    };
    if (kind === "approval") {
      buttons.push(
        h(
          "button",
          {
            type: "button",
            class: "approve",
            "data-testid": "approve",
            onclick: () =>
              decide(() => ctx.client.approve(runId, toolCallId, { signal: ctx.signal })),
          },
          "Approve",
        ),
        h(
          "button",
          {
            type: "button",
            class: "deny",
            "data-testid": "deny",
            onclick: () =>
              decide(() =>
                ctx.client.deny(runId, toolCallId, { message: message.value, signal: ctx.signal }),
              ),
          },
          "Deny",
        ),
      );
      return h("div", { class: "toolbar pending" }, "waits for approval", ...buttons, message);
    }
    buttons.push(
      h(
        "button",
        {
          type: "button",
          "data-testid": "answer",
          onclick: () =>
            decide(async () => {
              const result: unknown = JSON.parse(answer.value === "" ? "null" : answer.value);
              return ctx.client.answer(runId, toolCallId, result as never, { signal: ctx.signal });
            }),
        },
        "Send result",
      ),
    );
    return h("div", { class: "toolbar pending" }, "waits for its result", answer, ...buttons);
  }

  function note(event: AgentEvent, cls: string, testid: string, ...text: string[]): void {
    item(`${cls}:${event.index}`, event.index, () =>
      h("div", { class: `note ${cls}`, "data-testid": testid }, ...text),
    );
  }

  // -- tasks -------------------------------------------------------------------

  const taskRows = new Map<string, HTMLTableRowElement>();

  function taskUpdate(update: TaskUpdate): void {
    tasksSection.hidden = false;
    let row = taskRows.get(update.taskId);
    if (row === undefined) {
      row = h("tr", { "data-testid": "task-row", "data-task-id": update.taskId });
      taskRows.set(update.taskId, row);
      tasksBody.append(row);
    }
    const progress = update.progress > 0 ? `${Math.round(update.progress * 100)}%` : "";
    const message =
      update.message !== ""
        ? update.message
        : update.resultJson !== ""
          ? compactJson(update.resultJson)
          : "";
    replace(
      row,
      td(h("span", { class: "mono" }, update.taskId)),
      td(update.name),
      td(taskStatusBadge(update.status)),
      td(String(update.attempt)),
      td(progress),
      td(truncated(message)),
    );
  }

  // -- events --------------------------------------------------------------------

  function log(event: AgentEvent): void {
    logBody.append(
      h(
        "tr",
        { "data-testid": "event-row", "data-index": String(event.index) },
        td(String(event.index)),
        td(event.step === 0 ? "" : `${event.step}.${event.attempt}`),
        td(kindName(event)),
        td(truncated(summary(event))),
      ),
    );
    if (logBody.childElementCount > MAX_LOG_ROWS) {
      logBody.firstElementChild!.remove();
      logNote.hidden = false;
      logNote.textContent = `Only the last ${MAX_LOG_ROWS} events are listed.`;
    }
  }

  function supersede(from: bigint, to: bigint): void {
    for (let i = items.length - 1; i >= 0; i--) {
      const it = items[i]!;
      if (it.firstIndex >= from && it.firstIndex < to) {
        it.element.remove();
        byKey.delete(it.key);
        items.splice(i, 1);
      }
    }
    for (const row of logBody.querySelectorAll<HTMLElement>("tr[data-index]")) {
      const index = BigInt(row.dataset.index!);
      if (index >= from && index < to) {
        row.classList.add("superseded");
      }
    }
  }

  function setState(state: RunState): void {
    derivedState = state;
    showState(state);
  }

  function apply(event: AgentEvent): void {
    count += 1;
    lastIndexEl.textContent = String(event.index);
    countEl.textContent = String(count);
    log(event);
    const p = event.payload;
    switch (p.case) {
      case "start":
        setState(RunState.RUNNING);
        break;
      case "textStart":
        textPart(event, p.value.partIndex, false);
        break;
      case "textDelta":
        appendText(textPart(event, p.value.partIndex, false), p.value.delta);
        break;
      case "reasoningStart":
        textPart(event, p.value.partIndex, true);
        break;
      case "reasoningDelta":
        appendText(textPart(event, p.value.partIndex, true), p.value.delta);
        break;
      case "toolCall":
        toolItem(event, p.value.toolCallId, p.value.toolName, p.value.argsJson);
        break;
      case "toolCallApproval":
      case "toolCallSuspended": {
        const element = toolItem(event, p.value.toolCallId, p.value.toolName, p.value.argsJson);
        const kind = p.case === "toolCallApproval" ? "approval" : "call";
        replace(element.querySelector(".decision")!, decisionControls(p.value.toolCallId, kind));
        element.classList.add("waiting");
        break;
      }
      case "toolResult":
      case "toolError": {
        const element = toolItem(event, p.value.toolCallId, p.value.toolName);
        const result = element.querySelector<HTMLElement>(".tool-result")!;
        element.classList.remove("waiting");
        replace(element.querySelector(".decision")!);
        if (p.case === "toolError") {
          result.className = "tool-result failed";
          result.textContent = `✗ ${p.value.message}`;
        } else if (p.value.denied) {
          result.className = "tool-result denied";
          result.textContent = `✗ denied ${p.value.resultJson}`;
        } else {
          result.className = "tool-result";
          result.textContent = `← ${compactJson(p.value.resultJson)}`;
        }
        break;
      }
      case "toolOutput": {
        const found = byKey.get(`tool:${p.value.toolCallId}`);
        found?.element.append(h("pre", { class: "tool-output" }, prettyJson(p.value.outputJson)));
        break;
      }
      case "suspended":
        setState(RunState.SUSPENDED);
        break;
      case "resumed":
        setState(RunState.RUNNING);
        for (const id of p.value.toolCallIds) {
          const found = byKey.get(`tool:${id}`);
          if (found !== undefined) {
            replace(found.element.querySelector(".decision")!);
            found.element.classList.remove("waiting");
          }
        }
        break;
      case "stepSuperseded":
        supersede(p.value.fromIndex, event.index);
        note(
          event,
          "superseded",
          "superseded",
          `step ${p.value.supersededStep} attempt ${p.value.supersededAttempt} was interrupted and runs again`,
        );
        break;
      case "task":
        taskUpdate(p.value);
        break;
      case "goalEvaluated":
        note(
          event,
          "goal",
          "goal-evaluated",
          `goal, attempt ${p.value.attempt}/${p.value.maxAttempts}: ${p.value.satisfied ? "satisfied" : "not satisfied"} (score ${p.value.score}): ${p.value.reason}`,
        );
        break;
      case "object":
        note(event, "output", "run-object", prettyJson(p.value.objectJson));
        break;
      case "finish":
        setState(RunState.SUCCEEDED);
        note(
          event,
          "output",
          "run-output",
          p.value.outputText !== "" ? p.value.outputText : prettyJson(p.value.outputJson),
        );
        break;
      case "error":
        setState(RunState.FAILED);
        note(event, "failed", "run-error", `failed: ${p.value.message}`);
        break;
      case "abort":
        setState(RunState.CANCELLED);
        note(event, "aborted", "run-abort", `cancelled: ${p.value.reason}`);
        break;
      default:
        break;
    }
  }

  // -- the stream ------------------------------------------------------------------

  void ctx.client.getRun(runId, { signal: ctx.signal }).then(showRun).catch(ctx.fail);

  const handle = ctx.client.run(runId, {
    onReconnect: (reconnect) => {
      if (ctx.signal.aborted) {
        return;
      }
      reconnectsEl.textContent = String(handle.reconnects.length);
      connectionEl.textContent = `reconnecting at ${reconnect.offset} (attempt ${reconnect.attempt})`;
      connectionEl.className = "connection reconnecting";
    },
  });

  // The stream is live once a (re)connection got its snapshot or a heartbeat, even
  // before an event comes (a suspended run sends none for a while).
  let seen: unknown[] = [];
  const watch = setInterval(() => {
    const now = [handle.snapshot, handle.lastHeartbeat];
    if (!ended && now[0] !== undefined && now.some((value, i) => value !== seen[i])) {
      connectionEl.textContent = "live";
      connectionEl.className = "connection live";
    }
    seen = now;
  }, 500);
  ctx.signal.addEventListener("abort", () => clearInterval(watch));

  void (async () => {
    try {
      for await (const event of handle.events({ signal: ctx.signal })) {
        if (connectionEl.textContent !== "live") {
          connectionEl.textContent = "live";
          connectionEl.className = "connection live";
        }
        apply(event);
      }
      ended = true;
      connectionEl.textContent = "ended";
      connectionEl.className = "connection ended";
      showRun(await ctx.client.getRun(runId, { signal: ctx.signal }));
    } catch (error) {
      if (!ctx.signal.aborted) {
        connectionEl.textContent = "stopped";
        connectionEl.className = "connection failed";
      }
      ctx.fail(error);
    } finally {
      clearInterval(watch);
    }
  })();
}
