/** #/runs: runs, newest first, filtered by agent, state and thread; paged; start a run. */
import { RunState, type Agent, type Run } from "@keel/client/web";
import type { ViewContext } from "../context.js";
import { h, replace, select, table, td } from "../dom.js";
import {
  loading,
  pager,
  paging,
  queryRecord,
  runLink,
  stateBadge,
  stateName,
  threadLink,
  when,
} from "./common.js";

const PAGE_SIZE = 25;
const LIVE = [RunState.QUEUED, RunState.RUNNING, RunState.SUSPENDED];
const ENDED = [RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED];
const ALL = [...LIVE, ...ENDED];

/** The states a filter value names: "", "live", "ended" or a state's name. */
function states(value: string): RunState[] {
  if (value === "live") {
    return LIVE;
  }
  if (value === "ended") {
    return ENDED;
  }
  const state = ALL.find((s) => stateName(s) === value);
  return state === undefined ? [] : [state];
}

export function runsView(ctx: ViewContext): void {
  const agent = ctx.query.get("agent") ?? "";
  const state = ctx.query.get("state") ?? "";
  const thread = ctx.query.get("thread") ?? "";
  const schedule = ctx.query.get("schedule") ?? "";
  const size = Number(ctx.query.get("size") ?? PAGE_SIZE);
  const pageSize = Number.isInteger(size) && size >= 1 && size <= 1000 ? size : PAGE_SIZE;
  const pages = paging(
    "runs",
    JSON.stringify([agent, state, thread, schedule, pageSize]),
    ctx.query,
  );

  const agentSelect = select(
    { id: "filter-agent", "data-testid": "filter-agent" },
    [["", "any agent"]],
    "",
  );
  const stateSelect = select(
    { id: "filter-state", "data-testid": "filter-state" },
    [
      ["", "any state"],
      ["live", "live (queued, running, suspended)"],
      ["ended", "ended"],
      ...ALL.map((s): [string, string] => [stateName(s), stateName(s)]),
    ],
    state,
  );
  const threadInput = h("input", {
    id: "filter-thread",
    "data-testid": "filter-thread",
    placeholder: "thread id",
    value: thread,
  });
  const filters = h(
    "form",
    {
      id: "runs-filter",
      class: "toolbar",
      onsubmit: (event: Event) => {
        event.preventDefault();
        ctx.navigate("runs", [], {
          agent: agentSelect.value,
          state: stateSelect.value,
          thread: threadInput.value.trim(),
          schedule,
          size: ctx.query.get("size") ?? "",
        });
      },
    },
    h("label", null, "Agent ", agentSelect),
    h("label", null, "State ", stateSelect),
    h("label", null, "Thread ", threadInput),
    schedule === "" ? null : h("span", { class: "chip" }, `schedule ${schedule}`),
    h("button", { type: "submit", id: "filter-apply", "data-testid": "filter-apply" }, "Filter"),
    h(
      "button",
      {
        type: "button",
        id: "runs-refresh",
        "data-testid": "runs-refresh",
        onclick: () => void load(),
      },
      "Refresh",
    ),
  );

  const starter = startForm(ctx);
  const list = h("div", { id: "runs-list" }, loading());
  replace(ctx.root, h("h1", null, "Runs"), starter.element, filters, list);

  void ctx.client
    .listAgents({ signal: ctx.signal })
    .then((agents) => {
      const options: Array<[string, string]> = agents.map((a) => [a.agentId, a.agentId]);
      if (agent !== "" && !agents.some((a) => a.agentId === agent)) {
        options.push([agent, agent]);
      }
      replace(agentSelect, h("option", { value: "" }, "any agent"));
      for (const [value, label] of options) {
        agentSelect.append(h("option", { value }, label));
      }
      agentSelect.value = agent;
      starter.setAgents(agents);
    })
    .catch(ctx.fail);

  async function load(): Promise<void> {
    try {
      const response = await ctx.client.listRuns(
        {
          agentId: agent,
          states: states(state),
          threadId: thread,
          scheduleId: schedule,
          pageSize,
          pageToken: pages.token,
        },
        { signal: ctx.signal },
      );
      const hasNext = pages.setNext(response.nextPageToken);
      const go = (page: number): void =>
        ctx.navigate("runs", [], queryRecord(ctx.query, { page: String(page) }));
      replace(
        list,
        response.runs.length === 0
          ? h("p", { class: "muted", "data-testid": "runs-empty" }, "No runs.")
          : table(
              "runs-table",
              ["run", "agent", "state", "events", "thread", "created", "updated"],
              response.runs.map(runRow),
            ),
        pager("runs-pager", pages.page, hasNext, go),
      );
    } catch (error) {
      ctx.fail(error);
    }
  }
  void load();
}

function runRow(run: Run): HTMLTableRowElement {
  return h(
    "tr",
    { "data-testid": "run-row", "data-run-id": run.runId },
    td(runLink(run.runId)),
    td(run.agentId),
    td(stateBadge(run.state)),
    td(String(run.nextOffset)),
    td(threadLink(run.threadId)),
    td(when(run.createTime)),
    td(when(run.updateTime)),
  );
}

/** "Start a run": agent, input, thread; opens the run once started. */
function startForm(ctx: ViewContext): {
  element: HTMLElement;
  setAgents(agents: Agent[]): void;
} {
  const agentSelect = select({ id: "start-agent", "data-testid": "start-agent" }, [], "");
  const input = h("textarea", {
    id: "start-input",
    "data-testid": "start-input",
    rows: 4,
    placeholder: "the run's input",
  });
  const thread = h("input", {
    id: "start-thread",
    "data-testid": "start-thread",
    placeholder: "thread id (optional)",
  });
  const untilIdle = h("input", { type: "checkbox", id: "start-until-idle" });
  const submit = h(
    "button",
    { type: "submit", id: "start-submit", "data-testid": "start-submit" },
    "Start",
  );
  const form = h(
    "form",
    {
      class: "stack",
      onsubmit: (event: Event) => {
        event.preventDefault();
        submit.disabled = true;
        ctx.client
          .startRun(
            agentSelect.value,
            input.value,
            {
              threadId: thread.value.trim(),
              untilIdle: untilIdle.checked,
              requestId: globalThis.crypto.randomUUID(),
            },
            { signal: ctx.signal },
          )
          .then((run) => ctx.navigate("runs", [run.runId]))
          .catch((error: unknown) => {
            submit.disabled = false;
            ctx.fail(error);
          });
      },
    },
    h("label", null, "Agent ", agentSelect),
    input,
    h("div", { class: "toolbar" }, thread, h("label", null, untilIdle, " until idle"), submit),
  );
  const element = h(
    "details",
    { id: "start-run", "data-testid": "start-run" },
    h("summary", null, "Start a run"),
    form,
  );
  return {
    element,
    setAgents(agents: Agent[]) {
      replace(
        agentSelect,
        agents.map((a) => h("option", { value: a.agentId, title: a.description }, a.agentId)),
      );
    },
  };
}
