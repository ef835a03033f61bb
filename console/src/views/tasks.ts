/** #/tasks: background tasks, newest first, filtered by run, agent and status; cancel, retry. */
import { TaskStatus, type Task } from "@keel/client/web";
import type { ViewContext } from "../context.js";
import { h, replace, select, table, td, truncated } from "../dom.js";
import { compactJson, enumName } from "../format.js";
import { loading, pager, paging, queryRecord, runLink, taskStatusBadge, when } from "./common.js";

const PAGE_SIZE = 25;
const STATUSES = [
  TaskStatus.QUEUED,
  TaskStatus.STARTED,
  TaskStatus.RETRYING,
  TaskStatus.COMPLETED,
  TaskStatus.FAILED,
  TaskStatus.CANCELLED,
];
const ENDED = new Set([TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED]);

export function tasksView(ctx: ViewContext): void {
  const run = ctx.query.get("run") ?? "";
  const agent = ctx.query.get("agent") ?? "";
  const status = ctx.query.get("status") ?? "";
  const pages = paging("tasks", JSON.stringify([run, agent, status]), ctx.query);
  const statusValue = STATUSES.find((s) => enumName(TaskStatus, s) === status);

  const runInput = h("input", { id: "filter-run", placeholder: "run id", value: run });
  const agentInput = h("input", { id: "filter-task-agent", placeholder: "agent id", value: agent });
  const statusSelect = select(
    { id: "filter-status" },
    [
      ["", "any status"],
      ...STATUSES.map((s): [string, string] => [enumName(TaskStatus, s), enumName(TaskStatus, s)]),
    ],
    status,
  );
  const list = h("div", { id: "tasks-list" }, loading());
  replace(
    ctx.root,
    h("h1", null, "Tasks"),
    h(
      "form",
      {
        class: "toolbar",
        onsubmit: (event: Event) => {
          event.preventDefault();
          ctx.navigate("tasks", [], {
            run: runInput.value.trim(),
            agent: agentInput.value.trim(),
            status: statusSelect.value,
          });
        },
      },
      h("label", null, "Run ", runInput),
      h("label", null, "Agent ", agentInput),
      h("label", null, "Status ", statusSelect),
      h("button", { type: "submit" }, "Filter"),
    ),
    list,
  );

  const load = (): void => {
    ctx.client
      .listTasks(
        {
          runId: run,
          agentId: agent,
          statuses: statusValue === undefined ? [] : [statusValue],
          pageSize: PAGE_SIZE,
          pageToken: pages.token,
        },
        { signal: ctx.signal },
      )
      .then((response) => {
        const hasNext = pages.setNext(response.nextPageToken);
        replace(
          list,
          response.tasks.length === 0
            ? h("p", { class: "muted", "data-testid": "tasks-empty" }, "No tasks.")
            : table(
                "tasks-table",
                [
                  "task",
                  "run",
                  "tool",
                  "status",
                  "attempt",
                  "progress",
                  "result or error",
                  "updated",
                  "",
                ],
                response.tasks.map((task) => taskRow(ctx, task, load)),
              ),
          pager("tasks-pager", pages.page, hasNext, (page) =>
            ctx.navigate("tasks", [], queryRecord(ctx.query, { page: String(page) })),
          ),
        );
      })
      .catch(ctx.fail);
  };
  load();
}

function taskRow(ctx: ViewContext, task: Task, reload: () => void): HTMLTableRowElement {
  const act = (send: () => Promise<unknown>) => (event: Event) => {
    (event.currentTarget as HTMLButtonElement).disabled = true;
    send().then(reload, ctx.fail);
  };
  const outcome = task.error !== "" ? task.error : compactJson(task.resultJson);
  return h(
    "tr",
    { "data-testid": "task-row", "data-task-id": task.taskId },
    td(h("span", { class: "mono" }, task.taskId)),
    td(runLink(task.runId, true)),
    td(h("span", { title: compactJson(task.argsJson) }, task.toolName)),
    td(taskStatusBadge(task.status)),
    td(`${task.attempt}/${task.maxRetries + 1}`),
    td(task.progress > 0 ? `${Math.round(task.progress * 100)}%` : ""),
    td(truncated(outcome, 80)),
    td(when(task.updateTime)),
    td(
      ENDED.has(task.status)
        ? task.status === TaskStatus.COMPLETED
          ? null
          : h(
              "button",
              {
                type: "button",
                "data-testid": "task-retry",
                onclick: act(() => ctx.client.retryTask(task.taskId)),
              },
              "Retry",
            )
        : h(
            "button",
            {
              type: "button",
              "data-testid": "task-cancel",
              onclick: act(() =>
                ctx.client.cancelTask(task.taskId, { reason: "cancelled from the console" }),
              ),
            },
            "Cancel",
          ),
    ),
  );
}
