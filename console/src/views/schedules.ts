/** #/schedules: schedules, newest first; #/schedules/<id>: one schedule and its firings. */
import {
  ScheduleFiringOutcome,
  ScheduleOverlapPolicy,
  ScheduleThreadMode,
  type Schedule,
} from "@keel/client/web";
import { href, type ViewContext } from "../context.js";
import { h, replace, table, td, truncated } from "../dom.js";
import { enumName, formatDuration, formatTime } from "../format.js";
import { loading, pager, paging, queryRecord, runLink, threadLink, when } from "./common.js";

const PAGE_SIZE = 25;

export function schedulesView(ctx: ViewContext): void {
  const agent = ctx.query.get("agent") ?? "";
  const pages = paging("schedules", agent, ctx.query);
  const agentInput = h("input", {
    id: "filter-schedule-agent",
    placeholder: "agent id",
    value: agent,
  });
  const list = h("div", { id: "schedules-list" }, loading());
  replace(
    ctx.root,
    h("h1", null, "Schedules"),
    h(
      "form",
      {
        class: "toolbar",
        onsubmit: (event: Event) => {
          event.preventDefault();
          ctx.navigate("schedules", [], { agent: agentInput.value.trim() });
        },
      },
      h("label", null, "Agent ", agentInput),
      h("button", { type: "submit" }, "Filter"),
    ),
    list,
  );

  const load = (): void => {
    ctx.client
      .listSchedules(
        { agentId: agent, pageSize: PAGE_SIZE, pageToken: pages.token },
        { signal: ctx.signal },
      )
      .then((response) => {
        const hasNext = pages.setNext(response.nextPageToken);
        replace(
          list,
          response.schedules.length === 0
            ? h("p", { class: "muted", "data-testid": "schedules-empty" }, "No schedules.")
            : table(
                "schedules-table",
                ["schedule", "agent", "cron", "time zone", "state", "next", "last run", ""],
                response.schedules.map((schedule) => scheduleRow(ctx, schedule, load)),
              ),
          pager("schedules-pager", pages.page, hasNext, (page) =>
            ctx.navigate("schedules", [], queryRecord(ctx.query, { page: String(page) })),
          ),
        );
      })
      .catch(ctx.fail);
  };
  load();
}

function actions(ctx: ViewContext, schedule: Schedule, reload: () => void): HTMLElement {
  const act = (send: () => Promise<unknown>) => (event: Event) => {
    (event.currentTarget as HTMLButtonElement).disabled = true;
    send().then(reload, ctx.fail);
  };
  const id = schedule.scheduleId;
  return h(
    "span",
    { class: "toolbar" },
    schedule.paused
      ? h(
          "button",
          {
            type: "button",
            "data-testid": "schedule-resume",
            onclick: act(() => ctx.client.resumeSchedule(id)),
          },
          "Resume",
        )
      : h(
          "button",
          {
            type: "button",
            "data-testid": "schedule-pause",
            onclick: act(() => ctx.client.pauseSchedule(id)),
          },
          "Pause",
        ),
    h(
      "button",
      {
        type: "button",
        "data-testid": "schedule-trigger",
        onclick: act(() => ctx.client.triggerSchedule(id)),
      },
      "Trigger now",
    ),
  );
}

function scheduleRow(
  ctx: ViewContext,
  schedule: Schedule,
  reload: () => void,
): HTMLTableRowElement {
  return h(
    "tr",
    { "data-testid": "schedule-row", "data-schedule-id": schedule.scheduleId },
    td(
      h(
        "a",
        { href: href("schedules", [schedule.scheduleId]), class: "mono" },
        schedule.scheduleId,
      ),
    ),
    td(schedule.agentId),
    td(h("code", null, schedule.cron)),
    td(schedule.timezone === "" ? "UTC" : schedule.timezone),
    td(
      schedule.paused
        ? h("span", { class: "badge paused" }, "paused")
        : h("span", { class: "badge active" }, "active"),
    ),
    td(when(schedule.nextFireTimes[0])),
    td(runLink(schedule.lastRunId, true)),
    td(actions(ctx, schedule, reload)),
  );
}

export function scheduleView(ctx: ViewContext): void {
  const scheduleId = ctx.path[0]!;
  const pages = paging(`schedule-firings:${scheduleId}`, "", ctx.query);
  const info = h("dl", { class: "info" }, loading());
  const firings = h("div", { id: "schedule-firings" }, loading());
  replace(
    ctx.root,
    h(
      "h1",
      null,
      "Schedule ",
      h("span", { class: "mono", "data-testid": "schedule-id" }, scheduleId),
    ),
    h("p", null, h("a", { href: href("runs", [], { schedule: scheduleId }) }, "its runs")),
    info,
    h("h2", null, "Firings"),
    firings,
  );

  const load = (): void => {
    ctx.client
      .getSchedule(scheduleId, { signal: ctx.signal })
      .then((schedule) => {
        const rows: Array<[string, HTMLElement | string]> = [
          ["agent", schedule.agentId],
          ["cron", schedule.cron],
          ["time zone", schedule.timezone === "" ? "UTC" : schedule.timezone],
          ["state", schedule.paused ? "paused" : "active"],
          ["thread mode", enumName(ScheduleThreadMode, schedule.threadMode)],
          ["overlap policy", enumName(ScheduleOverlapPolicy, schedule.overlapPolicy)],
          ["catch-up window", formatDuration(schedule.catchUpWindow)],
          ["thread", threadLink(schedule.threadId)],
          [
            "goal",
            schedule.goal === undefined
              ? ""
              : `${schedule.goal.objective} (judge ${schedule.goal.judgeAgentId})`,
          ],
          ["next fire times", schedule.nextFireTimes.map((t) => formatTime(t)).join(", ")],
          ["last run", runLink(schedule.lastRunId)],
          ["created", formatTime(schedule.createTime)],
          ["updated", formatTime(schedule.updateTime)],
        ];
        replace(
          info,
          rows
            .filter(([, value]) => (typeof value === "string" ? value : value.textContent) !== "")
            .map(([name, value]) => [h("dt", null, name), h("dd", null, value)]),
          h("dt", null, "input"),
          h("dd", null, h("pre", { class: "input" }, schedule.input)),
          h("dt", null, ""),
          h("dd", null, actions(ctx, schedule, load)),
        );
      })
      .catch(ctx.fail);

    ctx.client
      .listScheduleRuns(
        scheduleId,
        { pageSize: PAGE_SIZE, pageToken: pages.token },
        { signal: ctx.signal },
      )
      .then((response) => {
        const hasNext = pages.setNext(response.nextPageToken);
        replace(
          firings,
          response.firings.length === 0
            ? h("p", { class: "muted" }, "No firings yet.")
            : table(
                "firings-table",
                ["tick", "fired", "outcome", "run", "detail"],
                response.firings.map((firing) =>
                  h(
                    "tr",
                    { "data-testid": "firing-row" },
                    td(when(firing.tickTime)),
                    td(when(firing.fireTime)),
                    td(enumName(ScheduleFiringOutcome, firing.outcome)),
                    td(runLink(firing.runId, true)),
                    td(truncated(firing.detail)),
                  ),
                ),
              ),
          pager("firings-pager", pages.page, hasNext, (page) =>
            ctx.navigate("schedules", [scheduleId], { page: String(page) }),
          ),
        );
      })
      .catch(ctx.fail);
  };
  load();
}
